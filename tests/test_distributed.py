"""Cross-process statistics (2 gloo processes) equal single-process statistics on the concatenated
batch, for every bnlab norm; DDP + SGD/PSISGD/GSGD keep identical state on every rank; the
conversions of bnlab.nn.convert (sync/unsync, SyncBatchNorm guard, replace_norms, fold_bn)."""

from __future__ import annotations

import dist_workers as W
import pytest
import torch
from torch import nn

from bnlab.models import build
from bnlab.nn import BatchNormAct2d, BatchStats
from bnlab.nn.convert import (
    fold_bn,
    guard_sync_batchnorm,
    replace_norms,
    sync,
    unguard_sync_batchnorm,
    unsync,
)

TOL = dict(rtol=1e-10, atol=1e-11)
LAYER_CASES = {c[0]: c for c in W.layer_cases()}
MODEL_CASES = {c[0]: c for c in W.model_cases()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """float64 references are tiny; intra-op threads only contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    """One 2-process gloo job runs every case (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("dist")
    W.spawn(W.run_all, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]


def _close(a, b, what):
    assert a.shape == b.shape, what
    if a.dtype in (torch.int64, torch.bool):
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_matches_concatenated_batch(dist_results, case):
    _, builder, shape, split = LAYER_CASES[case]
    per_rank = [res[case] for res in dist_results]
    if "skip" in per_rank[0]:
        pytest.skip(per_rank[0]["skip"])
    ref = W.run_layer(W.make_layer(builder), shape, slice(None))
    bounds = [0, split[0], split[0] + split[1]]
    for key, value in ref.items():
        if key.startswith(("out", "xgrad", "skipgrad", "eval_out")) and value.numel():
            # per-sample tensors: rank r holds rows [bounds[r], bounds[r+1]) of the reference
            got = torch.cat([res[key] for res in per_rank])
            _close(got, value, f"{case} {key}")
        elif key.startswith("grad"):
            # each rank holds its contribution; DDP would sum (then average) them
            _close(per_rank[0][key] + per_rank[1][key], value, f"{case} {key}")
        elif key.startswith("buffer"):
            for r in range(W.WORLD):
                _close(per_rank[r][key], value, f"{case} {key} rank {r}")
            assert torch.equal(per_rank[0][key], per_rank[1][key]), f"{case} {key} differs across ranks"
    assert bounds[-1] == shape[0]


def _flat_opt_state(state: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for pid, st in state["state"].items():
        for k, v in st.items():
            flat[f"{pid}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    return flat


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_ddp_training_matches_global_batch(dist_results, case):
    _, spec, optim, okw = MODEL_CASES[case]
    r0, r1 = (res[case] for res in dist_results)
    if "skip" in r0:
        pytest.skip(f"{optim} / {spec['norm']} not available: {r0['skip']}")
    model, opt = W.make_model(spec, optim, okw)
    W.train_model(model, opt, slice(None))
    ref = W.model_result(model, opt)
    flat = [_flat_opt_state(r["opt"]) for r in (r0, r1)]
    ref_flat = _flat_opt_state(ref["opt"])
    assert set(flat[0]) == set(ref_flat) and ref_flat, case
    for k, v in ref_flat.items():
        assert torch.equal(flat[0][k], flat[1][k]), f"{case}: optimizer state {k} differs across ranks"
        _close(flat[0][k].to(v.dtype), v, f"{case} optimizer state {k}")
    for k, v in ref.items():
        if k == "opt":
            continue
        assert torch.equal(r0[k], r1[k]), f"{case}: {k} differs across ranks"
        _close(r0[k], v, f"{case} {k}")


# -- conversions (single process) -------------------------------------------------------------
def test_sync_unsync_set_every_stats_layer():
    model = build("resnet20", norm="cbn:double", width=0.25)
    layers = [m for m in model.modules() if isinstance(m, BatchStats)]
    assert layers and not any(m.sync_stats for m in layers)
    group = object()
    assert sync(model, process_group=group) is model
    assert all(m.sync_stats and m.process_group is group for m in layers)
    unsync(model)
    assert not any(m.sync_stats or m.process_group is not None for m in layers)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        sync(3)


def test_synced_layer_without_process_group_is_plain_bn():
    bn, ref = sync(BatchNormAct2d(3, None)).double(), nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(bn(x), ref(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=1e-12)


def test_stock_syncbn_converter_refuses_bnlab_layers():
    guard_sync_batchnorm()
    guard_sync_batchnorm()  # idempotent
    model = build("resnet20", norm="cbn", width=0.25)
    with pytest.raises(TypeError, match=r"bnlab.nn.convert.sync\(model"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(plain)
    assert type(converted[1]) is nn.SyncBatchNorm
    unguard_sync_batchnorm()
    try:  # the unguarded converter is the one that silently drops BatchNormAct's activation
        bad = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(4, "relu")))
        assert type(bad[0]) is nn.SyncBatchNorm
        assert (bad(torch.randn(4, 4, 2, 2)) < 0).any()  # the ReLU is gone
    finally:
        guard_sync_batchnorm()
    with pytest.raises(TypeError, match="BatchNormAct2d|BatchNormAct"):
        nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(4, "relu")))


@pytest.mark.parametrize("name,norm", [("resnet20", "cbn"), ("resnet50", "cbn:post_bn"), ("vgg11", "none"),
                                       ("mlp", "cbn:split_post"), ("plainnet18", "cbn:double"),
                                       ("resnet20", "bn")])
def test_replace_norms_gives_the_built_model(name, norm):
    kw = dict(act="tanh", width=0.25, input_size=8)
    target = build(name, norm=norm, **kw)
    src = build(name, norm="bn", **kw)
    swapped = replace_norms(src, norm)
    assert swapped is not src and isinstance(src.modules().__next__(), nn.Module)
    a, b = target.state_dict(), swapped.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    swapped.load_state_dict(a)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(swapped(x), target(x), rtol=0, atol=0)
    # the act was inferred from the model (tanh), and convs/classifier kept their weights
    src_sd = src.state_dict()
    swapped2 = replace_norms(src, norm)
    assert torch.equal(swapped2.fc.weight, src_sd["fc.weight"])


def test_replace_norms_errors():
    model = build("resnet20", width=0.25)
    with pytest.raises(ValueError, match="to_path_space"):
        replace_norms(model, "pbn")
    with pytest.raises(ValueError, match="unknown norm 'xbn'"):
        replace_norms(model, "xbn")
    with pytest.raises(TypeError, match="family_or_name must be a norm name or a NormFamily, got int"):
        replace_norms(model, 3)
    with pytest.raises(ValueError, match="path space"):
        replace_norms(build("mlp", norm="pbn", hidden=[4, 4], input_size=4), "cbn")
    with pytest.raises(ValueError, match="no ConvUnit"):
        replace_norms(nn.Sequential(nn.Linear(2, 2)), "bn")


def _trained_stats(model: nn.Module, shape, steps: int = 5) -> nn.Module:
    """Give every BN non-trivial running stats and affine parameters."""
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
        for _ in range(steps):
            model(torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "vgg11", "mlp", "plainnet18"])
def test_fold_bn_is_exact(name):
    model = _trained_stats(build(name, act="silu", width=0.25, input_size=8).double(), (6, 3, 8, 8))
    folded = fold_bn(model)
    assert folded is not model
    assert not any(type(m).__name__.startswith("BatchNormAct") for m in folded.modules())
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_bn_sequential_and_unfoldable_layers():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), BatchNormAct2d(4, "relu"),
                        nn.Conv2d(4, 4, 1), BatchNormAct2d(4, None, track_running_stats=False)).double()
    seq = _trained_stats(seq, (4, 3, 5, 5))
    folded = fold_bn(seq)
    assert isinstance(folded[1], nn.ReLU) and isinstance(folded[3], BatchNormAct2d)  # batch-stat BN kept
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), seq(x), rtol=1e-10, atol=1e-10)
    cbn = _trained_stats(build("resnet20", norm="cbn", width=0.25).double(), (4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fold_bn(cbn)(x), cbn(x), rtol=0, atol=0)  # nothing to fold: unchanged
    pbn = _trained_stats(build("mlp", norm="pbn", hidden=[4, 4], input_size=4).double(), (4, 3, 4, 4))
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(fold_bn(pbn)(x), pbn(x), rtol=0, atol=0)  # path-space units untouched
