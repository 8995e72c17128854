"""The command line, end to end in subprocesses (what a user types)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bnlab.report import find_runs, format_table
from bnlab.suites import Suite
from bnlab.train import RunConfig, load_checkpoint
from bnlab.train.compare import run_suite

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def bnlab(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "bnlab", *args], capture_output=True, text=True, env=ENV,
                          timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"bnlab {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


TINY = ["--model", "resnet20", "--width", "0.25", "--batch-size", "32", "--lr", "0.05"]


def test_train_cli_writes_run_and_report(tmp_path):
    out = tmp_path / "r"
    proc = bnlab("train", *TINY, "--epochs", "2", "--max-steps-per-epoch", "5", "--out", str(out))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2
    assert "epoch   2/2" in proc.stderr
    rep = bnlab("report", str(tmp_path), "--out", str(tmp_path / "rep"))
    assert "| run | 1 |" in rep.stdout
    assert (tmp_path / "rep" / "report.md").is_file()


def test_train_from_toml_with_flag_override(tmp_path):
    cfg = RunConfig(model="mlp", epochs=1, out_dir=str(tmp_path / "t"), max_steps_per_epoch=3, name="toml")
    cfg.save(tmp_path / "c.toml")
    bnlab("train", "--config", str(tmp_path / "c.toml"), "--lr", "0.02", "--quiet")
    saved = RunConfig.from_toml(tmp_path / "t" / "config.toml")
    assert saved.lr == 0.02 and saved.model == "mlp" and saved.name == "toml"


@pytest.mark.parametrize("args,needle", [
    (["train", "--model", "nope"], "unknown model 'nope'"),
    (["train", "--norm", "xbn"], "unknown norm 'xbn'"),
    (["train", "--act", "softmaxx"], "unknown activation 'softmaxx'"),
    (["train", "--data", "imagenet22k"], "unknown dataset 'imagenet22k'"),
    (["train", "--optim", "adamw"], "unknown optimizer 'adamw'"),
    (["train", "--schedule", "linear"], "'schedule': got 'linear'"),
    (["train", "--epochs", "0"], "'epochs': got 0"),
    (["train", "--config", "/nonexistent.toml"], "does not exist"),
    (["train", "--data", "cifar10", "--data-dir", "/nonexistent-dir"], "cifar10"),
    (["compare", "nosuchsuite"], "unknown suite 'nosuchsuite'"),
    (["report", "/nonexistent-runs"], "does not exist"),
])
def test_user_errors_are_one_clear_line(args, needle, tmp_path):
    proc = bnlab(*args, "--out", str(tmp_path / "x"), check=False) if args[0] in ("train", "compare") \
        else bnlab(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_flag_value_is_argparse_error():
    proc = bnlab("train", "--lr", "fast", check=False)
    assert proc.returncode == 2 and "invalid float value" in proc.stderr


def test_info_lists_everything():
    out = bnlab("info").stdout
    for word in ("torch", "resnet20", "cbn", "sgd", "digits"):
        assert word in out


def test_sigterm_checkpoints_mid_epoch_and_resume_matches_uninterrupted(tmp_path):
    common = [*TINY, "--epochs", "3", "--batch-size", "8", "--schedule", "cosine"]
    bnlab("train", *common, "--out", str(tmp_path / "full"), "--quiet")
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", "train", *common, "--out", str(run)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["progress"]["epoch"] >= 1 and state["progress"]["batch_in_epoch"] > 0, state["progress"]
    bnlab("train", *common, "--out", str(run), "--resume", "--quiet")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(run / "checkpoint.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compare_runner_tables_mean_std_and_skips_done_runs(tmp_path):
    base = RunConfig(model="mlp", epochs=2, max_steps_per_epoch=3, batch_size=32)
    suite = Suite("mini", "two methods", configs=[base.replace(name="BN"), base.replace(name="none", norm="none")],
                  seeds=[0, 1])
    text = run_suite(suite, tmp_path, verbose=False)
    assert "| BN | 2 |" in text and "| none | 2 |" in text
    assert (tmp_path / "mini" / "report.md").is_file()
    stamp = (tmp_path / "mini" / "BN" / "seed0" / "summary.json").stat().st_mtime_ns
    run_suite(suite, tmp_path, verbose=False)  # nothing re-run
    assert (tmp_path / "mini" / "BN" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    runs = find_runs([tmp_path / "mini"])
    assert len(runs) == 4
    accs = [r.summary["test_acc"] for r in runs if r.name == "BN"]
    m = sum(accs) / 2
    assert f"{100 * m:.2f} ±" in format_table(runs)


def test_diagnose_cli_and_trainer_diagnostics(tmp_path):
    out = tmp_path / "d"
    bnlab("train", *TINY, "--epochs", "1", "--max-steps-per-epoch", "3", "--diagnostics-every", "1",
          "--diagnostics-batches", "3", "--out", str(out), "--quiet")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["diag/grad_sq_norm"] > 0 and row["diag/grad_variance"] >= 0 and row["diag/lipschitz"] > 0
    proc = bnlab("diagnose", str(out), "--batches", "3", "--json", str(tmp_path / "d.json"))
    assert "grad_sq_norm" in proc.stdout and "lipschitz" in proc.stdout
    assert json.loads((tmp_path / "d.json").read_text())["num_batches"] == 3
