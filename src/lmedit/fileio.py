"""Atomic writes and overwrite protection: no half-written file, no user file lost without --force; cache
entries verified as they are read, moved aside when damaged, computed under a lock."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
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


def _not_text(path: Path, line: int, expected: str) -> InputError:
    return InputError(f"{path}: not UTF-8 text (undecodable byte on line {line}); expected {expected}")


def read_text(path: str | os.PathLike, expected: str = "a text file") -> str:
    """A UTF-8 text file; missing or binary is an InputError saying what was expected."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_text(path, e.object[:e.start].count(b"\n") + 1, expected) from None


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
            except UnicodeDecodeError:
                raise _not_text(path, lineno, "JSON lines") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: malformed JSON on line {lineno}: {e.msg}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (blank lines skipped); a bad line is an InputError naming its number."""
    return [record for _, record in iter_jsonl(path)]


# Caches: an entry is verified as it is read; a damaged one is moved aside (kept for a look, never read again)
# and recomputed. Computing an entry happens under a lock beside it, so two processes compute it once.

class Damaged(Exception):
    """A cache entry that does not verify (raised by the reader given to `read_verified`)."""


def move_aside(path: str | os.PathLike, reason: str) -> Path | None:
    """Rename a damaged cache entry (file or directory) to `<name>.damaged-<timestamp>` and say so in one line.
    None when another process has already moved it; an InputError naming the entry when it cannot be moved."""
    import time

    from lmedit.errors import warn

    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None  # another process that found it damaged moved it first
    except OSError as e:
        raise InputError(f"damaged cache entry {path} ({reason}) cannot be moved aside ({e.strerror}); "
                         "delete it and run again") from None
    warn(f"damaged cache entry {path} ({reason}); moved aside to {dest.name}, to be computed again")
    return dest


def read_verified(path: str | os.PathLike, read):
    """`read(path)`, or None when there is no entry or it is damaged: an entry `read` refuses (Damaged, or any
    error of the parser under it) is moved aside with a one-line warning, never half-trusted; the caller
    recomputes it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - whatever the parser says, the entry is not one to trust
        move_aside(path, error_line(e))
        return None


def error_line(e: BaseException) -> str:
    """An exception as a short reason: its first line (safetensors' "Error while deserializing header: " cut)."""
    text = str(e).strip()
    return text.splitlines()[0].removeprefix("Error while deserializing header: ") if text else type(e).__name__


def tensor_digest(tensors: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a dict of tensors, in name order (a cache entry's
    content digest, kept in its metadata)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_digest(tensors: dict, meta: dict | None) -> None:
    """Raise Damaged when `meta` records a sha256 (`tensor_digest`) that `tensors` do not match; entries written
    before digests were kept have none and pass."""
    if meta and "sha256" in meta and tensor_digest(tensors) != meta["sha256"]:
        raise Damaged("its content does not match its digest")


@contextmanager
def file_lock(path: str | os.PathLike, on_wait=None) -> Iterator[None]:
    """An exclusive lock (fcntl.flock) on the file `path`, created if needed: held for the block, released on
    exit or when the process dies (a killed holder leaves no stale lock). `on_wait()` is called once if another
    process holds it. Where flock is unavailable the block runs unlocked (writers still replace atomically)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
