"""The flat fast path of GSGD (bnlab.optim._gsgd_flat) is bit-identical to the per-block path, keeps its
state consistent across checkpoints, device/dtype moves and fallbacks, and never writes on a failed check."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_gsgd import _random_block
from torch import nn

import bnlab.optim._gsgd_flat as flat_mod
import bnlab.path as bpath
from bnlab.models import build
from bnlab.optim import GSGD, make_optimizer

CONFIGS = [dict(), dict(weight_decay=0.01), dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.01),
           dict(momentum=0.8, dampening=0.3, weight_decay=0.02), dict(momentum=0.9, nesterov=True),
           dict(momentum=0.9, nesterov=True, weight_decay=0.01), dict(momentum=0.9, r_min=0.5)]
# conv blocks with a mid layer and mixed taps, two blocks of one shape (a "run"), an MLP block
SHAPES = [[(6, 3, 3, 3), (6, 6, 3, 3), (4, 6, 1, 1)], [(4, 4, 3, 3), (4, 4, 3, 3)], [(4, 4, 3, 3), (4, 4, 3, 3)],
          [(5, 4), (5, 5), (3, 5)]]


def _blocks(dtype: torch.dtype, seed: int = 3) -> list[list[nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [[nn.Parameter(w) for w in _random_block(shp, g, dtype)[0]] for shp in SHAPES]


def _opt(blocks, flat: bool, **kw) -> GSGD:
    groups = [{"params": b, "roles": bpath.roles_for(len(b)), "block": f"b{i}"} for i, b in enumerate(blocks)]
    return GSGD(groups, lr=0.05, flat=flat, **kw)


def _grads(blocks, gen: torch.Generator, scale: float = 0.2) -> list[list[torch.Tensor]]:
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale for p in b] for b in blocks]


def _set(blocks, grads) -> None:
    for b, gs in zip(blocks, grads):
        for p, g in zip(b, gs):
            p.grad = g.clone()


def _assert_same(oa: GSGD, ob: GSGD, ba, bb) -> None:
    for x, y in zip(ba, bb):
        for p, q in zip(x, y):
            assert torch.equal(p, q)
            for k in ("momentum_buffer", "skeleton_buffer"):
                sa, sb = oa.state[p].get(k), ob.state[q].get(k)
                assert (sa is None) == (sb is None)
                if sa is not None:
                    assert torch.equal(sa, sb), k


@pytest.fixture(params=["gather", "in_place"])
def mode(request, monkeypatch):
    monkeypatch.setattr(flat_mod, "GATHER_MAX", 1 << 30 if request.param == "gather" else 0)
    return request.param


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_path_bit_identical_to_per_block_path(kw, dtype, mode):
    """Five steps with fresh gradients: weights, momentum and skeleton buffers bitwise equal, and the flat path
    actually ran (its layout exists, the parameters are views of its flat buffers)."""
    ba, bb = _blocks(dtype), _blocks(dtype)
    oa, ob = _opt(ba, True, **kw), _opt(bb, False, **kw)
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        gs = _grads(ba, gen)
        _set(ba, gs)
        _set(bb, gs)
        oa.step()
        ob.step()
        _assert_same(oa, ob, ba, bb)
    (fb,) = oa._flats.values()
    assert fb.gather_mode == (mode == "gather")
    assert all(p.data_ptr() == v.data_ptr() for p, v in zip(fb.params, fb.w1 + fb.w2))
    assert ob._flats == {}
    assert oa.telemetry()["gsgd_min_R"] == ob.telemetry()["gsgd_min_R"]


def test_nonfinite_gradient_raises_and_writes_nothing(mode):
    """A NaN in a layer-1 gradient (and an inf in a layer-2 one) on the flat path: FloatingPointError, and
    weights, momentum and skeleton buffers are unchanged bit for bit."""
    blocks = _blocks(torch.float64)
    opt = _opt(blocks, True, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        _set(blocks, _grads(blocks, gen))
        opt.step()
    assert opt._flats
    for where in [(1, 0), (3, 2)]:
        before = [p.detach().clone() for b in blocks for p in b]
        bufs = [opt.state[p]["momentum_buffer"].clone() for b in blocks for p in b]
        sk = [opt.state[b[0]]["skeleton_buffer"].clone() for b in blocks]
        gs = _grads(blocks, gen)
        gs[where[0]][where[1]].view(-1)[3] = float("nan") if where[1] == 0 else float("inf")
        _set(blocks, gs)
        with pytest.raises(FloatingPointError, match="no weight was changed"):
            opt.step()
        params = [p for b in blocks for p in b]
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(bufs, params))
        assert all(torch.equal(a, opt.state[b[0]]["skeleton_buffer"]) for a, b in zip(sk, blocks))


def test_missing_gradient_falls_back_and_returns_to_flat():
    """A block without a gradient in one step: that step runs the per-block path (the batch differs); the
    result equals the per-block optimiser throughout, and the flat path resumes."""
    ba, bb = _blocks(torch.float64), _blocks(torch.float64)
    oa, ob = _opt(ba, True, momentum=0.9, weight_decay=0.01), _opt(bb, False, momentum=0.9, weight_decay=0.01)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        gs = _grads(ba, gen)
        _set(ba, gs)
        _set(bb, gs)
        if step == 3:
            for p, q in zip(ba[2], bb[2]):
                p.grad = q.grad = None
        if step == 4:
            ba[1][1].grad = bb[1][1].grad = None  # partly missing: the per-block path uses zeros
        oa.step()
        ob.step()
        _assert_same(oa, ob, ba, bb)
    assert any(fb.valid(fb.groups, oa.state) for fb in oa._flats.values())


def test_state_dict_round_trip_and_replaced_storage():
    """Checkpoint (torch.save / weights_only load) into a fresh optimiser, a dtype round trip of the
    parameters and a replaced ``p.data``: the flat layout is rebuilt from the new tensors, and the runs stay
    equal to an uninterrupted per-block run."""
    ba, bb = _blocks(torch.float64), _blocks(torch.float64)
    kw = dict(momentum=0.9, weight_decay=0.01)
    oa, ob = _opt(ba, True, **kw), _opt(bb, False, **kw)
    gen = torch.Generator().manual_seed(4)

    def step():
        gs = _grads(ba, gen)
        _set(ba, gs)
        _set(bb, gs)
        oa.step()
        ob.step()

    for _ in range(3):
        step()
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    oa = _opt(ba, True, **kw)
    oa.load_state_dict(torch.load(buf, weights_only=True))
    step()
    _assert_same(oa, ob, ba, bb)
    for b in ba:                                    # storage replaced behind the optimiser's back
        for p in b:
            p.data = p.data.to(torch.float32).to(torch.float64)
    for b in bb:
        for p in b:
            p.data = p.data.to(torch.float32).to(torch.float64)
    step()
    step()
    _assert_same(oa, ob, ba, bb)
    (fb,) = oa._flats.values()
    assert all(p.data_ptr() == v.data_ptr() for p, v in zip(fb.params, fb.w1 + fb.w2))


def test_model_state_dict_and_deepcopy_on_a_resnet():
    """A path-space ResNet with ``make_optimizer("gsgd")``: model.load_state_dict writes into the flat
    views, a deep copy of model and optimiser continues independently, and the flat run equals the
    per-block run (float64, real gradients)."""
    torch.manual_seed(0)
    base = build("resnet20", norm="pbn", width=0.25).double()
    ma, mb = copy.deepcopy(base), copy.deepcopy(base)
    oa = make_optimizer("gsgd", ma, lr=0.01, momentum=0.9)
    ob = make_optimizer("gsgd", mb, lr=0.01, momentum=0.9, flat=False)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])

    def step(m, o):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(ma, oa)
        step(mb, ob)
    assert oa._flats and not ob._flats
    snapshot = copy.deepcopy(mb.state_dict())
    ma.load_state_dict(snapshot)                    # in place: the flat views stay
    assert all(fb.valid(fb.groups, oa.state) for fb in oa._flats.values())
    mc, oc = copy.deepcopy((ma, oa))
    for _ in range(2):
        step(ma, oa)
        step(mb, ob)
        step(mc, oc)
    for a, b, c in zip(ma.state_dict().values(), mb.state_dict().values(), mc.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_lr_schedule_keeps_one_layout_and_matches_per_block():
    """An lr (and weight-decay) change every step, as a scheduler makes: one flat layout built once (no
    rebuild, no stale buffers kept), results bitwise equal to the per-block path; a batch whose composition
    changes (a block without gradients) leaves at most one cached layout per parameter."""
    ba, bb = _blocks(torch.float64), _blocks(torch.float64)
    oa, ob = _opt(ba, True, momentum=0.9), _opt(bb, False, momentum=0.9)
    builds = []
    orig = flat_mod.FlatBatch.__init__

    def counting_init(self, *a, **k):
        builds.append(1)
        orig(self, *a, **k)

    gen = torch.Generator().manual_seed(9)
    for step in range(6):
        for o in (oa, ob):
            for g in o.param_groups:
                g["lr"], g["weight_decay"] = 0.05 * 0.8 ** step, 0.01 * step
        gs = _grads(ba, gen)
        _set(ba, gs)
        _set(bb, gs)
        if step == 4:
            for p, q in zip(ba[0], bb[0]):
                p.grad = q.grad = None
        flat_mod.FlatBatch.__init__ = counting_init
        try:
            oa.step()
        finally:
            flat_mod.FlatBatch.__init__ = orig
        ob.step()
        _assert_same(oa, ob, ba, bb)
        owners = [id(p) for fb in oa._flats.values() for p in fb.params]
        assert len(owners) == len(set(owners))
    assert len(builds) == 3  # after the first (per-block) step; at step 4 (3 blocks); at step 5 (all again)
