"""Reliability: nothing lost on crashes/full disks, numerical faults give clear errors (docs/reliability.md).

Crash safety is tested by faults planted under the checkpoint writer (``open`` of the checkpoint
module replaced by a file that fails or SIGKILLs its own process half-way through a write), so a
writer that wrote in place, skipped the temporary file or swallowed errors fails these tests.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bnlab.train.checkpoint as ckpt_mod
from bnlab.cli import main as cli_main
from bnlab.train import NonFiniteLossError, RunConfig, load_checkpoint, train
from bnlab.train.checkpoint import CheckpointError, save_checkpoint

RUN = ["--model", "mlp", "--data", "digits", "--train-subset", "300", "--test-subset", "100", "--batch-size", "32",
       "--max-steps-per-epoch", "4", "--lr", "0.05", "--schedule", "cosine", "--quiet"]


def _cfg(out, **kw) -> RunConfig:
    base = dict(model="mlp", data="digits", train_subset=300, test_subset=100, batch_size=32, max_steps_per_epoch=4,
                lr=0.05, schedule="cosine", epochs=3, out_dir=str(out))
    base.update(kw)
    return RunConfig(**base)


def _state(seed: float) -> dict:
    return {"model": {"w": torch.full((64, 64), seed), "n": torch.tensor(3)}, "progress": {"epoch": int(seed)}}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _FailingFile:
    """A real file whose ``write`` writes ``keep`` bytes of the first call, then raises ``err``."""

    def __init__(self, f, err: OSError, keep: int = 100) -> None:
        self.f, self.err, self.keep = f, err, keep

    def write(self, data) -> int:
        self.f.write(bytes(data[: self.keep]))
        self.f.flush()
        raise self.err

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _plant_open(monkeypatch, err: OSError) -> None:
    """Every file the checkpoint module opens for writing fails half-way with ``err``."""
    real = open

    def fake_open(file, mode="r", *args, **kw):
        f = real(file, mode, *args, **kw)
        return _FailingFile(f, err) if "w" in mode or "a" in mode else f

    monkeypatch.setattr(ckpt_mod, "open", fake_open, raising=False)


# ------------------------------------------------------------------------------- write failures
@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EROFS, "Read-only file system"),
                                 PermissionError(errno.EACCES, "Permission denied"),
                                 OSError(errno.EIO, "Input/output error")])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, err):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1.0), path)
    before = path.read_bytes()
    _plant_open(monkeypatch, err)
    with pytest.raises(CheckpointError, match=f"{path.name}.*{err.strerror}.*previous checkpoint"):
        save_checkpoint(_state(2.0), path)
    assert path.read_bytes() == before
    _assert_same_tensors(load_checkpoint(path)["model"], _state(1.0)["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # temporary file removed


def test_failed_rename_and_missing_folder(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1.0), path)
    with pytest.raises(CheckpointError, match="does-not-exist"):
        save_checkpoint(_state(2.0), tmp_path / "does-not-exist" / "checkpoint.pt")

    def bad_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(ckpt_mod.os, "replace", bad_replace)
    with pytest.raises(CheckpointError, match="cross-device"):
        save_checkpoint(_state(2.0), path)
    _assert_same_tensors(load_checkpoint(path)["model"], _state(1.0)["model"])
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_full_disk_during_training_is_one_line_and_resume_recovers(tmp_path, monkeypatch, capsys):
    """ENOSPC on the epoch-2 checkpoint: exit 2 with one clear line, epoch-1 checkpoint intact, and
    a later ``--resume`` (disk freed) ends bit-identical to an uninterrupted run."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli_main(["train", *RUN, "--epochs", "2", "--out", str(ref)]) == 0
    train(_cfg(run, epochs=2), quiet=True, stop_after_epochs=1)  # the same run as the CLI's, cut after epoch 1
    epoch1 = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        _plant_open(m, OSError(errno.ENOSPC, "No space left on device"))
        assert cli_main(["train", *RUN, "--epochs", "2", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "previous checkpoint" in err[0], err
    assert (run / "checkpoint.pt").read_bytes() == epoch1
    assert cli_main(["train", *RUN, "--epochs", "2", "--out", str(run), "--resume"]) == 0
    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    _assert_same_tensors(a["model"], b["model"])


def test_unwritable_run_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the run folder should be: mkdir fails even as root
    assert cli_main(["train", *RUN, "--epochs", "1", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create run folder" in err[0], err


def test_full_disk_on_other_run_files_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC outside the checkpoint writer (config.toml): an OSError, reported as one line, exit 2."""
    from bnlab.train.config import RunConfig as RC

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(RC, "save", full)
    assert cli_main(["train", *RUN, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "config.toml" in err[0], err


# ------------------------------------------------------------------------------- kill -9 mid-write
_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(os.environ["THREADS"]))  # as in the parent: float sums depend on it
    import bnlab.train.checkpoint as c
    real, count = open, [0]

    class Dying:
        def __init__(self, f): self.f = f
        def write(self, data):  # half of the bytes reach the disk, then the process dies
            self.f.write(bytes(data[: len(data) // 2])); self.f.flush(); os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        def __getattr__(self, name): return getattr(self.f, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()

    def fake_open(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        if "w" in mode and "checkpoint" in os.path.basename(str(file)):
            count[0] += 1
            if count[0] == 2:
                return Dying(f)
        return f

    c.open = fake_open
    from bnlab.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_checkpoint_write_then_resume_is_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(_cfg(ref), quiet=True)
    env = {**os.environ, "THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", _KILLER, "train", *RUN, "--epochs", "3", "--out", str(run)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -9, (proc.returncode, proc.stderr)  # died inside the 2nd checkpoint write
    state = load_checkpoint(run / "checkpoint.pt")  # the epoch-1 checkpoint, intact
    assert state["progress"]["epoch"] == 1
    train(_cfg(run), resume=True, quiet=True)
    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    _assert_same_tensors(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i in a["optimizer"]["state"]:
        _assert_same_tensors(a["optimizer"]["state"][i], b["optimizer"]["state"][i])
    rows = lambda p: [{k: v for k, v in json.loads(x).items() if k != "epoch_time"}  # noqa: E731
                      for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert rows(ref) == rows(run)


# ------------------------------------------------------------------------------- what is written
def test_nonfinite_or_unloadable_state_is_never_written(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_state(1.0), path)
    before = path.read_bytes()
    for bad in (float("nan"), float("inf"), -float("inf")):
        st = _state(2.0)
        st["model"]["w"][3, 4] = bad
        with pytest.raises(CheckpointError, match="NaN/Inf.*'?w"):
            save_checkpoint(st, path)
    st = _state(2.0)
    st["progress"]["hook"] = os.getcwd  # loads only with weights_only=False: refused before writing
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(st, path)
    with pytest.raises(CheckpointError, match="'model' state dict"):
        save_checkpoint({"weights": {}}, path)
    assert path.read_bytes() == before
    st = _state(2.0)
    st["model"]["w"][0, 0] = float("nan")
    save_checkpoint(st, path, require_finite=False)  # explicit opt-out, e.g. for post-mortems
    assert torch.isnan(load_checkpoint(path)["model"]["w"][0, 0])


def test_resume_with_foreign_checkpoint_is_clear(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_main(["train", *RUN, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli_main(["train", *RUN, "--epochs", "2", "--width", "2", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this run" in err[0], err
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])  # truncated
    assert cli_main(["train", *RUN, "--epochs", "2", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt, truncated" in err[0], err


# ------------------------------------------------------------------------------- numerical faults
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, bad):
    import bnlab.train.trainer as tr

    cfg = _cfg(tmp_path / "run", epochs=2)
    train(cfg, quiet=True, stop_after_epochs=1)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real = tr._batches_from

    def poisoned(loader, start):
        for i, (xb, yb) in enumerate(real(loader, start)):
            if i == 2:
                xb = xb.clone()
                xb[0, 0] = bad
            yield xb, yb

    monkeypatch.setattr(tr, "_batches_from", poisoned)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(cfg, resume=True, quiet=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_optimizer_floating_point_error_keeps_last_checkpoint(tmp_path, monkeypatch):
    """G-SGD raises FloatingPointError on a degenerate step (v_k = 0, non-finite R_k); the trainer
    turns it into NonFiniteLossError and keeps the last checkpoint."""
    cfg = _cfg(tmp_path / "run", epochs=2)
    train(cfg, quiet=True, stop_after_epochs=1)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    calls = [0]
    real = torch.optim.SGD.step

    def exploding(self, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise FloatingPointError("GSGD block 'b': degenerate step; no weight was changed")
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", exploding)
    with pytest.raises(NonFiniteLossError, match="optimizer step failed.*degenerate.*last good checkpoint"):
        train(cfg, resume=True, quiet=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_exploding_gsgd_is_warned_and_counted(tmp_path):
    """A huge G-SGD step flips skeleton signs (R_k <= 0): documented fallback = RuntimeWarning once per
    block + ``opt/gsgd_sign_flips`` telemetry (``r_min`` clamps, tested in test_gsgd); the saved model is
    finite (non-finite R_k raises, see the test above)."""
    cfg = _cfg(tmp_path / "a", norm="pbn", optim="gsgd", lr=1e4, momentum=0.0, weight_decay=0.0, epochs=1)
    with pytest.warns(RuntimeWarning, match="R_k"):
        train(cfg, quiet=True)
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["opt/gsgd_sign_flips"] >= 1
    state = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _npz(path, n_train=40, n_test=20, labels=None, shape=(8, 8)):
    rng = np.random.default_rng(0)
    y = np.arange(n_train) % 10 if labels is None else labels
    np.savez(path, x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8), y_test=np.arange(n_test) % 10)
    return path


def test_zero_variance_channels_train_finite(tmp_path, monkeypatch):
    """All-constant images: every BN channel of the first layer has zero variance; (x - mean) /
    sqrt(0 + eps) = 0, so training stays finite and the checkpoint is finite."""
    import bnlab.train.trainer as tr
    from bnlab.data import from_numpy

    x = np.full((64, 8, 8), 7, dtype=np.uint8)
    ds = from_numpy("const", x, np.arange(64) % 10, x[:20], np.arange(20) % 10, [str(i) for i in range(10)])
    monkeypatch.setattr(tr, "prepare_data", lambda cfg: ds)
    for norm in ("bn", "cbn", "pbn"):
        train(_cfg(tmp_path / norm, norm=norm, epochs=1, augment=False), quiet=True)
        state = load_checkpoint(tmp_path / norm / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), norm


@pytest.mark.parametrize("flags,needle", [
    (["--batch-size", "1"], "Expected more than 1 value per channel"),          # BN1d on one sample
    (["--train-subset", "1"], "Expected more than 1 value per channel"),
])
def test_batch_of_one_is_a_clear_error_and_writes_nothing(tmp_path, capsys, flags, needle):
    out = tmp_path / "run"
    args = [a for a in RUN if a not in ("--train-subset", "300")] if "--train-subset" in flags else RUN
    assert cli_main(["train", *args, *flags, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (out / "checkpoint.pt").exists()


def test_batch_of_one_conv_net_trains(tmp_path):
    """Batch size 1 is valid for conv nets (statistics over H*W): documented, finite."""
    s = train(_cfg(tmp_path / "r", model="resnet20", width=0.25, batch_size=1, max_steps_per_epoch=3, epochs=1,
                   train_subset=20, test_subset=10), quiet=True)
    assert np.isfinite(s["train_loss"])


@pytest.mark.parametrize("kind,needle", [
    ("empty_train", "training split is empty"),
    ("empty_test", "test split is empty"),
    ("label_high", "labels in"),
    ("label_negative", "labels in"),
])
def test_bad_datasets_are_one_clear_line(tmp_path, capsys, kind, needle):
    if kind == "empty_train":
        p = _npz(tmp_path / "mnist.npz", n_train=0, labels=np.zeros(0, dtype=np.int64), shape=(28, 28))
    elif kind == "empty_test":
        p = _npz(tmp_path / "mnist.npz", n_test=0, shape=(28, 28))
    else:
        labels = np.arange(40) % 10
        labels[5] = 10 if kind == "label_high" else -1
        p = _npz(tmp_path / "mnist.npz", labels=labels, shape=(28, 28))
    args = [a for a in RUN if a not in ("--train-subset", "300", "--test-subset", "100", "--data", "digits")]
    assert cli_main(["train", *args, "--data", "mnist", "--data-dir", str(p), "--epochs", "1",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

