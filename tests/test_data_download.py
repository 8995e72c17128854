"""Downloads against a local ``http.server`` on 127.0.0.1 (nothing leaves this machine)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import data_fixtures as fx  # noqa: E402

from bnlab.data import download as dl  # noqa: E402
from bnlab.data import load  # noqa: E402


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server serving ``tmp_path/www``; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_Quiet, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_download_file_good_and_corrupt(server, tmp_path):
    www, base = server
    good = b"payload" * 1000
    (www / "good.bin").write_bytes(good)
    (www / "bad.bin").write_bytes(good[:-1] + b"X")
    dest_dir = tmp_path / "dl"
    out = dl.download_file(base + "good.bin", dest_dir / "good.bin", _md5(good), progress=False)
    assert out.read_bytes() == good
    with pytest.raises(dl.DownloadError, match="does not match the expected"):
        dl.download_file(base + "bad.bin", dest_dir / "bad.bin", _md5(good), progress=False)
    with pytest.raises(dl.DownloadError, match="404"):
        dl.download_file(base + "missing.bin", dest_dir / "missing.bin", _md5(good), progress=False)
    assert sorted(p.name for p in dest_dir.iterdir()) == ["good.bin"]  # no partial or temp files left
    with pytest.raises(ValueError, match="url must be http"):
        dl.download_file("file:///etc/passwd", dest_dir / "x", _md5(good))


def test_corrupt_download_keeps_existing_file(server, tmp_path):
    www, base = server
    (www / "f.bin").write_bytes(b"corrupted")
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")
    with pytest.raises(dl.DownloadError):
        dl.download_file(base + "f.bin", dest, _md5(b"expected"), progress=False)
    assert dest.read_bytes() == b"old" and list(tmp_path.glob(".f.bin.*")) == []


def test_mirror_env_and_fallback(server, tmp_path, monkeypatch):
    www, base = server
    arrays = fx.mnist_arrays()
    src = fx.write_idx_folder(www, arrays)
    resources = tuple(
        dl.Resource(f"{s}.gz", _md5((src / f"{s}.gz").read_bytes()))
        for pair in fx.IDX_NAMES.values()
        for s in pair
    )
    monkeypatch.setitem(dl.RESOURCES, "mnist", resources)
    # first mirror is dead (404 on a path that does not exist), second is good
    monkeypatch.setitem(dl.MIRRORS, "mnist", [base + "nowhere/", base])
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    ds = load("mnist", root=tmp_path / "data", download=True, progress=False)
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), arrays["x_train"])
    # BNLAB_DATA_MIRROR replaces every mirror
    monkeypatch.setenv(dl.MIRROR_ENV, base + "nowhere")
    assert dl.mirrors_for("mnist") == [base + "nowhere"]
    with pytest.raises(dl.DownloadError, match="could not download train-images-idx3-ubyte.gz"):
        dl.download_dataset("mnist", tmp_path / "other", progress=False)
    # files already present with the right md5 are not fetched again (the mirror is dead now)
    assert len(dl.download_dataset("mnist", tmp_path / "data" / "MNIST" / "raw", progress=False)) == 4


def _serve_idx(www: Path, name: str, seed: int, monkeypatch, base: str) -> dict[str, np.ndarray]:
    """Generated IDX files of ``name`` served at ``base/name/``, registered as its official files."""
    arrays = fx.mnist_arrays(seed=seed)
    arrays["y_train"] = (arrays["y_train"] + seed) % 10  # distinct label files, as the official ones are
    src = fx.write_idx_folder(www / name, arrays)
    files = [f"{s}.gz" for pair in fx.IDX_NAMES.values() for s in pair]
    official = tuple(dl.Resource(f, _md5((src / f).read_bytes())) for f in files)
    monkeypatch.setitem(dl.RESOURCES, name, official)
    monkeypatch.setitem(dl.MIRRORS, name, [f"{base}{name}/"])
    return arrays


def test_mnist_and_fashion_mnist_share_a_root(server, tmp_path, monkeypatch):
    """Both use the same IDX file names: downloads go to root/MNIST/raw and root/FashionMNIST/raw, and
    a folder holding the *other* dataset's official files (md5) is never taken for this one."""
    www, base = server
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    digits = _serve_idx(www, "mnist", 1, monkeypatch, base)
    fashion = _serve_idx(www, "fashion_mnist", 2, monkeypatch, base)
    root = tmp_path / "data"
    m = load("mnist", root=root, download=True, progress=False)
    f = load("fashion_mnist", root=root, download=True, progress=False)
    np.testing.assert_array_equal(m.x_train[:, 0].numpy(), digits["x_train"])
    np.testing.assert_array_equal(f.x_train[:, 0].numpy(), fashion["x_train"])
    assert Path(m.source) == root / "MNIST" / "raw" and Path(f.source) == root / "FashionMNIST" / "raw"
    # the official MNIST files loose in a root: found as mnist, skipped for fashion_mnist
    loose = Path(shutil.copytree(www / "mnist", tmp_path / "loose"))  # byte-identical "official" files
    assert load("mnist", root=loose).source == str(loose)
    with pytest.raises(FileNotFoundError, match="no data under root"):
        load("fashion_mnist", root=loose)
    from bnlab.data.discover import find_datasets

    assert find_datasets([str(loose)]) == {"mnist": str(loose)}


def test_cifar_download_via_env_mirror(server, tmp_path, monkeypatch):
    www, base = server
    arrays = fx.cifar_arrays("cifar10")
    tar = fx.write_cifar_tarball(www, "cifar10", fx.cifar_files("cifar10", arrays))
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (dl.Resource(tar.name, _md5(tar.read_bytes())),))
    monkeypatch.setenv(dl.MIRROR_ENV, base)
    root = tmp_path / "data"
    ds = load("cifar10", root=root, download=True, verify=False, progress=False)
    np.testing.assert_array_equal(ds.x_test.numpy().transpose(0, 2, 3, 1), arrays["x_test"])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar_corrupted_archive_rejected(server, tmp_path, monkeypatch):
    www, base = server
    tar = fx.write_cifar_tarball(www, "cifar10", fx.cifar_files("cifar10", fx.cifar_arrays("cifar10")))
    good_md5 = _md5(tar.read_bytes())
    tar.write_bytes(gzip.compress(b"garbage"))  # the server now serves a corrupted archive
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (dl.Resource(tar.name, good_md5),))
    monkeypatch.setenv(dl.MIRROR_ENV, base)
    root = tmp_path / "data"
    with pytest.raises(dl.DownloadError, match="md5"):
        load("cifar10", root=root, download=True, verify=False, progress=False)
    assert list(root.iterdir()) == []


def test_official_tables():
    assert {r.filename for r in dl.RESOURCES["cifar100"]} == {"cifar-100-python.tar.gz"}
    assert all(len(r.md5) == 32 for rs in dl.RESOURCES.values() for r in rs)
    assert dl.RESOURCES["mnist"][0].md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    with pytest.raises(ValueError, match="cannot be downloaded"):
        dl.download_dataset("digits", "/nonexistent")
