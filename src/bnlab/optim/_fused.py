"""Compiled (``torch.compile``, inductor) step kernels: the opt-in ``fused=True`` paths of PSISGD.

The eager fast path of :class:`bnlab.optim.psi.PSISGD` gathers weights and gradients into flat
buffers and makes ~8 whole-group passes per step (row norms, finite check, ``s * G``, the momentum
update, ``||U||^2``, ``<theta, U>``, the retraction); ``torch.optim.SGD(foreach=True)`` makes 3. The
compiled step below is a pure function of the unit tensors themselves (no gather): inductor turns
it into, per unit, one reduction loop (``s_j = ||theta_j||^2`` and the finite test of ``G``) and one
loop that reads ``theta, G, U`` once, writes ``U`` and ``theta`` in place and reduces
``||theta_new||^2`` (guard), ``||U||^2`` and ``<theta, U>`` (angle telemetry) on the way (C++ on CPU,
Triton on GPU).

Same arithmetic as Algorithm 1 (Yi, UAI 2022, eqs. 10-12; ``docs/methods/psi_manifold.md``):

    s_j   = ||w_j||^2 + b_j^2
    U_j  <- rho U_j - lr s_j G_j            (G = grad (+ lam theta), negated when maximising)
    theta_j <- theta_j + U_j

evaluated in the same operation order as the eager path, so results agree up to the rounding of the
reductions (tests: float64 to 1e-12, float32 to 1e-6, several steps). Nothing is written when the
finite check fails (every write is ``where(ok, new, old)``); the caller then runs the reference path,
which raises the precise error. The overflow guard's rescaling (rare) stays eager in the caller.

Measured on a 2-core CPU (``docs/results/speed_optim.md``): slower than the eager flat path (inductor's
C++ materialises intermediates), 96-139 s to compile for ResNet-56; hence opt-in, for GPUs.

Compilation: ``dynamic=False`` (one graph per model shape set and option combination, cached by
dynamo for the process; its recompile limit, 8 by default, applies: past it dynamo runs the same
function eagerly, still correct). Scalars (lr, rho, ...) are 0-d tensors so that a learning-rate
schedule does not recompile.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = ["psi_update", "compiled_psi_update"]


def _rows(t: Tensor) -> Tensor:
    """``(O, ...)`` -> ``(O, L)`` view (contiguous tensors); 1-D tensors -> ``(O, 1)``."""
    return t.view(t.shape[0], -1)


def psi_update(ws: list[Tensor], gs: list[Tensor], us: list[Tensor], bs: list[Tensor | None],
               gbs: list[Tensor | None], ubs: list[Tensor | None], ang_sum: Tensor, ang_max: Tensor,
               scal: Tensor, *, momentum: bool, maximize: bool, decay: bool, angles: bool, check: bool,
               guard: bool) -> Tensor:
    """One PSI-SGD(M) step of a group's units, in place (eager-callable; compiled by
    :func:`compiled_psi_update`).

    Args:
        ws: unit weights ``(O_k, ...)``, contiguous, ``out_dim = 0``; gs: their gradients; us: momentum
            buffers (ignored unless ``momentum``); bs / gbs / ubs: the units' biases ``(O_k,)``, their
            gradients and buffers, or None.
        ang_sum, ang_max: ``(sum O_k,)`` per-row running sum / max of the angular step (updated when
            ``angles``).
        scal: ``(4,)`` ``[lr, rho, lam, renorm_threshold]`` (threshold ``inf`` when the guard is off).
        momentum, maximize, decay, angles, check, guard: static options (``rho != 0``, negate the
            gradient, ``lam != 0``, accumulate angles, finite check, compute ``||theta_new||``).

    Returns:
        ``(2 + sum O_k,)``: ``[ok, any row above the threshold, ||theta_j^new|| ...]`` (``ok`` = 0:
        non-finite gradient or weights, or a zero-norm unit; then nothing was written).
    """
    lr, rho, lam, thr = scal[0], scal[1], scal[2], scal[3]
    # phase 1 (reads theta and G): s_j and the finite test
    ss, gsum = [], []
    for w, g, b, gb in zip(ws, gs, bs, gbs):
        s = _rows(w).square().sum(1)
        if b is not None:
            s = s + b.square()
        ss.append(s)
        if check:
            gsum.append(g.sum() if gb is None else g.sum() + gb.sum())
    s_all = torch.cat(ss)
    if check:
        ok = torch.isfinite(torch.stack(gsum).sum() + s_all.sum()) & (s_all.amin() > 0)
    else:
        ok = torch.ones((), dtype=torch.bool, device=s_all.device)
    # phase 2 (reads theta, G, U; writes U, theta): the update and the row reductions
    nrms, angs = [], []
    for w, g, u, b, gb, ub, s in zip(ws, gs, us, bs, gbs, ubs, ss):
        parts = [(_rows(w), _rows(g), _rows(u) if momentum else None)]
        if b is not None:
            parts.append((b[:, None], gb[:, None], ub[:, None] if momentum else None))  # type: ignore[index]
        n2 = dd = dot = None
        writes = []
        for th, gr, bu in parts:
            if maximize:
                gr = -gr
            if decay:
                gr = gr + th * lam                                     # coupled L2 (spec Sec. 3.7)
            # eq. 11 (paper form) with the Riemannian gradient s G (eq. 7) as the eager paths round it
            delta = bu * rho + gr * (-lr) * s[:, None] if momentum else (gr * s[:, None]) * (-lr)
            new = th + delta                                           # retraction (Prop. 3)
            if guard:
                a = new.square().sum(1)
                n2 = a if n2 is None else n2 + a
            if angles:
                a, c = delta.square().sum(1), (th * delta).sum(1)
                dd = a if dd is None else dd + a
                dot = c if dot is None else dot + c
            writes.append((th, new, bu, delta))
        for th, new, bu, delta in writes:
            if momentum:
                bu.copy_(torch.where(ok, delta, bu))
            th.copy_(torch.where(ok, new, th))
        if guard:
            nrms.append(n2.sqrt())  # type: ignore[union-attr]
        if angles:
            r = s.sqrt()
            angs.append(torch.atan2((dd - dot.square() / s).clamp_min(0).sqrt(), r + dot / r))  # type: ignore[union-attr,operator]
    if angles:
        ang = torch.cat(angs)
        ang_sum.copy_(torch.where(ok, ang_sum + ang, ang_sum))
        ang_max.copy_(torch.where(ok, torch.maximum(ang_max, ang), ang_max))
    flags = [ok.to(s_all.dtype)]
    if guard:
        nrm = torch.cat(nrms)
        flags.append((nrm > thr).any().to(s_all.dtype))
    else:
        nrm = s_all.new_zeros(0)
        flags.append(s_all.new_zeros(()))
    return torch.cat([torch.stack(flags), nrm])


@functools.cache
def compiled_psi_update() -> Any:
    """``torch.compile(psi_update, dynamic=False, fullgraph=True)`` (created once per process)."""
    return torch.compile(psi_update, dynamic=False, fullgraph=True)

