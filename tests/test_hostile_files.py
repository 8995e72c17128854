"""Hostile files and bad inputs, end to end: nothing executes, every one is a clear error.

Each malicious payload, if it ran, would create a marker file; every test asserts the marker is
absent afterwards (and, once, that the payload is live when loaded unsafely). CLI cases assert exit
status 2, exactly one ``bnlab train: error: ...`` line on stderr, and no traceback.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile

import data_fixtures as fx
import numpy as np
import pytest
import torch

from bnlab.cli import main as cli_main
from bnlab.data import load
from bnlab.data.archives import ArchiveError, read_tar_members, safe_extract_tar
from bnlab.train import load_checkpoint
from bnlab.train.checkpoint import CheckpointError

RUN = ["--model", "mlp", "--batch-size", "16", "--max-steps-per-epoch", "2", "--epochs", "1", "--quiet"]


class _Payload:
    """Creates ``marker`` when unpickled by an unrestricted unpickler."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_error_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bnlab train: error:") and needle in err[0], err
    return err[0]


# ------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path, layout):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    state = {"model": {"w": torch.zeros(2)}, "progress": {"epoch": 1, "x": _Payload(marker)}}
    if layout == "zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(CheckpointError, match="refused by the weights_only loader"):
        load_checkpoint(path)
    assert not marker.exists()
    if layout == "zip":  # sanity: the payload is live for an unrestricted load
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_malicious_checkpoint_through_cli_resume_and_diagnose(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "optimizer": {}, "progress": _Payload(marker)}, run / "checkpoint.pt")
    assert cli_main(["train", *RUN, "--out", str(run), "--resume"]) == 2
    _one_error_line(capsys, "weights_only")
    assert cli_main(["train", *RUN, "--out", str(run), "--auto-resume"]) == 2
    _one_error_line(capsys, "weights_only")
    with pytest.raises(CheckpointError):  # `bnlab diagnose` reads checkpoints the same way
        from bnlab.diagnostics.cli import diagnose

        diagnose(type("A", (), {"target": str(run), "batches": 2, "data_dir": None, "json_out": None})())
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04" + b"\x00" * 40])
def test_garbage_checkpoint_is_clear(tmp_path, content):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(tmp_path / "c.pt")
    torch.save([1, 2], tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="no 'model'"):
        load_checkpoint(tmp_path / "d.pt")


# ------------------------------------------------------------------------------- dataset files via the CLI
def _cifar_tar_with(tmp_path, member: str, data: bytes | None = None, kind: str = "file"):
    """An official-layout CIFAR-10 tarball whose ``member`` is replaced (``data``) or made a link."""
    files = fx.cifar_files("cifar10", fx.cifar_arrays("cifar10", n_per_file=4))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f, d in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{f}")
            if f == member and kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
                continue
            d = data if f == member and data is not None else d
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    return tmp_path


def _train_cli(data: str, root, *extra) -> int:
    out = (root.parent if root.is_file() else root) / "run"
    return cli_main(["train", *RUN, "--data", data, "--data-dir", str(root), "--out", str(out), *extra])


@pytest.mark.parametrize("verify", [True, False])
def test_crafted_cifar_pickle_via_cli(tmp_path, capsys, verify):
    marker = tmp_path / "pwned"
    root = _cifar_tar_with(tmp_path, "data_batch_2", fx.malicious_pickle(marker))
    extra = [] if verify else ["--data-options", '{"verify": false}']
    assert _train_cli("cifar10", root, *extra) == 2
    _one_error_line(capsys, "md5" if verify else "refusing to unpickle global")
    assert not marker.exists()


def test_cifar_tar_link_member_via_cli(tmp_path, capsys):
    root = _cifar_tar_with(tmp_path, "data_batch_1", kind="symlink")
    assert _train_cli("cifar10", root, "--data-options", '{"verify": false}') == 2
    _one_error_line(capsys, "links are not allowed")


def test_truncated_gz_via_cli(tmp_path, capsys):
    fx.write_idx_folder(tmp_path, fx.mnist_arrays(n_train=40, n_test=20), gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-30])
    assert _train_cli("mnist", tmp_path) == 2
    _one_error_line(capsys, "truncated")


def test_truncated_tarball_via_cli(tmp_path, capsys):
    root = _cifar_tar_with(tmp_path, "nothing")
    tar = tmp_path / "cifar-10-python.tar.gz"
    tar.write_bytes(tar.read_bytes()[: len(tar.read_bytes()) // 2])
    assert _train_cli("cifar10", root, "--data-options", '{"verify": false}') == 2
    _one_error_line(capsys, "tar")


@pytest.mark.parametrize("change,needle", [
    (lambda a: a.update(x_train=a["x_train"][:, :28, :28]), "expected (N, 32, 32, 3)"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "expected uint8"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "labels"),
    (lambda a: a.update(y_test=a["y_test"].astype(np.float64)), "1-D integer"),
    (lambda a: a.pop("x_test"), "lacks keys"),
])
def test_wrong_shaped_npz_via_cli(tmp_path, capsys, change, needle):
    arrays = {k: v for k, v in fx.cifar_arrays("cifar10", n_per_file=2).items()}
    change(arrays)
    kw = {k: v for k, v in arrays.items() if k in ("x_train", "y_train", "x_test", "y_test")}
    np.savez(tmp_path / "cifar10.npz", **kw)
    assert _train_cli("cifar10", tmp_path / "cifar10.npz") == 2
    _one_error_line(capsys, needle)


def test_npz_with_pickled_object_executes_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    arrays = fx.cifar_arrays("cifar10", n_per_file=2)
    obj = np.empty(1, dtype=object)
    obj[0] = _Payload(marker)
    np.savez(tmp_path / "cifar10.npz", x_train=arrays["x_train"], y_train=arrays["y_train"], x_test=obj,
             y_test=arrays["y_test"])
    assert _train_cli("cifar10", tmp_path / "cifar10.npz") == 2
    _one_error_line(capsys, "pickle")
    assert not marker.exists()


def test_not_an_archive_at_all(tmp_path, capsys):
    (tmp_path / "cifar10.npz").write_bytes(os.urandom(300))
    assert _train_cli("cifar10", tmp_path / "cifar10.npz") == 2
    _one_error_line(capsys, "cannot read")


# ------------------------------------------------------------------------------- bombs and traversal
def _zeros_tar_gz(path, n_bytes: int, name: str = "d/zeros.bin") -> None:
    """A gzip tar holding ``n_bytes`` of zeros, streamed (compresses ~1000:1)."""

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            k = min(len(b), self.left)
            b[:k] = bytes(k)
            self.left -= k
            return k

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(name)
        info.size = n_bytes
        tar.addfile(info, io.BufferedReader(Zeros(n_bytes)))


def test_tar_bomb_refused_before_writing(tmp_path):
    bomb = tmp_path / "bomb.tar.gz"
    _zeros_tar_gz(bomb, 64 << 20)  # 64 MiB inflating from ~65 KiB
    assert bomb.stat().st_size < (1 << 20)
    with pytest.raises(ArchiveError, match="exceeds max_bytes"):
        safe_extract_tar(bomb, tmp_path / "out", max_bytes=8 << 20)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    with pytest.raises(ArchiveError, match="exceed max_bytes"):
        read_tar_members(bomb, ["d/zeros.bin"], max_bytes=8 << 20)


def test_gzip_bomb_is_capped(tmp_path):
    from bnlab.data.archives import read_bytes

    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb", compresslevel=1) as f:
        for _ in range(32):
            f.write(bytes(1 << 20))
    with pytest.raises(ArchiveError, match="exceeds max_bytes"):
        read_bytes(p, max_bytes=4 << 20)


@pytest.mark.parametrize("kind", ["abs", "dotdot", "symlink", "hardlink", "device", "fifo"])
def test_no_path_traversal_on_extraction(tmp_path, kind):
    tar = tmp_path / "evil.tar.gz"
    tar.write_bytes(fx.special_tar(kind))
    with pytest.raises(ArchiveError):
        safe_extract_tar(tar, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not os.path.exists("/tmp/bnlab_evil")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_npz_zip_bomb_is_capped(tmp_path):
    from bnlab.data.npz import load_npz_arrays

    a = fx.cifar_arrays("cifar10", n_per_file=2)
    x = np.zeros((700, 32, 32, 3), dtype=np.uint8)  # 2 MiB inflating from ~2 KiB
    np.savez_compressed(tmp_path / "b.npz", x_train=x, y_train=np.zeros(700, dtype=np.int64), x_test=a["x_test"],
                        y_test=a["y_test"])
    with pytest.raises(ValueError, match="exceeds"):
        load_npz_arrays(tmp_path / "b.npz", name="cifar10", max_bytes=1 << 20)


# ------------------------------------------------------------------------------- configs (TOML + flags)
@pytest.mark.parametrize("toml,needle", [
    ('epochs = "ten"', "'epochs': got 'ten'"),
    ("epochs = 0", "'epochs': got 0"),
    ("epochs = 2.5", "'epochs': got 2.5"),
    ("batch_size = -4", "'batch_size': got -4"),
    ("lr = 0", "'lr': got 0"),
    ("lr = inf", "'lr': got inf"),
    ("lr = nan", "'lr': got nan"),
    ("lr = true", "'lr': got True"),
    ("momentum = -0.1", "'momentum'"),
    ("momentum = nan", "'momentum': got nan"),
    ("weight_decay = inf", "'weight_decay': got inf"),
    ("width = -1.0", "'width'"),
    ('schedule = "linear"', "'schedule': got 'linear'"),
    ("milestones = [0.5, 2.0]", "'milestones'"),
    ('milestones = "0.5"', "'milestones'"),
    ("gamma = 0", "'gamma'"),
    ("label_smoothing = 1.5", "'label_smoothing'"),
    ("warmup_epochs = -1", "'warmup_epochs'"),
    ('amp = "fp8"', "'amp': got 'fp8'"),
    ('device = "tpu"', "'device': got 'tpu'"),
    ("seed = 1.5", "'seed': got 1.5"),
    ('augment = "yes"', "'augment': got 'yes'"),
    ("train_subset = 0", "'train_subset': got 0"),
    ("max_steps_per_epoch = -1", "'max_steps_per_epoch'"),
    ("eval_every = 0", "'eval_every'"),
    ("checkpoint_every = 0", "'checkpoint_every'"),
    ("model_options = 3", "'model_options'"),
    ('model = 7', "'model': got 7"),
    ('model = "resnet9000"', "unknown model 'resnet9000'"),
    ('norm = "cbn:nope"', "unknown preset 'nope'"),
    ('act = "relu6"', "unknown activation 'relu6'"),
    ('optim = "adamw"', "unknown optimizer 'adamw'"),
    ('data = "imagenet22k"', "unknown dataset 'imagenet22k'"),
    ("bogus = 1", "unknown config field"),
    ("epochs = [", "not valid TOML"),
    ("[model_options]\nbogus = 1", "unknown option"),
    ("[optim_options]\nbogus = 1", "unknown option"),
])
def test_bad_toml_fields_are_one_clear_line(tmp_path, capsys, toml, needle):
    base = {"model": '"mlp"', "epochs": "1", "max_steps_per_epoch": "1", "out_dir": f'"{tmp_path / "run"}"'}
    base.pop(toml.split("=")[0].strip(), None)  # the line under test replaces the base value
    cfg = tmp_path / "c.toml"
    cfg.write_text("".join(f"{k} = {v}\n" for k, v in base.items()) + toml + "\n")
    assert cli_main(["train", "--config", str(cfg), "--quiet"]) == 2
    _one_error_line(capsys, needle)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "inf"], "'lr': got inf"),
    (["--momentum", "nan"], "'momentum': got nan"),
    (["--width", "inf"], "'width': got inf"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--optim", "gsgd"], "path-space"),
    (["--norm", "pbn", "--optim", "psi-sgdm", "--optim-options", '{"bogus": 1}'], "bogus"),
])
def test_bad_flags_are_one_clear_line(tmp_path, capsys, flags, needle):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert cli_main(["train", *RUN, *flags, "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, needle)


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The same through a real ``python -m bnlab`` process (exit status, no traceback)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr = nan\n")
    proc = subprocess.run([sys.executable, "-m", "bnlab", "train", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    expected = "bnlab train: error: config field 'lr': got nan, expected a finite number"
    assert proc.stderr.strip().splitlines() == [expected]


def test_unknown_data_option_is_refused(tmp_path, capsys):
    assert cli_main(["train", *RUN, "--data-options", '{"bogus": 1}', "--out", str(tmp_path / "run")]) == 2
    _one_error_line(capsys, "bogus")


def test_dataset_load_api_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load("nope")
    with pytest.raises(FileNotFoundError, match="cifar10"):
        load("cifar10", root=tmp_path)
