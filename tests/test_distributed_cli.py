"""``torchrun --nproc_per_node 2 -m bnlab train`` end to end (gloo, CPU): a clean run, and a run whose
rank-1 worker is SIGKILLed after the first checkpoint, restarted by ``--max-restarts 1`` with
``--auto-resume``, that must end in the state of the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from bnlab.train import load_checkpoint

pytestmark = pytest.mark.slow

EPOCHS = 3
TRAIN_ARGS = ["--model", "mlp", "--data", "digits", "--epochs", str(EPOCHS), "--batch-size", "16",
              "--max-steps-per-epoch", "30", "--lr", "0.05", "--device", "cpu", "--test-subset", "200"]


def _launch(out: Path, tag: str, max_restarts: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.2",
           "-m", "bnlab", "train", *TRAIN_ARGS, "--out", str(out), "--auto-resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BNLAB_TEST_TAG": tag, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker_pid(tag: str, rank: int) -> int | None:
    """The pid of the first-attempt worker of ``rank`` launched with our unique tag."""
    want = {f"BNLAB_TEST_TAG={tag}".encode(), f"RANK={rank}".encode(), b"TORCHELASTIC_RESTART_COUNT=0"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the clean run and the run to be killed together (process start-up dominates)."""
    root = tmp_path_factory.mktemp("torchrun")
    clean_tag, kill_tag = uuid.uuid4().hex, uuid.uuid4().hex
    clean = _launch(root / "clean", clean_tag, max_restarts=0)
    killed = _launch(root / "killed", kill_tag, max_restarts=1)
    ckpt = root / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert killed.poll() is None, f"run ended before its first checkpoint:\n{killed.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.005)
    pid = _worker_pid(kill_tag, rank=1)
    epochs_on_disk = load_checkpoint(ckpt)["progress"]["epoch"]
    assert pid is not None, "rank-1 worker not found"
    os.kill(pid, signal.SIGKILL)
    out_killed = killed.communicate(timeout=300)[0]
    out_clean = clean.communicate(timeout=300)[0]
    assert clean.returncode == 0, out_clean
    assert killed.returncode == 0, out_killed
    return dict(clean=root / "clean", killed=root / "killed", out_clean=out_clean, out_killed=out_killed,
                epochs_on_disk=epochs_on_disk)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_cli_two_processes(runs):
    run = runs["clean"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.toml", "metrics.jsonl",
                                                    "summary.json"]  # rank 0 alone writes
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == EPOCHS
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert runs["out_clean"].count('"name": "run"') == 1  # the final JSON line is printed by rank 0 only
    assert "world 2" in runs["out_clean"]


def test_killed_worker_resumes_and_matches_uninterrupted_run(runs):
    out = runs["out_killed"]
    assert "resumed from" in out, out
    resumed_at = int(out.split("resumed from", 1)[1].split("at epoch", 1)[1].split(",")[0])
    # at most one epoch of progress lost: the restart starts from what was on disk at the kill
    assert resumed_at >= runs["epochs_on_disk"] >= 1
    a = load_checkpoint(runs["clean"] / "checkpoint.pt")
    b = load_checkpoint(runs["killed"] / "checkpoint.pt")
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == EPOCHS
    assert a["progress"]["step"] == b["progress"]["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    # evaluation depends only on the model state: identical, epoch by epoch
    ra, rb = _rows(runs["clean"]), _rows(runs["killed"])
    assert [r["epoch"] for r in rb] == list(range(1, EPOCHS + 1))
    assert [(r["test_loss"], r["test_acc"]) for r in ra] == [(r["test_loss"], r["test_acc"]) for r in rb]
