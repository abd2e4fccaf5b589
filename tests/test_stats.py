"""Key statistics: the streaming second moment against a direct computation, the token budget, resume, the cache."""

import json

import pytest
import torch

import lmedit.stats.moments as moments
from lmedit.errors import InputError
from lmedit.models.arch import mlp_out_module
from lmedit.models.hooks import capture_io
from lmedit.stats.corpora import Corpus, file_corpus
from lmedit.stats.moments import compute_second_moments, load_or_compute, model_fingerprint, stats_path

DOCS = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Rome is the capital city of Italy.",
    "Danielle Darrieux was a French actress of stage, television and film, as well as a singer and dancer.",
    "Hi.",
    "The Danube is the second-longest river in Europe, after the Volga in Russia. It flows through much of "
    "Central and Southeastern Europe, from the Black Forest into the Black Sea.",
    "Michel Rocard was a French politician and a member of the Socialist Party.",
    "Toko Yasuda is a Japanese-American musician.",
)
LAYERS = [1, 3]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def _all_keys(model, tok, docs, layers, seq_len=256):
    """Every token's input of W, document by document with no padding, in reading order: {layer: (N, d_in)}."""
    modules = {str(l): mlp_out_module(model, l) for l in layers}
    keys = {l: [] for l in layers}
    with torch.no_grad():
        for doc in docs:
            ids = tok(doc, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
            with capture_io(modules, inputs=True) as store:
                model(input_ids=torch.tensor([ids]))
            for l in layers:
                keys[l].append(store[str(l)]["input"][0].double())
    return {l: torch.cat(k) for l, k in keys.items()}


def _close(C, want, tol=1e-6):
    """Entrywise agreement relative to the matrix's scale."""
    assert C.dtype == torch.float64 and C.shape == want.shape
    err = float((C - want).abs().max() / want.abs().max())
    assert err < tol, err


def test_second_moment_equals_direct_computation(llama, tokenizer):
    model = llama.model
    keys = _all_keys(model, tokenizer, DOCS, LAYERS)
    n_all = keys[1].shape[0]
    assert n_all == sum(len(tokenizer(d)["input_ids"]) for d in DOCS)
    got = compute_second_moments(model, tokenizer, LAYERS, Corpus("t", DOCS), n_all, batch_size=3, progress=False)
    assert sorted(got) == LAYERS
    for l in LAYERS:
        assert got[l].shape == (64, 64)
        _close(got[l], keys[l].T @ keys[l] / n_all)
        torch.testing.assert_close(got[l], got[l].T, atol=0, rtol=0)
    assert not torch.allclose(got[1], got[3])
    # the batch size changes nothing but rounding
    other = compute_second_moments(model, tokenizer, [3], Corpus("t", DOCS), n_all, batch_size=16, progress=False)
    _close(other[3], got[3])


def test_exact_token_budget(llama, tokenizer):
    model = llama.model
    keys = _all_keys(model, tokenizer, DOCS, LAYERS)
    for n in (37, 1, 55):
        got = compute_second_moments(model, tokenizer, LAYERS, Corpus("t", DOCS), n, batch_size=3, progress=False)
        for l in LAYERS:
            k = keys[l][:n]  # the first n tokens in reading order, no more, no fewer
            _close(got[l], k.T @ k / n)
            for wrong in (n - 1, n + 1):
                if wrong > 0:
                    kw = keys[l][:wrong]
                    assert float((got[l] - kw.T @ kw / wrong).abs().max() / got[l].abs().max()) > 1e-4


def test_truncation_to_seq_len(llama, tokenizer):
    model = llama.model
    keys = _all_keys(model, tokenizer, DOCS, [1], seq_len=8)
    n = keys[1].shape[0]
    assert n < sum(len(tokenizer(d)["input_ids"]) for d in DOCS)
    got = compute_second_moments(model, tokenizer, [1], Corpus("t", DOCS), n, seq_len=8, batch_size=2, progress=False)
    _close(got[1], keys[1].T @ keys[1] / n)


class Interrupted(Exception):
    """Stands for Ctrl-C or a lost machine (not KeyboardInterrupt itself: that would stop the whole test run)."""


class _Exploding(tuple):
    """Documents that fail when document `fail_at` or later is read (a pass interrupted mid-way)."""

    fail_at = 0
    fail_before = 0

    def __getitem__(self, i):
        if isinstance(i, int) and (i >= self.fail_at or i < self.fail_before):
            raise Interrupted(f"document {i} was read")
        return super().__getitem__(i)


def _exploding(docs, fail_at=10**9, fail_before=0):
    t = _Exploding(docs)
    t.fail_at, t.fail_before = fail_at, fail_before
    return t


def test_resume_after_interruption(llama, tokenizer, tmp_path):
    model = llama.model
    n = sum(len(tokenizer(d)["input_ids"]) for d in DOCS)
    full = compute_second_moments(model, tokenizer, LAYERS, Corpus("t", DOCS), n, batch_size=2, progress=False)

    ckpt = tmp_path / "partial.safetensors"
    with pytest.raises(Interrupted, match="document 4 was read"):
        compute_second_moments(model, tokenizer, LAYERS, Corpus("t", _exploding(DOCS, fail_at=4)), n, batch_size=2,
                               checkpoint=ckpt, checkpoint_every=1, progress=False)
    assert ckpt.is_file(), "an interrupted pass must leave its checkpoint"
    from safetensors.torch import load_file

    state = load_file(ckpt)
    assert int(state["next_doc"].item()) == 4  # two full batches of two documents were counted
    assert int(state["count"].item()) == sum(len(tokenizer(d)["input_ids"]) for d in DOCS[:4])

    # The resumed pass must not read the documents already counted: they would raise here.
    resumed = compute_second_moments(model, tokenizer, LAYERS, Corpus("t", _exploding(DOCS, fail_before=4)), n,
                                     batch_size=2, checkpoint=ckpt, checkpoint_every=1, progress=False)
    for l in LAYERS:
        torch.testing.assert_close(resumed[l], full[l], atol=0, rtol=0)
    assert not ckpt.exists(), "a finished pass removes its checkpoint"


def test_corpus_too_small(llama, tokenizer):
    n = sum(len(tokenizer(d)["input_ids"]) for d in DOCS)
    with pytest.raises(InputError, match=rf"only {n} tokens.*{n + 1}"):
        compute_second_moments(llama.model, tokenizer, [1], Corpus("t", DOCS), n + 1, progress=False)
    with pytest.raises(InputError):
        compute_second_moments(llama.model, tokenizer, [1], Corpus("t", DOCS), 0, progress=False)
    with pytest.raises(InputError, match=r"0\.\.3"):
        compute_second_moments(llama.model, tokenizer, [4], Corpus("t", DOCS), 10, progress=False)


def test_file_corpus(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[:3])) + "\n")
    c = file_corpus(good)
    assert c.documents == DOCS[:3] and c.id.startswith("file-good-")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text here"}) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl.*record 2.*'text'"):
        file_corpus(bad)
    plain = tmp_path / "plain.txt"
    plain.write_text("First document.\nStill the first.\n\n\nSecond document.\n")
    assert file_corpus(plain).documents == ("First document.\nStill the first.", "Second document.")
    # the id names the content: same name, other text, other id
    other = tmp_path / "other" / "plain.txt"
    other.parent.mkdir()
    other.write_text("Something else entirely.\n")
    assert file_corpus(other).id != file_corpus(plain).id
    with pytest.raises(InputError, match="not found"):
        file_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="no text"):
        file_corpus(empty)


def test_load_or_compute_caches(llama, tokenizer, tmp_path, private_cache, monkeypatch):
    model = llama.model
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    messages = []
    first = load_or_compute(model, tokenizer, [1], str(corpus), 40, progress=False, announce=messages.append)
    assert len(messages) == 1 and "40 tokens" in messages[0]
    cid = file_corpus(corpus).id
    path = stats_path(model, 1, cid, 40)
    assert path.is_file() and str(path).startswith(str(private_cache))
    assert not list(path.parent.glob("partial_*")), "the resume checkpoint is removed once the pass is done"

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics were recomputed although they are cached")

    real = moments.compute_second_moments
    monkeypatch.setattr(moments, "compute_second_moments", no_compute)
    again = load_or_compute(model, tokenizer, [1], str(corpus), 40, progress=False, announce=messages.append)
    assert torch.equal(again[1], first[1]) and len(messages) == 1
    # another budget is another entry
    with pytest.raises(AssertionError, match="recomputed"):
        load_or_compute(model, tokenizer, [1], str(corpus), 41, progress=False, announce=messages.append)
    with pytest.raises(InputError, match="no cached statistics"):
        load_or_compute(model, tokenizer, [1, 2], str(corpus), 40, compute=False, progress=False)

    # a missing layer is computed alone; the cached one is read
    asked = []

    def spy(model_, tok_, layers, *args, **kwargs):
        asked.append(list(layers))
        return real(model_, tok_, layers, *args, **kwargs)

    monkeypatch.setattr(moments, "compute_second_moments", spy)
    both = load_or_compute(model, tokenizer, [2, 1], str(corpus), 40, progress=False, announce=messages.append)
    assert asked == [[2]] and sorted(both) == [1, 2]
    assert torch.equal(both[1], first[1])
    direct = compute_second_moments(model, tokenizer, [1, 2], file_corpus(corpus), 40, progress=False)
    _close(both[2], direct[2])
    _close(both[1], direct[1])


def test_fingerprint_ignores_edited_matrices_only(llama, tiny_model):
    model = llama.model
    fp = model_fingerprint(model)
    W = mlp_out_module(model, 2)
    with torch.no_grad():
        saved = W.weight.clone()
        W.weight.add_(1.0)
        assert model_fingerprint(model) == fp  # C belongs to the base model: edits of W keep it
        W.weight.copy_(saved)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    assert model_fingerprint(other.model) != fp


def test_upper_block_gram_equals_the_full_product():
    from lmedit.stats.moments import add_gram_upper

    g = torch.Generator().manual_seed(0)
    for d in (7, 64, 130):
        k = torch.randn(50, d, generator=g)
        acc = torch.zeros(d, d, dtype=torch.float64)
        add_gram_upper(acc, k)
        torch.testing.assert_close(acc, (k.double().T @ k.double()), atol=1e-4, rtol=1e-5)
        assert torch.equal(acc, acc.T)
    # keys of a bfloat16 model: the product is formed in float32, as exact as the keys themselves allow
    k16 = torch.randn(500, 64, generator=g).bfloat16()
    acc = torch.zeros(64, 64, dtype=torch.float64)
    add_gram_upper(acc, k16)
    torch.testing.assert_close(acc, k16.double().T @ k16.double(), atol=1e-3, rtol=1e-5)


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str, n: int, tokenizer_dir: str) -> None:
    """One torchrun-style rank: the same tiny model and corpus, its share of the batches, all-reduced sums."""
    import torch.distributed as dist
    from conftest import tiny_config
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok))).to(torch.float32).eval()
        got = compute_second_moments(model, tok, LAYERS, Corpus("t", DOCS), n, batch_size=2, progress=False)
        save_file({str(l): C.contiguous() for l, C in got.items()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_ranks_under_torch_distributed_give_the_single_process_c(llama, tokenizer, tmp_path):
    """Two gloo ranks, each running every other batch of the same stream and all-reducing the float64 sums,
    give the C of one process (token budget cut mid-batch included) to float64 rounding, on every rank."""
    import torch.multiprocessing as mp
    from conftest import SMOL_DIR
    from safetensors.torch import load_file

    n = sum(len(tokenizer(d)["input_ids"]) for d in DOCS) - 7  # the cut falls inside the last batch
    single = compute_second_moments(llama.model, tokenizer, LAYERS, Corpus("t", DOCS), n, batch_size=2,
                                    progress=False)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), n, str(SMOL_DIR)), nprocs=2, join=True)
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        for l in LAYERS:
            torch.testing.assert_close(got[str(l)], single[l], rtol=1e-12, atol=1e-15)
