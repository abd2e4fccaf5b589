"""Key statistics: the sampled second moment against a direct computation over exactly the documents the seeded
shuffle picks, the sample size in documents or tokens, the cut per document, resume, the cache, validation."""

import json
import random
import sys

import numpy as np
import pytest
import torch

import lmedit.stats.moments as moments
from lmedit.errors import InputError
from lmedit.models.arch import mlp_out_module
from lmedit.models.hooks import capture_io
from lmedit.stats.corpora import Corpus, file_corpus
from lmedit.stats.moments import compute_second_moments, load_or_compute, model_fingerprint, stats_path
from lmedit.stats.sampling import Sample, batches

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
CORPUS = Corpus("t", DOCS)
LAYERS = [1, 3]
CONTEXT = 128  # the tiny models' positions: every cut is bounded by it


pytestmark = pytest.mark.usefixtures("tmp_cache")  # every test here caches into its own directory (conftest)


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def _shuffled(n: int, seed: int) -> list[int]:
    """The reference code's draw (util/runningstats.py FixedRandomSubsetSampler): random.Random(seed).shuffle."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _keys(model, tok, docs, layers, max_length=CONTEXT):
    """Each document alone (no padding, no batching), cut to max_length tokens: {layer: [(tokens, d_in) float64]}."""
    modules = {str(l): mlp_out_module(model, l) for l in layers}
    keys = {l: [] for l in layers}
    with torch.no_grad():
        for doc in docs:
            ids = tok(doc, add_special_tokens=True)["input_ids"][:max_length]
            with capture_io(modules, inputs=True) as store:
                model(input_ids=torch.tensor([ids]))
            for l in layers:
                keys[l].append(store[str(l)]["input"][0].double())
    return keys


def _direct(model, tok, sample: Sample, docs=DOCS, layers=LAYERS):
    """C = Σ k kᵀ / N in numpy over the documents `sample` names, walked in the seeded order, as specified."""
    order = _shuffled(len(docs), sample.seed) if sample.n is not None else range(len(docs))
    max_length = min(sample.max_length, CONTEXT)
    keys = _keys(model, tok, [docs[i] for i in order], layers, max_length)
    out = {}
    for l in layers:
        rows, total = [], 0
        for k in keys[l]:
            if sample.n is not None and sample.unit == "documents" and len(rows) == sample.n:
                break
            if sample.n is not None and sample.unit == "tokens":
                k = k[: sample.n - total]
            rows.append(k.numpy())
            total += len(k)
            if sample.n is not None and sample.unit == "tokens" and total == sample.n:
                break
        K = np.concatenate(rows)
        out[l] = torch.from_numpy(K.T @ K / len(K))
    return out, len(K), len(rows)


def _close(C, want, tol=1e-6):
    """Entrywise agreement relative to the matrix's scale."""
    assert C.dtype == torch.float64 and C.shape == want.shape
    err = float((C - want).abs().max() / want.abs().max())
    assert err < tol, err


@pytest.mark.parametrize("sample", [Sample("documents", 4, seed=3), Sample("documents", 2, seed=1),
                                    Sample("tokens", 37, seed=3), Sample("tokens", 1, seed=5),
                                    Sample("tokens", 45, max_length=8, seed=2), Sample("documents", None)])
def test_sampled_c_equals_direct_computation_over_the_drawn_documents(llama, tokenizer, sample):
    model = llama.model
    want, n_tokens, n_docs = _direct(model, tokenizer, sample)
    # a small budget: several padded batches, documents of different lengths side by side
    got = compute_second_moments(model, tokenizer, LAYERS, CORPUS, sample, batch_tokens=40, progress=False)
    assert sorted(got) == LAYERS and (got.n_tokens, got.n_documents) == (n_tokens, n_docs)
    if sample.unit == "tokens" and sample.n is not None:
        assert n_tokens == sample.n  # exactly n tokens, the last document cut
    for l in LAYERS:
        _close(got[l], want[l])
        torch.testing.assert_close(got[l], got[l].T, atol=0, rtol=0)
    assert not torch.allclose(got[1], got[3])
    # the batching changes nothing but rounding
    other = compute_second_moments(model, tokenizer, [3], CORPUS, sample, batch_tokens=4096, progress=False)
    _close(other[3], got[3])


def test_a_token_more_or_fewer_is_another_c(llama, tokenizer):
    got = compute_second_moments(llama.model, tokenizer, [1], CORPUS, Sample("tokens", 37, seed=3), progress=False)
    for wrong in (36, 38):
        want = _direct(llama.model, tokenizer, Sample("tokens", wrong, seed=3), layers=[1])[0][1]
        assert float((got[1] - want).abs().max() / got[1].abs().max()) > 1e-4


def test_seed_picks_other_documents_and_the_whole_corpus_ignores_it(llama, tokenizer):
    model = llama.model
    one, two = (Sample("documents", 3, seed=s) for s in (1, 2))
    assert set(_shuffled(7, 1)[:3]) != set(_shuffled(7, 2)[:3])
    c1 = compute_second_moments(model, tokenizer, [1], CORPUS, one, progress=False)[1]
    c2 = compute_second_moments(model, tokenizer, [1], CORPUS, two, progress=False)[1]
    assert float((c1 - c2).abs().max() / c1.abs().max()) > 1e-3
    _close(c2, _direct(model, tokenizer, two, layers=[1])[0][1])
    whole = [compute_second_moments(model, tokenizer, [1], CORPUS, Sample(u, None, seed=s), progress=False)[1]
             for u, s in (("documents", 1), ("tokens", 7))]
    torch.testing.assert_close(whole[0], whole[1], atol=0, rtol=0)
    _close(whole[0], _direct(model, tokenizer, Sample("documents", None), layers=[1])[0][1])


def test_documents_are_cut_at_the_model_context(llama, tokenizer):
    """max_length 1024 on a 128-position model runs 128 tokens; the statistic says so in its cache key."""
    long_doc = " ".join(["The river flows through the old city and past the cathedral."] * 30)
    docs = (long_doc, DOCS[1])
    assert len(tokenizer(long_doc)["input_ids"]) > 300
    sample = Sample("documents", None, max_length=1024)
    got = compute_second_moments(llama.model, tokenizer, [2], Corpus("long", docs), sample, progress=False)
    want, n_tokens, _ = _direct(llama.model, tokenizer, sample, docs=docs, layers=[2])
    assert got.n_tokens == n_tokens == CONTEXT + len(tokenizer(DOCS[1])["input_ids"])
    _close(got[2], want[2])
    assert got.sample.max_length == CONTEXT and stats_path(llama.model, 2, "long", sample).name == \
        f"layer2_documents-all_max{CONTEXT}.safetensors"


def test_batches_sort_within_windows_and_keep_every_document():
    plan = [(i, m) for i, m in enumerate([5, 30, 7, 30, 2, 100, 9, 1])]
    got = batches(plan, batch_tokens=60, window=4)
    assert sorted(d for b in got for d in b) == sorted(plan)
    assert got[0] == [(1, 30), (3, 30)]  # longest first, ties in plan order, 2 × 30 ≤ 60 padded tokens
    assert [(5, 100)] in got  # longer than the budget: alone
    for b in got:
        assert len(b) == 1 or b[0][1] * len(b) <= 60
        assert {i // 4 for i, _ in b} in ({0}, {1})  # a batch never mixes windows


def test_validation_names_the_valid_units_and_wants_a_positive_count():
    with pytest.raises(InputError) as bad:
        Sample.parse("bogus", 10)
    assert str(bad.value) == "unknown statistics unit (stats_unit, --unit) 'bogus'; valid: documents, tokens"
    for n in (0, -3, "1.5", "ten", True, 2.0, ""):
        with pytest.raises(InputError, match="positive integer or 'all'"):
            Sample.parse("tokens", n)
    for kwargs in (dict(max_length=0), dict(max_length="long"), dict(seed="x")):
        with pytest.raises(InputError):
            Sample.parse("documents", 5, **kwargs)
    assert Sample.parse("Documents", "ALL") == Sample("documents", None)
    assert Sample.parse("tokens", "100_000", "256", "7") == Sample("tokens", 100_000, 256, 7)


def test_config_settings_map_to_the_sample(llama):
    from lmedit.locate.core import LocateConfig

    assert Sample.from_config(LocateConfig()) == Sample()  # one default, wherever it is read
    cfg = LocateConfig(stats_unit="documents", stats_n="all", stats_max_length=64, stats_seed=3)
    assert Sample.from_config(cfg) == Sample("documents", None, 64, 3)
    # an old config's stats_tokens=N is n tokens, and finds the C the old spelling of the call asks for
    old = LocateConfig(stats_unit="documents", stats_tokens=2000)
    assert Sample.from_config(old) == Sample("tokens", 2000)
    assert stats_path(llama.model, 1, "t", old) == stats_path(llama.model, 1, "t", 2000)
    with pytest.raises(InputError, match="valid: documents, tokens"):
        Sample.from_config(LocateConfig(stats_unit="pages"))


class Interrupted(Exception):
    """Stands for Ctrl-C or a lost machine (not KeyboardInterrupt itself: that would stop the whole test run)."""


def _count_forwards(model, fail_at=None):
    """Count the statistics pass's forwards (one per batch); raise Interrupted on forward number `fail_at`."""
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Interrupted(f"forward {calls['n']}")

    return calls, mlp_out_module(model, 0).register_forward_pre_hook(hook)


def test_resume_after_interruption_gives_the_same_c(llama, tokenizer, tmp_path):
    from safetensors.torch import load_file

    model = llama.model
    sample = Sample("documents", 6, seed=4)  # a seeded draw, the last document cut
    n_batches = len(moments.plan_batches(tokenizer, CORPUS, moments.as_sample(sample, model), batch_tokens=20))
    assert n_batches >= 4
    calls, handle = _count_forwards(model)
    try:
        full = compute_second_moments(model, tokenizer, LAYERS, CORPUS, sample, batch_tokens=20, progress=False)
    finally:
        handle.remove()
    assert calls["n"] == n_batches

    ckpt = tmp_path / "partial.safetensors"
    calls, handle = _count_forwards(model, fail_at=4)
    try:
        with pytest.raises(Interrupted):
            compute_second_moments(model, tokenizer, LAYERS, CORPUS, sample, batch_tokens=20, checkpoint=ckpt,
                                   checkpoint_every=1, progress=False)
    finally:
        handle.remove()
    state = load_file(ckpt)
    assert int(state["next_batch"].item()) == 3  # three batches counted, the fourth interrupted
    assert 0 < int(state["count"].item()) < full.n_tokens

    calls, handle = _count_forwards(model)
    try:
        resumed = compute_second_moments(model, tokenizer, LAYERS, CORPUS, sample, batch_tokens=20, checkpoint=ckpt,
                                         checkpoint_every=1, progress=False)
    finally:
        handle.remove()
    assert calls["n"] == n_batches - 3, "the resumed pass runs only the batches not yet counted"
    for l in LAYERS:
        torch.testing.assert_close(resumed[l], full[l], atol=0, rtol=0)
    assert resumed.n_tokens == full.n_tokens and not ckpt.exists(), "a finished pass removes its checkpoint"

    # a checkpoint of another plan (another sample under the same name) is not mixed in
    moments._save_checkpoint(ckpt, {l: torch.ones(64, 64, dtype=torch.float64) for l in LAYERS}, 10, 2, [[]] * 9, 999)
    fresh = compute_second_moments(model, tokenizer, LAYERS, CORPUS, sample, batch_tokens=20, checkpoint=ckpt,
                                   progress=False)
    torch.testing.assert_close(fresh[1], full[1], atol=0, rtol=0)


def test_too_few_tokens_and_bad_layers(llama, tokenizer):
    n = sum(len(tokenizer(d)["input_ids"]) for d in DOCS)
    with pytest.raises(InputError, match=rf"only {n} tokens.*{n + 1}.*stats_n=all"):
        compute_second_moments(llama.model, tokenizer, [1], CORPUS, Sample("tokens", n + 1), progress=False)
    got = compute_second_moments(llama.model, tokenizer, [1], CORPUS, Sample("documents", 100), progress=False)
    assert got.n_documents == len(DOCS) and got.n_tokens == n  # more documents than there are: all of them
    with pytest.raises(InputError, match=r"0\.\.3"):
        compute_second_moments(llama.model, tokenizer, [4], CORPUS, 10, progress=False)


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


def test_load_or_compute_caches_under_the_unit(llama, tokenizer, tmp_path, tmp_cache, monkeypatch):
    model = llama.model
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    cid = file_corpus(corpus).id
    messages = []
    first = load_or_compute(model, tokenizer, [1], str(corpus), Sample("tokens", 40), progress=False,
                            announce=messages.append)
    assert len(messages) == 1 and "40 tokens" in messages[0] and "seed 1" in messages[0]
    path = stats_path(model, 1, cid, Sample("tokens", 40))
    assert path.is_file() and str(path).startswith(str(tmp_cache))
    assert path.name == f"layer1_tokens40_max{CONTEXT}_seed1.safetensors"
    assert not list(path.parent.glob("partial_*")), "the resume checkpoint is removed once the pass is done"
    assert first.description.startswith(f"40 tokens in {first.n_documents} documents of {cid}: 40 tokens")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["unit"], meta["n"], meta["n_tokens"], meta["seed"]) == ("tokens", "40", "40", "1")

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics were recomputed although they are cached")

    real = moments.compute_second_moments
    monkeypatch.setattr(moments, "compute_second_moments", no_compute)
    again = load_or_compute(model, tokenizer, [1], str(corpus), Sample("tokens", 40), progress=False)
    assert torch.equal(again[1], first[1]) and again.description == first.description
    # another size, unit or seed is another entry
    for other in (Sample("tokens", 41), Sample("documents", 40), Sample("tokens", 40, seed=2)):
        with pytest.raises(AssertionError, match="recomputed"):
            load_or_compute(model, tokenizer, [1], str(corpus), other, progress=False, announce=messages.append)
    with pytest.raises(InputError, match="no cached statistics"):
        load_or_compute(model, tokenizer, [1, 2], str(corpus), Sample("tokens", 40), compute=False, progress=False)

    # a missing layer is computed alone; the cached one is read
    asked = []

    def spy(model_, tok_, layers, *args, **kwargs):
        asked.append(list(layers))
        return real(model_, tok_, layers, *args, **kwargs)

    monkeypatch.setattr(moments, "compute_second_moments", spy)
    both = load_or_compute(model, tokenizer, [2, 1], str(corpus), Sample("tokens", 40), progress=False,
                           announce=messages.append)
    assert asked == [[2]] and sorted(both) == [1, 2]
    assert torch.equal(both[1], first[1])
    direct = real(model, tokenizer, [1, 2], file_corpus(corpus), Sample("tokens", 40), progress=False)
    _close(both[2], direct[2])
    _close(both[1], direct[1])

    # the whole corpus is one entry: 'all', or at least as many documents as there are, whatever the seed
    whole = load_or_compute(model, tokenizer, [1], str(corpus), Sample("documents", None), progress=False,
                            announce=messages.append)
    assert stats_path(model, 1, cid, Sample("documents", None)).name == f"layer1_documents-all_max{CONTEXT}.safetensors"
    n_calls = len(asked)
    same = load_or_compute(model, tokenizer, [1], str(corpus), Sample("documents", 7, seed=9), progress=False)
    assert len(asked) == n_calls and torch.equal(same[1], whole[1]) and same.n_documents == len(DOCS)


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


def _cli(monkeypatch, capsys, *args):
    from lmedit import cli

    monkeypatch.setattr(sys, "argv", ["lmedit", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


def test_cli_rejects_a_bad_unit_or_count_in_one_line(llama, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "tiny"
    llama.model.save_pretrained(model_dir)
    llama.tokenizer.save_pretrained(model_dir)
    capsys.readouterr()  # the save's progress bar
    cases = [(["stats", "compute", "--model", str(model_dir), "--layers", "1", "--unit", "bogus"],
              "valid: documents, tokens"),
             (["stats", "compute", "--model", str(model_dir), "--layers", "1", "--n", "0"], "positive integer"),
             (["stats", "inspect", "--model", str(model_dir), "--layer", "1", "--unit", "pages"],
              "valid: documents, tokens")]
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
                                "target_new": "Rome", "target_true": "Paris"}) + "\n")
    edit = ["edit", "--model", str(model_dir), "--method", "rome", "--requests", str(reqs), "--set", "layers=1"]
    cases += [(edit + ["--out", str(tmp_path / "p1"), "--set", "stats_unit=bogus"], "documents, tokens"),
              (edit + ["--out", str(tmp_path / "p2"), "--set", "stats_n=-5"], "stats_n must be an integer >= 1 or 'all'")]
    for args, phrase in cases:
        code, err = _cli(monkeypatch, capsys, *args)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and phrase in err and "Traceback" not in err, err
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


def test_patch_and_cli_name_the_unit(llama, tmp_path, monkeypatch, capsys):
    """`lmedit stats compute` then `lmedit edit` on its C: the patch's covariance line and config say what C
    averages over, and the edit finds the C the stats command cached (the same settings, the same file)."""
    from lmedit import cli
    from lmedit.patches import Patch

    model_dir = tmp_path / "tiny"
    llama.model.save_pretrained(model_dir)
    llama.tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    monkeypatch.setattr(sys, "argv", ["lmedit", "stats", "compute", "--model", str(model_dir), "--layers", "1",
                                      "--corpus", str(corpus), "--unit", "documents", "--n", "3", "--seed", "5"])
    cli.main()
    out = capsys.readouterr().out
    assert "3 documents" in out and f"layer1_documents3_max{CONTEXT}_seed5.safetensors" in out.replace("\n", "")
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
                                "target_new": "Rome", "target_true": "Paris"}) + "\n")
    monkeypatch.setattr(sys, "argv", ["lmedit", "edit", "--model", str(model_dir), "--method", "rome", "--requests",
                                      str(reqs), "--out", str(tmp_path / "p"), "--set", "layers=1",
                                      "--set", f"stats_corpus={corpus}", "--set", "stats_unit=documents",
                                      "--set", "stats_n=3", "--set", "stats_seed=5", "--set", "value.steps=2",
                                      "--set", "n_context=1"])
    cli.main()
    assert "computing key statistics" not in capsys.readouterr().out  # the cached C was used
    meta = Patch.load(tmp_path / "p").meta
    assert meta["config"]["stats_unit"] == "documents" and meta["config"]["stats_n"] == "3"
    assert " 3 documents (documents in random order, seed 5" in meta["covariance"]
    assert meta["covariance"].startswith("second moment over ") and " tokens in 3 documents of file-corpus-" in \
        meta["covariance"]


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str, sample, tokenizer_dir: str) -> None:
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
        got = compute_second_moments(model, tok, LAYERS, CORPUS, sample, batch_tokens=40, progress=False)
        save_file({str(l): C.contiguous() for l, C in got.items()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_ranks_under_torch_distributed_give_the_single_process_c(llama, tokenizer, tmp_path):
    """Two gloo ranks, each running every other batch of the same drawn sample and all-reducing the float64 sums,
    give the C of one process (the last document cut included) to float64 rounding, on every rank."""
    import torch.multiprocessing as mp
    from conftest import SMOL_DIR
    from safetensors.torch import load_file

    sample = Sample("tokens", sum(len(tokenizer(d)["input_ids"]) for d in DOCS) - 7, seed=3)
    single = compute_second_moments(llama.model, tokenizer, LAYERS, CORPUS, sample, batch_tokens=40, progress=False)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), sample, str(SMOL_DIR)), nprocs=2,
             join=True)
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        for l in LAYERS:
            torch.testing.assert_close(got[str(l)], single[l], rtol=1e-12, atol=1e-15)
