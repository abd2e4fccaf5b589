"""Atomic writes and overwrite protection: no half-written file, no user file lost without --force."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lmedit.errors import InputError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing file or directory unless `force` is set, and a path that cannot be
    created (a file where a directory must be, no write permission): checked before any model work."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} already exists; pass --force to overwrite it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the first ancestor that exists must be a directory
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: no permission to write in {parent}")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a user's output gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (and under a name no other process shares)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


class AtomicDirectory:
    """Build a directory under a temporary name and move it into place only when complete.

    with AtomicDirectory(out, force=False) as tmp: write files into tmp
    """

    def __init__(self, path: str | os.PathLike, force: bool = False):
        self.path = check_writable(path, force)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))
        os.chmod(self.tmp, 0o777 & ~current_umask())
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            if self.path.is_dir():
                shutil.rmtree(self.path)
            else:
                self.path.unlink()
        os.replace(self.tmp, self.path)


def _not_text(path: Path, e: UnicodeDecodeError, expected: str) -> InputError:
    return InputError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start}); expected {expected}")


def read_text(path: str | os.PathLike, expected: str = "a text file") -> str:
    """A UTF-8 text file; missing or binary is an InputError saying what was expected."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_text(path, e, expected) from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing file, a binary file or bad JSON is an InputError naming the line."""
    path = Path(path)
    text = read_text(path, "a JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def iter_jsonl(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, Any]]:
    """(line number, record) of a JSONL file, read lazily; blank lines skipped, a bad line is an InputError
    naming its number. `what` names the file in the not-found message (e.g. "text file")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_text(path, e, f"JSON lines (line {lineno} is not)") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: malformed JSON on line {lineno}: {e.msg}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (blank lines skipped); a bad line is an InputError naming its number."""
    return [record for _, record in iter_jsonl(path)]
