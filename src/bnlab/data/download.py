"""Download the official dataset archives over HTTP(S) with md5 verification and atomic writes.

A file is streamed into a hidden temporary file next to its destination while its md5 is computed;
only when the md5 matches is it renamed (``os.replace``, atomic on one filesystem) to its final
name. A failed or corrupted download leaves nothing behind. Mirrors are tried in order.

Overriding where files come from (tests, air-gapped clusters):

* ``MIRRORS[name]`` is a module-level list of base URLs per dataset (edit it in-process);
* the ``BNLAB_DATA_MIRROR`` environment variable, if set, is a base URL used *instead of* all
  built-in mirrors, for every dataset: file ``f`` is fetched from ``$BNLAB_DATA_MIRROR/f``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Resource",
    "RESOURCES",
    "MIRRORS",
    "MIRROR_ENV",
    "DownloadError",
    "download_file",
    "download_dataset",
    "mirrors_for",
]

MIRROR_ENV = "BNLAB_DATA_MIRROR"


@dataclass(frozen=True)
class Resource:
    """One file of a dataset: its official name and md5."""

    filename: str
    md5: str


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

#: dataset -> files to fetch (md5 from the official releases; see shared/methods/ecosystem.md §6)
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist": tuple(
        Resource(f, m)
        for f, m in zip(
            _MNIST_FILES,
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        )
    ),
    "fashion_mnist": tuple(
        Resource(f, m)
        for f, m in zip(
            _MNIST_FILES,
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        )
    ),
    "cifar10": (Resource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
    "cifar100": (Resource("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
}

#: dataset -> base URLs, tried in order (a file's URL is ``base.rstrip('/') + '/' + filename``)
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}


class DownloadError(RuntimeError):
    """Every mirror failed, or the file fetched did not match its md5."""


def mirrors_for(name: str) -> list[str]:
    """Base URLs for dataset ``name``: ``$BNLAB_DATA_MIRROR`` alone if set, else ``MIRRORS[name]``."""
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        return [env]
    if name not in MIRRORS:
        raise ValueError(f"no download mirrors for dataset {name!r}; expected one of {sorted(MIRRORS)}")
    return list(MIRRORS[name])


def _join(base: str, filename: str) -> str:
    return base.rstrip("/") + "/" + urllib.parse.quote(filename)


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    chunk: int = 1 << 16,
) -> Path:
    """Fetch ``url`` into ``dest`` if its md5 is ``md5``; atomic (temp file + rename).

    Only ``http``/``https`` URLs are accepted. On an md5 mismatch or any transfer error the
    temporary file is removed and ``DownloadError`` is raised; ``dest`` is left untouched.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"url must be http(s), got {url!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    h = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "bnlab-data/0.1"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - scheme checked above
                total = resp.headers.get("Content-Length")
                bar = _progress_bar(int(total) if total and total.isdigit() else None, dest.name, progress)
                try:
                    for block in iter(lambda: resp.read(chunk), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
                finally:
                    bar.close()
        got = h.hexdigest()
        if got != md5:
            raise DownloadError(
                f"{url}: md5 {got} does not match the expected {md5}; the download is "
                f"corrupted or not the official file and was discarded"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        _unlink(tmp)
        raise DownloadError(f"{url}: download failed ({type(e).__name__}: {e})") from None
    except BaseException:
        _unlink(tmp)
        raise
    return dest


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _progress_bar(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False
    )


def download_dataset(
    name: str, root: str | os.PathLike, *, progress: bool = True, timeout: float = 60.0
) -> list[Path]:
    """Make sure every file of ``RESOURCES[name]`` is in ``root`` with its md5, downloading what is
    missing or corrupt from the mirrors. Returns the file paths."""
    from .archives import md5_file

    if name not in RESOURCES:
        raise ValueError(f"dataset {name!r} cannot be downloaded; expected one of {sorted(RESOURCES)}")
    root = Path(root)
    paths = []
    for res in RESOURCES[name]:
        dest = root / res.filename
        if dest.is_file() and md5_file(dest) == res.md5:
            paths.append(dest)
            continue
        errors = []
        for base in mirrors_for(name):
            try:
                paths.append(
                    download_file(
                        _join(base, res.filename), dest, res.md5, progress=progress, timeout=timeout
                    )
                )
                break
            except DownloadError as e:
                errors.append(str(e))
        else:
            raise DownloadError(f"could not download {res.filename} for {name}:\n  " + "\n  ".join(errors))
    return paths
