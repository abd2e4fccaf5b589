"""A patch directory as one file to download (.zip), and an uploaded .zip or .tar(.gz) back to a directory.

Unpacking takes only the two files a patch is made of (patch.json, patch.safetensors), by their base names, as
regular files: no path from the archive is ever used, so nothing lands outside the directory given; Patch.load
then checks them against the digests they were saved with.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lmedit.errors import InputError
from lmedit.patches import META_FILE, TENSORS_FILE, Patch

PATCH_FILES = (META_FILE, TENSORS_FILE)
MAX_MEMBER_BYTES = 8 << 30  # larger than any patch of a model that fits here; stops a decompression bomb


def pack(patch: Patch, name: str) -> bytes:
    """`patch` saved as NAME/patch.json + NAME/patch.safetensors inside a zip (stored: safetensors barely shrink)."""
    with tempfile.TemporaryDirectory(prefix="lmedit-ui-") as tmp:
        folder = patch.save(Path(tmp) / name)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
            for file in PATCH_FILES:
                z.write(folder / file, f"{name}/{file}")
    return buffer.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    """The archive's patch files by base name; anything else in it is ignored."""
    found: dict[str, bytes] = {}

    def keep(path: str, size: int, read) -> None:
        base = path.replace("\\", "/").rsplit("/", 1)[-1]
        if base not in PATCH_FILES:
            return
        if base in found:
            raise InputError(f"the archive holds more than one {base}: upload one patch at a time")
        if size > MAX_MEMBER_BYTES:
            raise InputError(f"{path} in the archive is {size} bytes, more than a patch can be")
        found[base] = read()

    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                if not info.is_dir():
                    keep(info.filename, info.file_size, lambda info=info: z.read(info))
        return found
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
            for member in t.getmembers():
                if member.isfile():
                    keep(member.name, member.size, lambda member=member: t.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InputError(f"not a .zip or .tar archive of a patch directory ({e})") from None
    return found


def unpack(data: bytes, into: Path) -> Patch:
    """The patch in an uploaded archive, written into the empty directory `into` and loaded (digests checked)."""
    if not data:
        raise InputError("the uploaded file is empty")
    found = _members(data)
    missing = [f for f in PATCH_FILES if f not in found]
    if missing:
        raise InputError(f"the archive has no {' and no '.join(missing)}: expected a saved patch directory "
                         "(as the page's save button or `lmedit edit --out` writes it)")
    for base, content in found.items():
        (into / base).write_bytes(content)
    return Patch.load(into)
