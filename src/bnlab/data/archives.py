"""Safe reading of compressed files and tar archives (no code execution, bounded sizes).

* :func:`read_bytes` reads a plain or gzip file (by magic bytes) with a cap on the decompressed
  size; a truncated or corrupt gzip raises ``ValueError`` naming the file.
* :func:`read_tar_members` reads chosen regular-file members straight out of a tar archive into
  memory, without extracting anything to disk.
* :func:`safe_extract_tar` extracts a tar archive into a folder when a folder is really needed; it
  refuses absolute paths, ``..`` components, symbolic/hard links, devices and FIFOs, and caps the
  total extracted size and member count (tar bombs).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

__all__ = [
    "ArchiveError",
    "read_bytes",
    "read_tar_members",
    "safe_extract_tar",
    "md5_file",
    "md5_bytes",
    "DEFAULT_MAX_BYTES",
]

#: default cap on any decompressed file / total extraction (4 GiB; CIFAR-100's tarball unpacks to ~180 MB)
DEFAULT_MAX_BYTES = 4 << 30
_GZIP_MAGIC = b"\x1f\x8b"


class ArchiveError(ValueError):
    """A file or archive that is corrupt, truncated, oversized or unsafe to unpack."""


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, streamed in ``chunk``-byte blocks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _read_capped(stream, limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ArchiveError(f"{what}: decompressed size exceeds max_bytes={limit}")
    return data


def read_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Contents of ``path``, gunzipped if it starts with the gzip magic; at most ``max_bytes``.

    Raises ``ArchiveError`` (a ``ValueError``) for a truncated/corrupt gzip or an oversized file.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        if magic != _GZIP_MAGIC:
            return _read_capped(raw, max_bytes, str(path))
        try:
            with gzip.GzipFile(fileobj=raw) as gz:
                return _read_capped(gz, max_bytes, str(path))
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            raise ArchiveError(f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e})") from None


def _check_member(m: tarfile.TarInfo, archive: str) -> PurePosixPath:
    """The member's safe relative path, or ``ArchiveError`` if it is unsafe to unpack."""
    name = m.name
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to unpack")
    if ".." in p.parts or "\\" in name:
        raise ArchiveError(f"{archive}: member {name!r} escapes the target folder ('..' or '\\'); refusing")
    if m.issym() or m.islnk():
        raise ArchiveError(f"{archive}: member {name!r} is a link; links are not allowed")
    if not (m.isfile() or m.isdir()):
        raise ArchiveError(f"{archive}: member {name!r} is a device, FIFO or special file; refusing")
    return p


def _norm_name(name: str) -> str:
    """Member name without leading ``./`` (re-packed archives often have it)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ArchiveError(f"{path}: not a readable tar archive ({type(e).__name__}: {e})") from None


def read_tar_members(
    path: str | os.PathLike, names: Iterable[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, bytes]:
    """Read the regular-file members whose path is in ``names`` (posix form; a leading ``./`` is
    ignored on both sides) into memory; the result is keyed by the name without ``./``.

    Nothing is written to disk. Members that are links or special files are refused even if
    requested; the total size read is capped by ``max_bytes``. Missing names are simply absent from
    the result (the caller decides whether that is an error).
    """
    path = Path(path)
    wanted = {_norm_name(n) for n in names}
    out: dict[str, bytes] = {}
    total = 0
    with _open_tar(path) as tar:
        try:
            for m in tar:
                key = _norm_name(m.name)
                if key not in wanted:
                    continue
                _check_member(m, str(path))
                if not m.isfile():
                    continue
                total += m.size
                if total > max_bytes:
                    raise ArchiveError(f"{path}: members exceed max_bytes={max_bytes}")
                f = tar.extractfile(m)
                if f is None:  # pragma: no cover - isfile() guarantees a file object
                    continue
                data = f.read()
                if len(data) != m.size:
                    raise ArchiveError(
                        f"{path}: member {m.name!r} is truncated ({len(data)} of {m.size} bytes)"
                    )
                out[key] = data
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ArchiveError(
                f"{path}: corrupt or truncated tar archive ({type(e).__name__}: {e})"
            ) from None
    return out


def safe_extract_tar(
    path: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = 100_000,
) -> list[Path]:
    """Extract every member of tar ``path`` under ``dest`` after checking *all* members first.

    Refuses (``ArchiveError``, nothing written) absolute paths, ``..``, links, devices/FIFOs, more
    than ``max_members`` members, or a declared total size above ``max_bytes``. Returns the files
    written.
    """
    path, dest = Path(path), Path(dest)
    with _open_tar(path) as tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ArchiveError(
                f"{path}: corrupt or truncated tar archive ({type(e).__name__}: {e})"
            ) from None
        if len(members) > max_members:
            raise ArchiveError(f"{path}: {len(members)} members exceed max_members={max_members}")
        rels = [_check_member(m, str(path)) for m in members]
        total = sum(m.size for m in members if m.isfile())
        if total > max_bytes:
            raise ArchiveError(f"{path}: declared content {total} bytes exceeds max_bytes={max_bytes}")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written: list[Path] = []
        try:
            for m, rel in zip(members, rels):
                target = (root / Path(*rel.parts)).resolve() if rel.parts else root
                if target != root and root not in target.parents:
                    raise ArchiveError(f"{path}: member {m.name!r} resolves outside {dest}")
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:  # pragma: no cover
                    continue
                with open(target, "wb") as f:
                    remaining = m.size
                    while remaining > 0:
                        block = src.read(min(remaining, 1 << 20))
                        if not block:
                            raise ArchiveError(f"{path}: member {m.name!r} is truncated")
                        f.write(block)
                        remaining -= len(block)
                written.append(target)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ArchiveError(
                f"{path}: corrupt or truncated tar archive ({type(e).__name__}: {e})"
            ) from None
    return written
