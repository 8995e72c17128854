import json

import pytest
import torch

from bnlab.train import ConfigError, NonFiniteLossError, RunConfig, load_checkpoint, train
from bnlab.train.schedule import lr_factor


def _cfg(tmp_path, **kw):
    base = dict(model="resnet20", width=0.25, epochs=3, out_dir=str(tmp_path / "run"), lr=0.05,
                batch_size=64, max_steps_per_epoch=6, schedule="cosine", train_subset=600, test_subset=200)
    base.update(kw)
    return RunConfig(**base)


def test_run_folder_contents(tmp_path):
    s = train(_cfg(tmp_path), quiet=True)
    run = tmp_path / "run"
    assert {"config.toml", "metrics.jsonl", "checkpoint.pt", "summary.json"} <= {p.name for p in run.iterdir()}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert 0.0 <= s["test_acc"] <= 1.0
    assert RunConfig.from_toml(run / "config.toml") == _cfg(tmp_path)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["progress"]["epoch"] == 3


@pytest.mark.parametrize("kw", [dict(), dict(norm="pbn", optim="gsgd", momentum=0.9, lr=0.01)])
def test_resume_is_bit_identical(tmp_path, kw):
    """Also G-SGD with momentum: its flat fast path's buffers go through the checkpoint and back."""
    full = _cfg(tmp_path, out_dir=str(tmp_path / "full"), **kw)
    train(full, quiet=True)
    part = _cfg(tmp_path, out_dir=str(tmp_path / "part"), **kw)
    train(part, quiet=True, stop_after_epochs=1)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["progress"]["epoch"] == 1
    train(part, resume=True, quiet=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "epoch_time"} for r in rows]  # noqa: E731
    assert strip(la) == strip(lb)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, model="mlp", epochs=2)
    train(cfg, quiet=True, stop_after_epochs=1)
    before = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    real = torch.nn.CrossEntropyLoss.forward
    calls = {"n": 0}

    def poisoned(self, logits, target):  # the 3rd batch of epoch 2 produces a NaN loss
        calls["n"] += 1
        out = real(self, logits, target)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(cfg, resume=True, quiet=True)
    after = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert after["progress"] == before["progress"]


def test_config_validation_names_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match="'schedule'.*'linear'"):
        RunConfig(schedule="linear")
    with pytest.raises(ConfigError, match="'batch_size'"):
        RunConfig(batch_size=0)
    p = tmp_path / "c.toml"
    p.write_text('epochs = "ten"\n')
    with pytest.raises(ConfigError, match="'epochs': got 'ten'"):
        RunConfig.from_toml(p)
    p.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="unknown config field"):
        RunConfig.from_toml(p)
    p.write_text("epochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.from_toml(p)


def test_lr_schedules():
    assert lr_factor(0, 100, "constant", [], 0.1) == 1.0
    assert lr_factor(49, 100, "multistep", [0.5, 0.75], 0.1) == 1.0
    assert lr_factor(50, 100, "multistep", [0.5, 0.75], 0.1) == pytest.approx(0.1)
    assert lr_factor(80, 100, "multistep", [0.5, 0.75], 0.1) == pytest.approx(0.01)
    assert lr_factor(0, 100, "cosine", [], 0.1) == 1.0
    assert lr_factor(100, 100, "cosine", [], 0.1) == pytest.approx(0.0)
    assert lr_factor(4, 100, "cosine", [], 0.1, warmup_steps=10) == pytest.approx(0.5)


def test_resume_without_checkpoint_is_clear(tmp_path):
    from bnlab.train import TrainingError

    with pytest.raises(TrainingError, match="no checkpoint"):
        train(_cfg(tmp_path), resume=True, quiet=True)


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    s = train(_cfg(tmp_path, amp="bf16", channels_last=True, epochs=1), quiet=True)
    assert s["train_loss"] is not None and s["train_loss"] == s["train_loss"]


def test_compile_runs(tmp_path):
    pytest.importorskip("torch._dynamo")
    s = train(_cfg(tmp_path, model="mlp", compile=True, epochs=1, max_steps_per_epoch=2), quiet=True)
    assert s["epochs"] == 1


@pytest.mark.parametrize("model", ["mlp", "plainnet18", "plainnet34", "resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("optim", ["gsgd", "sgd"])
def test_trainer_runs_every_pbn_model(tmp_path, model, optim):
    s = train(_cfg(tmp_path, model=model, norm="pbn", optim=optim, width=0.0625, epochs=1, max_steps_per_epoch=2,
                   batch_size=16, train_subset=64, test_subset=32, momentum=0.0, weight_decay=1e-4, augment=False),
              quiet=True)
    assert s["epochs"] == 1 and s["train_loss"] == s["train_loss"]


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "relu", "selu", "silu"])
def test_trainer_runs_cbn_for_every_activation(tmp_path, act):
    s = train(_cfg(tmp_path, norm="cbn", act=act, epochs=1, max_steps_per_epoch=3, train_subset=128,
                   test_subset=64, diagnostics_every=1, diagnostics_batches=2), quiet=True)
    assert s["train_loss"] == s["train_loss"] and 0.0 <= s["test_acc"] <= 1.0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["diag/grad_sq_norm"] > 0
