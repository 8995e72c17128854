"""Dataset file formats: IDX (MNIST family), CIFAR python pickles (folder + tarball), .npz, safe
unpickling, safe tar handling, ImageNet-style folders and discovery. All files are generated small."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import data_fixtures as fx  # noqa: E402

from bnlab.data import load  # noqa: E402
from bnlab.data.archives import ArchiveError, read_bytes, read_tar_members, safe_extract_tar  # noqa: E402
from bnlab.data.discover import find_datasets  # noqa: E402
from bnlab.data.mnist import parse_idx  # noqa: E402
from bnlab.data.safe_pickle import UnsafePickleError, safe_loads  # noqa: E402

SHARED = Path("/work/shared/data")


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_parse_idx_roundtrip_all_types(dtype):
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    out = parse_idx(fx.idx_bytes(arr))
    assert out.dtype.isnative and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"\x01" + b[1:], "bad IDX magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad IDX magic"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:3], "too short"),
    ],
)
def test_parse_idx_rejects_corrupt(mutate, match):
    data = fx.idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=match):
        parse_idx(mutate(data), source="x")


@pytest.mark.parametrize("layout", ["root-gz", "raw-gz", "root-plain", "root-dotnames"])
def test_mnist_idx_layouts(tmp_path, layout):
    arrays = fx.mnist_arrays()
    folder = tmp_path / "MNIST" / "raw" if layout == "raw-gz" else tmp_path
    fx.write_idx_folder(folder, arrays, gz=layout != "root-plain", dot_names=layout == "root-dotnames")
    ds = load("mnist", root=str(tmp_path))
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), arrays["x_train"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert ds.crop_padding == 2 and ds.flip is False and ds.classes == [str(i) for i in range(10)]


def test_fashion_mnist_raw_folder_and_classes(tmp_path):
    arrays = fx.mnist_arrays(seed=3)
    fx.write_idx_folder(tmp_path / "FashionMNIST" / "raw", arrays)
    ds = load("fashion_mnist", root=tmp_path)
    np.testing.assert_array_equal(ds.x_test[:, 0].numpy(), arrays["x_test"])
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot"
    with pytest.raises(FileNotFoundError, match="no data under root"):
        load("mnist", root=tmp_path)  # the FashionMNIST folder is not MNIST


def test_mnist_truncated_gz_and_wrong_sizes(tmp_path):
    arrays = fx.mnist_arrays()
    fx.write_idx_folder(tmp_path, arrays)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        load("mnist", root=tmp_path)
    p.write_bytes(good)
    lab = tmp_path / "train-labels-idx1-ubyte.gz"
    lab.write_bytes(gzip.compress(fx.idx_bytes(np.zeros(29, np.uint8))))  # 30 images, 29 labels
    with pytest.raises(ValueError, match="30 images but .* 29 labels"):
        load("mnist", root=tmp_path)
    lab.write_bytes(gzip.compress(fx.idx_bytes(np.full(30, 10, np.uint8))))
    with pytest.raises(ValueError, match="label 10"):
        load("mnist", root=tmp_path)
    p.write_bytes(gzip.compress(fx.idx_bytes(np.zeros((30, 28, 27), np.uint8))))
    with pytest.raises(ValueError, match=r"expected uint8 \(28, 28\)"):
        load("mnist", root=tmp_path)


def test_read_bytes_caps_decompressed_size(tmp_path, monkeypatch):
    p = tmp_path / "bomb.gz"
    p.write_bytes(gzip.compress(b"\x00" * 100_000))
    assert len(read_bytes(p)) == 100_000
    with pytest.raises(ArchiveError, match="max_bytes"):
        read_bytes(p, max_bytes=1000)
    # the MNIST loader applies its own cap to each IDX file
    folder = fx.write_idx_folder(tmp_path / "idx", fx.mnist_arrays())
    monkeypatch.setattr("bnlab.data.mnist.MAX_IDX_BYTES", 1000)  # < the 30 x 28 x 28 train images
    with pytest.raises(ArchiveError, match="max_bytes=1000"):
        load("mnist", root=folder)


def test_missing_root_and_bad_kwargs(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load("mnist", root=tmp_path)
    with pytest.raises(ValueError, match="root is required"):
        load("cifar10")
    with pytest.raises(ValueError, match="unexpected keyword"):
        load("mnist", root=tmp_path, colour=True)


# ------------------------------------------------------------------------------------------ npz
def test_npz_mnist_file_and_folder(tmp_path):
    arrays = fx.mnist_arrays()
    f = fx.write_npz(tmp_path / "mnist.npz", arrays, classes=[f"d{i}" for i in range(10)])
    for root in (f, tmp_path):
        ds = load("mnist", root=root)
        np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), arrays["x_train"])
        assert ds.classes[3] == "d3"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x_train=np.zeros((30, 28, 28), np.float32)), "expected uint8"),
        (dict(x_train=np.zeros((30, 27, 28), np.uint8)), r"expected \(N, 28, 28\)"),
        (dict(y_train=np.zeros(29, np.int64)), "30 x_train images but 29"),
        (dict(y_test=np.zeros((20, 1), np.int64)), "1-D integer"),
        (dict(y_test=np.full(20, 12, np.int64)), r"labels in \[12, 12\]"),
        (dict(x_test=None), "lacks keys"),
        (dict(classes=np.arange(10)), "1-D string array"),
    ],
)
def test_npz_validation(tmp_path, change, match):
    arrays = {**fx.mnist_arrays(), **change}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load("mnist", root=path)


def test_npz_object_array_refused(tmp_path):
    arrays = fx.mnist_arrays()
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays, classes=np.array([object()] * 10, dtype=object))
    with pytest.raises(ValueError, match="needs pickle"):
        load("mnist", root=path)


def test_cifar_npz(tmp_path):
    arrays = fx.cifar_arrays("cifar10")
    fx.write_npz(tmp_path / "cifar10.npz", arrays)
    ds = load("cifar10", root=tmp_path)
    np.testing.assert_array_equal(_nhwc(ds.x_train), arrays["x_train"])
    assert ds.classes[0] == "airplane" and ds.crop_padding == 4 and ds.flip
    bad = dict(arrays, x_train=arrays["x_train"][:, :, :, :1].copy())
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match=r"expected \(N, 32, 32, 3\)"):
        load("cifar10", root=tmp_path / "bad.npz")


@pytest.mark.skipif(not (SHARED / "mnist.npz").is_file(), reason="shared/data/mnist.npz not present")
def test_shared_mnist_full():
    ds = load("mnist", root=SHARED / "mnist.npz")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    # class counts from shared/data/README.md (official, sha-verified)
    assert torch.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(ds.mean[0] - 0.1307) < 1e-4 and abs(ds.std[0] - 0.3081) < 1e-4


# ------------------------------------------------------------------------------------------ CIFAR
@pytest.mark.parametrize("py2", [True, False])
@pytest.mark.parametrize("layout", ["folder", "batchdir", "tarball-in-root", "tarball-path"])
def test_cifar10_layouts(tmp_path, layout, py2):
    arrays = fx.cifar_arrays("cifar10")
    files = fx.cifar_files("cifar10", arrays, py2=py2)
    if layout in ("folder", "batchdir"):
        folder = fx.write_cifar_folder(tmp_path, "cifar10", files)
        root = tmp_path if layout == "folder" else folder
    else:
        tar = fx.write_cifar_tarball(tmp_path, "cifar10", files)
        root = tmp_path if layout == "tarball-in-root" else tar
    ds = load("cifar10", root=root, verify=False)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(_nhwc(ds.x_train), arrays["x_train"])
    np.testing.assert_array_equal(_nhwc(ds.x_test), arrays["x_test"])
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["y_train"])
    assert ds.classes == [f"c{i}" for i in range(10)]


def test_py2_pickle_matches_plain_pickle():
    # the generated Python-2-style batch decodes identically with the stdlib and with ours
    arrays = fx.cifar_arrays("cifar10", n_per_file=3)
    raw = fx.cifar_files("cifar10", arrays)["data_batch_2"]
    ref = pickle.loads(raw, encoding="latin1")
    ours = safe_loads(raw)
    assert ours.keys() == ref.keys()
    np.testing.assert_array_equal(ours["data"], ref["data"])
    assert ours["labels"] == ref["labels"] and ours["filenames"] == ref["filenames"]


@pytest.mark.parametrize("mode", ["fine", "coarse"])
def test_cifar100_tarball(tmp_path, mode):
    arrays = fx.cifar_arrays("cifar100")
    fx.write_cifar_tarball(tmp_path, "cifar100", fx.cifar_files("cifar100", arrays), prefix="./")
    ds = load("cifar100", root=tmp_path, verify=False, label_mode=mode)
    key = "y" if mode == "fine" else "c"
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays[f"{key}_train"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays[f"{key}_test"])
    assert ds.num_classes == (100 if mode == "fine" else 20)
    with pytest.raises(ValueError, match="label_mode"):
        load("cifar100", root=tmp_path, verify=False, label_mode="medium")


def test_cifar_md5_policy(tmp_path):
    files = fx.cifar_files("cifar10", fx.cifar_arrays("cifar10"))
    fx.write_cifar_folder(tmp_path, "cifar10", files)
    with pytest.raises(ValueError, match="md5 .* expected the official c99cafc152244af753f735de768cd75f"):
        load("cifar10", root=tmp_path)  # verify=True is the default


def test_cifar_batch_validation(tmp_path):
    arrays = fx.cifar_arrays("cifar10")
    files = fx.cifar_files("cifar10", arrays)
    folder = fx.write_cifar_folder(tmp_path, "cifar10", files)
    bad = {"data": np.zeros((6, 3071), np.uint8), "labels": [0] * 6}
    (folder / "data_batch_3").write_bytes(fx.py2_pickle(bad))
    with pytest.raises(ValueError, match=r"expected a uint8 array \(N, 3072\)"):
        load("cifar10", root=tmp_path, verify=False)
    bad = {"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 5}
    (folder / "data_batch_3").write_bytes(fx.py2_pickle(bad))
    with pytest.raises(ValueError, match="expected 6 ints"):
        load("cifar10", root=tmp_path, verify=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load("cifar10", root=tmp_path, verify=False)


# ------------------------------------------------------------------------------------------ pickle safety
@pytest.mark.parametrize("via", ["system", "exec"])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_refused_and_not_executed(tmp_path, via, protocol):
    marker = tmp_path / "pwned"
    payload = fx.malicious_pickle(marker, via=via, protocol=protocol)
    with pytest.raises(UnsafePickleError, match="refusing to unpickle global"):
        safe_loads(payload)
    assert not marker.exists()
    # the same payload as a CIFAR batch inside a tarball: refused, never run
    files = fx.cifar_files("cifar10", fx.cifar_arrays("cifar10", n_per_file=2))
    files["data_batch_1"] = payload
    fx.write_cifar_tarball(tmp_path, "cifar10", files)
    with pytest.raises(UnsafePickleError, match="data_batch_1"):
        load("cifar10", root=tmp_path, verify=False)
    assert not marker.exists()
    # sanity: the payload really is live with the unrestricted unpickler
    if via == "system":
        pickle.loads(payload)
        assert marker.exists()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_pickle_allowlist_edges():
    with pytest.raises(UnsafePickleError, match="numpy.matrix"):  # ndarray subclass: not allowed
        safe_loads(pickle.dumps(np.asmatrix(np.zeros((2, 2))), protocol=2))
    # _reconstruct with anything but numpy.ndarray as the class (here the allowed dtype global)
    crafted = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R."
    with pytest.raises(UnsafePickleError, match="only numpy.ndarray"):
        safe_loads(crafted)
    with pytest.raises(UnsafePickleError, match="holds Python objects"):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2))
    # object arrays through the allowed globals: _reconstruct with dtype code 'O', the ndarray
    # constructor called directly (REDUCE) or as a class (NEWOBJ)
    crafted = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01O\x87R."
    with pytest.raises(UnsafePickleError, match="holds Python objects"):
        safe_loads(crafted)
    with pytest.raises(UnsafePickleError, match="directly"):
        safe_loads(b"\x80\x02cnumpy\nndarray\nK\x02\x85U\x01O\x86R.")
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(b"\x80\x02cnumpy\nndarray\nK\x02\x85U\x01O\x86\x81.")
    crafted = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(UnsafePickleError, match="only 'latin1'"):
        safe_loads(crafted)
    with pytest.raises(pickle.UnpicklingError, match="not a valid dataset pickle"):
        safe_loads(b"\x80\x02}q\x00(")
    ok = {"a": [1, 2.5, None, True], "b": (b"x", "y"), "c": np.arange(6, dtype=np.int32).reshape(2, 3)}
    out = safe_loads(pickle.dumps(ok, protocol=2))
    assert out["a"] == ok["a"] and out["b"] == ok["b"]
    np.testing.assert_array_equal(out["c"], ok["c"])


# ------------------------------------------------------------------------------------------ tar safety
@pytest.mark.parametrize("kind", ["abs", "dotdot", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_tar_members_refused(tmp_path, kind):
    tar = tmp_path / "evil.tar.gz"
    tar.write_bytes(fx.special_tar(kind))
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match="refusing|not allowed"):
        safe_extract_tar(tar, dest)
    assert not dest.exists() or not any(dest.rglob("*"))  # nothing was written
    name = {"abs": "/tmp/bnlab_evil", "dotdot": "safe/../../evil"}.get(kind, "safe/evil")
    with pytest.raises(ArchiveError):
        read_tar_members(tar, [name])


def test_safe_extract_ok_and_size_cap(tmp_path):
    tar = tmp_path / "a.tar.gz"
    tar.write_bytes(fx.tar_bytes({"d/x.bin": b"1" * 1000, "d/e/y.bin": b"2" * 10}))
    written = safe_extract_tar(tar, tmp_path / "out")
    assert sorted(p.name for p in written) == ["x.bin", "y.bin"]
    assert (tmp_path / "out" / "d" / "e" / "y.bin").read_bytes() == b"2" * 10
    with pytest.raises(ArchiveError, match="max_bytes"):
        safe_extract_tar(tar, tmp_path / "out2", max_bytes=500)
    with pytest.raises(ArchiveError, match="max_members"):
        safe_extract_tar(tar, tmp_path / "out3", max_members=1)
    assert read_tar_members(tar, ["d/x.bin", "nope"]) == {"d/x.bin": b"1" * 1000}
    (tmp_path / "t.tar.gz").write_bytes(tar.read_bytes()[:40])
    with pytest.raises(ArchiveError, match="tar"):
        read_tar_members(tmp_path / "t.tar.gz", ["d/x.bin"])


# ------------------------------------------------------------------------------------------ imagefolder
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return fx.write_image_tree(tmp_path_factory.mktemp("imgs"))


def test_imagefolder_scan_and_loaders(tree):
    d = load("imagefolder", root=tree, image_size=32, resize_size=36)
    assert d.classes == ["cat", "dog", "eel"] and len(d.train_samples) == 9 and len(d.test_samples) == 9
    assert all(not p.endswith(".txt") for p, _ in d.train_samples)
    assert [lab for _, lab in d.test_samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    tl = d.train_loader(4, num_workers=1, seed=5, drop_last=False)  # decoding in a worker process
    batches = list(tl)
    assert len(batches) == len(tl) == 3 and batches[0][0].shape == (4, 3, 32, 32)
    assert batches[0][0].dtype == torch.float32 and torch.isfinite(batches[0][0]).all()
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(lab for _, lab in d.train_samples)
    # the random draws depend on (seed, epoch, index) only: 0 workers give the same batches
    same = list(d.train_loader(4, num_workers=0, seed=5, drop_last=False))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, same))
    tl.set_epoch(1)
    other = list(tl)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))
    te = list(d.test_loader(9, num_workers=0))
    assert te[0][0].shape == (9, 3, 32, 32) and te[0][1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagefolder_iter_from_resumes_exactly(tree):
    tl = load("imagefolder", root=tree, image_size=32, resize_size=36).train_loader(2, num_workers=0, seed=3)
    tl.set_epoch(2)
    full = list(tl)
    assert len(full) == len(tl) == 4  # 9 samples, drop_last
    tail = list(tl.iter_from(1))
    assert len(tail) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                  for a, b in zip(full[1:], tail))
    assert list(tl.iter_from(4)) == []


def test_imagefolder_subset_via_load(tree):
    full = load("imagefolder", root=tree)
    d = load("imagefolder", root=tree, train_subset=6, test_subset=3, seed=1)
    assert [lab for _, lab in d.train_samples].count(0) == 2 and len(d.train_samples) == 6  # 2 per class
    assert sorted(lab for _, lab in d.test_samples) == [0, 1, 2]
    assert set(d.train_samples) <= set(full.train_samples) and set(d.test_samples) <= set(full.test_samples)
    again = load("imagefolder", root=tree, train_subset=6, test_subset=3, seed=1)
    assert again.train_samples == d.train_samples  # seeded
    assert full.subset(None, None).train_samples == full.train_samples


def test_imagefolder_errors(tree, tmp_path):
    with pytest.raises(ValueError, match="download=True is not supported"):
        load("imagefolder", root=tree, download=True)
    with pytest.raises(ValueError, match="resize_size=20 must be >= image_size=32"):
        load("imagefolder", root=tree, image_size=32, resize_size=20)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load("imagefolder", root=tmp_path)


def test_imagefolder_symlink_cycle_scanned_once(tmp_path):
    from bnlab.data.imagefolder import scan_split

    root = fx.write_image_tree(tmp_path / "t", per_class=2)
    plain, _ = scan_split(root / "train")
    (root / "train" / "cat" / "up").symlink_to("..")  # cat/up -> train: a cycle
    (root / "train" / "dog" / "again").symlink_to(".")  # dog/again -> dog
    looped, classes = scan_split(root / "train")
    assert len(looped) == len(plain) + 4  # cat/up/{dog,eel} once each; no repeats through the cycles
    assert len({os.path.realpath(p) for p, _ in looped}) == len(plain)


def test_random_resized_crop_params_properties():
    from bnlab.data.imagefolder import random_resized_crop_params

    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(8, 300), rng.randint(8, 300)
        top, left, ch, cw = random_resized_crop_params(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    # an extreme aspect ratio forces the fallback: centred crop with the ratio clamped to 4/3
    never = random.Random(1)
    assert random_resized_crop_params(400, 10, (0.99, 1.0), (3 / 4, 4 / 3), never) == (0, 193, 10, 13)
    # normal case: the area fraction is in scale (up to rounding) and the aspect ratio in ratio
    top, left, ch, cw = random_resized_crop_params(1000, 1000, (0.25, 0.5), (1.0, 1.0), random.Random(2))
    assert ch == cw and 0.25 * 1e6 - 2000 <= ch * cw <= 0.5 * 1e6 + 2000


def test_imagefolder_transforms_against_naive_reference(tree):
    from PIL import Image

    from bnlab.data.imagefolder import random_resized_crop_params

    d = load("imagefolder", root=tree, image_size=16, resize_size=20)
    ds_tr, ds_te = d.dataset(True, seed=7), d.dataset(False)
    for i in range(3):
        path = ds_tr.samples[i][0]
        img = Image.open(path).convert("RGB")
        x, _ = ds_tr[(i, 3)]
        # naive reference: draw the same parameters, crop, resize, then flip by hand
        rng = random.Random(f"7/3/{i}")
        top, left, h, w = random_resized_crop_params(img.width, img.height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        ref = np.asarray(img.crop((left, top, left + w, top + h)).resize((16, 16), Image.BILINEAR))
        if rng.random() < 0.5:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(x.numpy().transpose(1, 2, 0), ref)
        # eval: shorter side -> 20, centre 16x16
        y, _ = ds_te[i]
        img = Image.open(ds_te.samples[i][0]).convert("RGB")
        ww, hh = img.size
        rs = (20, int(20 * hh / ww)) if ww <= hh else (int(20 * ww / hh), 20)
        big = np.asarray(img.resize(rs, Image.BILINEAR))
        t, lft = int(round((rs[1] - 16) / 2)), int(round((rs[0] - 16) / 2))
        np.testing.assert_array_equal(y.numpy().transpose(1, 2, 0), big[t:t + 16, lft:lft + 16])


# ------------------------------------------------------------------------------------------ discovery
def test_find_datasets(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    fx.write_idx_folder(a / "MNIST" / "raw", fx.mnist_arrays(n_train=2, n_test=2))
    fx.write_npz(b / "fashion_mnist.npz", fx.mnist_arrays(n_train=2, n_test=2))
    fx.write_cifar_tarball(b, "cifar10", {"data_batch_1": b""})
    fx.write_npz(a / "cifar10.npz", fx.cifar_arrays("cifar10", n_per_file=1))
    fx.write_image_tree(b / "imagenet", per_class=1)
    found = find_datasets([str(a), str(b), str(tmp_path / "missing")])
    assert found == {"mnist": str(a / "MNIST" / "raw"), "cifar10": str(a / "cifar10.npz"),
                     "fashion_mnist": str(b / "fashion_mnist.npz"), "imagefolder": str(b / "imagenet")}
    assert load("mnist", root=found["mnist"]).x_train.shape == (2, 1, 28, 28)
    monkeypatch.setenv("BNLAB_DATA", str(b))
    monkeypatch.chdir(tmp_path)
    assert find_datasets()["cifar10"] == str(b / "cifar-10-python.tar.gz")
