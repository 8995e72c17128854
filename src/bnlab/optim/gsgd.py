"""G-SGD: SGD on basis-path values, executed on the weights (Meng et al., ICLR 2019; restated in
Luo et al., UAI 2021, eqs 6-7; update of pbn.md Sec. 4.2).

Per block (weights ``U^1..U^n``, masks ``M^l``, ``N^l = 1 - M^l``, gradients ``g^l``, lr ``eta``)::

    v[k]     = U^1[k, k mod C_in, centre]                   skeleton path values (H,)
    sigma[k] = sum_{l>=2} sum_{o, taps} (N^l U^l g^l)[o, k]  (H,)
    path gradients:  d_s = gs - sigma / v;  d^1 = N^1 (g^1 + wd U^1);  d^l = N^l (g^l / v_k + wd U^l v_k)
    (momentum extension: SGD momentum buffers on these path gradients, D = buf or d)
    R        = 1 - eta * D_s / v                             path ratio of skeleton path k
    U^1     <- N^1 (U^1 - eta D^1) + M^1 U^1 R[row]
    U^l     <- N^l (U^l - eta D^l / v_k) / R_k + M^l U^l     (skeleton constants untouched)

which is exactly ``torch.optim.SGD`` (with the same momentum/dampening/Nesterov rules) on the
coordinates ``{v_k} u {layer-1 non-skeleton} u {v^l = U^l v_k}``, with weight decay
``(wd/2) sum v_p^2`` on the non-skeleton path values only (official code, pbn.md Sec. 4.2 / 7 #9).
``wnorm=True`` reproduces the "G-SGD + BN(wnorm)" baseline (pbn.md Sec. 4.3): non-skeleton gradients
are multiplied by ``||U^l[o, :, taps]||`` (norm over input channels), the skeleton gradient divided by
that of layer 1's centre tap. Groups without ``roles`` are ``torch.optim.SGD`` exactly.

Implementation (``GSGD.step``): the masked formulas above are evaluated densely and in place
(``mul_``/``addcmul_`` with per-input-channel scale vectors, broadcast as contiguous rows of a
``(C_out, H * taps)`` view), then the ``H`` skeleton entries per layer are fixed with ``index_copy_``
(layer 1: ``v R``; layers >= 2: their saved constants; momentum buffers: 0), ``sigma`` is the dense
``sum(w * g)`` minus the skeleton terms, blocks with equal hyper-parameters share one set of (H,)
vector ops and ``torch._foreach_*`` calls on layer 1. Plain groups run
:func:`bnlab.optim.psi.flat_sgd_step` (``torch.optim.SGD(foreach=True)`` bit for bit on one flat
buffer; their contiguous parameters become views of it, ``p.data`` set once). ``gsgd_step_block`` is the plain masked,
out-of-place form, kept as a readable reference (the tests use their own copy).
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _sgd_functional

from ..path.skeleton import ROLES
from ._gsgd_flat import FlatBatch, eligible, skeleton_entries
from .psi import flat_sgd_step

__all__ = ["GSGD", "gsgd_step_block"]


def _col(t: Tensor, dim: int) -> Tensor:
    """(H,) -> broadcastable along dim 1 of a ``dim``-D weight."""
    return t.view(1, -1, *([1] * (dim - 2)))


def _row(t: Tensor, dim: int) -> Tensor:
    return t.view(-1, *([1] * (dim - 1)))


def gsgd_step_block(
    weights: list[Tensor], grads: list[Tensor], masks: list[Tensor], *, lr: float, weight_decay: float,
    momentum: float, dampening: float, nesterov: bool, wnorm: bool, r_min: float | None,
    buffers: list[Tensor | None], skel_buffer: Tensor | None,
) -> tuple[list[Tensor], list[Tensor | None], Tensor | None, Tensor, Tensor, Tensor]:
    """One G-SGD step of one block (pure, out-of-place reference; ``GSGD.step`` uses the in-place path).

    weights/grads/masks: ``[U^1 (H, C_in, *k), U^2 (*, H, *k), ...]``. Returns ``(new weights,
    new path-space buffers, new skeleton buffer, v (H,), R (H,), number of clamped R)``.
    """
    w0, g0, m0 = weights[0], grads[0], masks[0]
    red0 = (1, *range(2, w0.dim()))
    v = (w0 * m0).sum(red0)
    gs = (g0 * m0).sum(red0)
    sigma = torch.zeros_like(v)
    for w, g, m in zip(weights[1:], grads[1:], masks[1:]):
        sigma = sigma + ((1 - m) * w * g).sum((0, *range(2, w.dim())))
    wn = [w.norm(2, dim=1, keepdim=True) if wnorm else None for w in weights]
    if wnorm:
        d_s = (v * gs - sigma) / (v * (wn[0] * m0).sum(red0))
    else:
        d_s = gs - sigma / v
    ds: list[Tensor] = []
    for idx, (w, g, m) in enumerate(zip(weights, grads, masks)):
        gg = g * wn[idx] if wnorm else g
        if idx == 0:
            d = (1 - m) * (gg + weight_decay * w)
        else:
            vc = _col(v, w.dim())
            d = (1 - m) * (gg / vc + weight_decay * w * vc)
        ds.append(d)
    # SGD momentum in path space (torch.optim.SGD rules: first buffer = clone of the gradient)
    new_bufs: list[Tensor | None] = []
    if momentum != 0:
        steps = []
        for d, buf in zip([d_s, *ds], [skel_buffer, *buffers]):
            if buf is None:
                buf = d.clone()
            else:
                buf = buf * momentum + d * (1 - dampening)
            new_bufs.append(buf)
            steps.append(d + momentum * buf if nesterov else buf)
        d_s, ds = steps[0], steps[1:]
        skel_buffer, buffers = new_bufs[0], new_bufs[1:]
    R = 1 - lr * d_s / v
    clamped = torch.zeros((), device=v.device)
    if r_min is not None:
        clamped = (R < r_min).sum()
        R = R.clamp_min(r_min)
    new = [torch.where(m0.bool(), w0 * _row(R, w0.dim()), w0 - lr * ds[0])]
    for w, d, m in zip(weights[1:], ds[1:], masks[1:]):
        vc, rc = _col(v, w.dim()), _col(R, w.dim())
        new.append(torch.where(m.bool(), w, (w - lr * d / vc) / rc))
    return new, list(buffers), skel_buffer, v, R, clamped


class _Layer:
    """Cached per-layer data of the fast step: the ``H`` skeleton entries, ordered by hidden channel k
    (rows of layer 1, input channels of layers >= 2), as an index tuple and as flat offsets into a
    contiguous tensor; ``taps`` = elements per (row, input channel)."""

    __slots__ = ("flat", "index", "taps")

    def __init__(self, shape: torch.Size, role: str, device: torch.device) -> None:
        nz, self.flat = skeleton_entries(shape, role, device)
        self.index = tuple(nz.unbind(1))
        self.taps = math.prod(shape[2:])


_HYPER = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize", "wnorm", "r_min")
_hyper = operator.itemgetter(*_HYPER)


class _Prep(NamedTuple):
    """Read-only step data of blocks sharing hyper-parameters (see ``GSGD._prepare``); ``v``, ``R``,
    ``sbuf``: the blocks' (H,) vectors concatenated, ``sizes``: their H."""

    groups: list[dict[str, Any]]
    ws: list[list[Tensor]]
    g0: list[Tensor]
    gd: list[list[Tensor]]
    lays: list[list[_Layer]]
    sizes: list[int]
    v: Tensor
    R: Tensor
    sbuf: Tensor | None
    clamped: Tensor | None
    flat: FlatBatch | None = None
    g1sum: Tensor | None = None


def _fast(*ts: Tensor | None) -> bool:
    return all(t is None or t.is_contiguous() for t in ts)


def _take(t: Tensor, lay: _Layer) -> Tensor:
    """The skeleton entries of ``t`` (H,), ordered by k."""
    return t.view(-1).index_select(0, lay.flat) if t.is_contiguous() else t[lay.index]


def _put(t: Tensor, lay: _Layer, vals: Tensor) -> None:
    """Overwrite the skeleton entries of ``t`` in place."""
    if t.is_contiguous():
        t.view(-1).index_copy_(0, lay.flat, vals)
    else:
        t.index_put_(lay.index, vals)


def _flat2(t: Tensor) -> Tensor:
    """``(C_out, C_in * taps)`` view of a contiguous weight-shaped tensor."""
    return t.view(t.shape[0], -1)


def _spread(vecs: Tensor, taps: int) -> Tensor:
    """``(n, H)`` per-input-channel vectors -> ``(n, H * taps)``, each repeated ``taps`` times: they
    broadcast against :func:`_flat2` views as a contiguous row (on CPU ~5-10x faster than
    broadcasting ``(1, H, 1, 1)`` against a ``(C_out, H, kh, kw)`` weight)."""
    return vecs if taps == 1 else vecs.unsqueeze(2).expand(-1, -1, taps).reshape(vecs.shape[0], -1)


def _sigma_term(w: Tensor, g: Tensor, lay: _Layer, scratch: Tensor) -> Tensor:
    """``sum_{o, taps} (N * w * g)[o, k]`` (H,): the dense sum minus the skeleton term. The product
    goes to ``scratch`` (1-D, >= ``w.numel()``): a fresh multi-MB tensor per layer and step costs ~5x
    the multiply itself on CPU (page faults)."""
    same = w.dtype == g.dtype == scratch.dtype and w.device == g.device == scratch.device
    prod = torch.mul(w, g, out=scratch[: w.numel()].view(w.shape)) if same and _fast(w, g) else w * g
    if prod.is_contiguous():
        dense = prod.view(w.shape[0], -1).sum(0)
        dense = dense.view(-1, lay.taps).sum(1) if lay.taps > 1 else dense
    else:
        dense = prod.sum((0, *range(2, w.dim())))
    return dense - _take(w, lay) * _take(g, lay)


def _path_ratio(hp: dict[str, Any], d_s: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
    """``R = 1 - lr D_s / v`` (sum H,) and, with ``r_min``, the number of clamped entries (then clamped)."""
    R = 1 - hp["lr"] * d_s / v
    if hp["r_min"] is None:
        return R, None
    return R.clamp_min(hp["r_min"]), (R < hp["r_min"]).sum()


_COEF_NAMES = {(False, False): ("a_w", "b_g"), (True, False): ("a_w", "c_buf", "e_g", "f_w"),
               (True, True): ("a_w", "b_g", "c_buf", "e_g", "f_w")}


def _rest_coefficients(hp: dict[str, Any], v: Tensor, R: Tensor) -> tuple[tuple[str, ...], list[Tensor]]:
    """Per-input-channel coefficients (sum H,) of the layers >= 2 update ``U <- a U [+ b g] [+ c buf]``,
    ``buf <- mom buf + e g [+ f U]``: their names and values (``f`` only with weight decay)."""
    lr, wd, mom, damp, nest = (hp[k] for k in ("lr", "weight_decay", "momentum", "dampening", "nesterov"))
    inv_v, inv_r = 1 / v, 1 / R
    vecs = [inv_r * (1 - lr * wd) if wd and (mom == 0 or nest) else inv_r]
    if mom == 0 or nest:
        vecs.append(-lr * inv_v * inv_v * inv_r)
    if mom != 0:
        vecs += [(-lr * mom if nest else -lr) * inv_v * inv_r, (1 - damp) * inv_v]
        if wd:
            vecs.append(wd * (1 - damp) * v)
    return _COEF_NAMES[(mom != 0, bool(nest) and mom != 0)][:len(vecs)], vecs


class GSGD(Optimizer):
    """G-SGD (see module docstring). ``params``: :func:`bnlab.path.param_groups` output: groups with
    ``roles`` (a block's weights, in order) get the path-space update; groups without are plain SGD.

    Args: ``lr``, ``momentum`` (path-space momentum for blocks: an extension, 0 in the papers),
    ``dampening``, ``weight_decay`` (path-space decay for blocks, coupled L2 elsewhere), ``nesterov``,
    ``maximize``, ``foreach`` (plain-SGD groups), ``wnorm`` ("G-SGD + BN(wnorm)"), ``r_min`` (clamp
    ``R_k`` from below; ``None``: off, faithful), ``check`` (warn when ``R_k <= 0``, raise on
    non-finite/zero ``R``, ``v = 0`` or non-finite gradients before writing; one device sync and a
    sum over the layer-1 gradients per step), ``flat`` (the flat fast path of
    :mod:`bnlab.optim._gsgd_flat`, bit-identical to the per-block path: block weights and buffers
    become views of flat buffers; ``False``: always the per-block path).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, wnorm: bool = False, r_min: float | None = None,
                 check: bool = True, flat: bool = True) -> None:
        for name, val in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ValueError(f"{name} must be a float >= 0, got {val!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov requires momentum > 0 and dampening = 0, got momentum={momentum!r}, "
                             f"dampening={dampening!r}")
        if r_min is not None and not (isinstance(r_min, (int, float)) and r_min > 0):
            raise ValueError(f"r_min must be None or a float > 0, got {r_min!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, fused=None, wnorm=wnorm,
                        r_min=r_min, roles=None, block="", differentiable=False)
        super().__init__(params, defaults)
        self.check = check
        self.flat = flat
        self._flats: dict[tuple, FlatBatch] = {}  # flat layouts of block batches, by their groups
        self._layers: dict[tuple, _Layer] = {}
        self._scratches: dict[tuple, Tensor] = {}
        self._elayouts: dict[int, Any] = {}  # flat layouts of the plain groups (bnlab.optim.psi.flat_sgd_step)
        self._warned: set[str] = set()
        self._reset_telemetry()
        for group in self.param_groups:
            self._validate_group(group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        roles = group["roles"]
        if roles is None:
            return
        name = group.get("block") or "?"
        params = group["params"]
        if len(roles) != len(params) or len(params) < 2:
            raise ValueError(f"GSGD block {name!r}: roles {roles} must list one role per weight "
                             "(>= 2 weights)")
        if roles[0] != "first" or roles[-1] != "last" or any(r != "mid" for r in roles[1:-1]) or \
                any(r not in ROLES for r in roles):
            raise ValueError(f"GSGD block {name!r}: roles must be first, mid..., last; got {roles}")
        h = params[0].shape[0]
        for i, p in enumerate(params[1:], 2):
            if p.dim() < 2 or p.shape[1] != h or (i < len(params) and p.shape[0] != h):
                raise ValueError(f"GSGD block {name!r}, layer {i}: weight shape {tuple(p.shape)} breaks the "
                                 f"design rule (hidden width {h} in and out of every hidden layer)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_layers"):
            self._validate_group(self.param_groups[-1])

    def __getstate__(self) -> dict[str, Any]:
        """``copy.deepcopy`` / pickle: ``Optimizer``'s state plus this optimiser's settings and telemetry
        (the cached layouts are rebuilt on the next step)."""
        return {**super().__getstate__(), "check": self.check, "flat": self.flat, "_warned": set(self._warned),
                "_tele": dict(self._tele)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._flats, self._layers, self._scratches, self._elayouts = {}, {}, {}, {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``; the flat layouts are rebuilt from the loaded buffers on the next step."""
        self._flats, self._elayouts = {}, {}
        super().load_state_dict(state_dict)

    def _scratch(self, groups: list[dict[str, Any]]) -> Tensor:
        """A reusable 1-D buffer as large as the largest layer >= 2 of ``groups`` (dtype/device of
        the first)."""
        p0 = groups[0]["params"][1]
        n = max(p.numel() for g in groups for p in g["params"][1:])
        key = (p0.dtype, p0.device)
        buf = self._scratches.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratches[key] = torch.empty(n, dtype=p0.dtype, device=p0.device)
        return buf

    def _layer(self, p: Tensor, role: str) -> _Layer:
        key = (tuple(p.shape), role, p.device)
        if key not in self._layers:
            self._layers[key] = _Layer(p.shape, role, p.device)
        return self._layers[key]

    # -- telemetry --------------------------------------------------------------------------------
    def _reset_telemetry(self) -> None:
        self._tele: dict[str, Tensor | int] = {"steps": 0}

    def _record(self, v: Tensor, R: Tensor, clamped: list[Tensor]) -> None:
        """Accumulate (on device, no sync) the statistics of one step; ``v``, ``R``: all blocks."""
        t = self._tele
        mins = torch.stack([v.abs().min(), R.min(), -R.max()])
        n_clamped = torch.stack(clamped).sum().to(R.dtype) if clamped else R.new_zeros(())
        counts = torch.stack([n_clamped, (R <= 0).sum().to(R.dtype)])
        t["mins"] = mins if "mins" not in t else torch.minimum(t["mins"], mins)
        t["counts"] = counts if "counts" not in t else t["counts"] + counts

    def telemetry(self) -> dict[str, float]:
        """Since the last call: ``gsgd_min_abs_v``, ``gsgd_min_R``, ``gsgd_max_R`` over all blocks and
        steps, ``gsgd_clamped`` (R values clamped by ``r_min``), ``gsgd_sign_flips`` (R values <= 0
        applied), ``gsgd_steps``. Resets the counters."""
        t = self._tele
        out = {"gsgd_steps": float(t["steps"])}
        if "mins" in t:
            a, b, c = t["mins"].tolist()
            clamped, flips = t["counts"].tolist()
            out.update(gsgd_min_abs_v=a, gsgd_min_R=b, gsgd_max_R=-c, gsgd_clamped=clamped,
                       gsgd_sign_flips=flips)
        self._reset_telemetry()
        return out

    # -- step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step: plain groups by ``torch.optim.sgd.sgd``; blocks with equal hyper-parameters,
        dtype and device are batched: ``v``, ``sigma``, ``R`` of all of them from the old weights
        (read-only, concatenated (H,) vectors), then, after the check, every block weight is updated
        in place."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches: dict[tuple, list[dict[str, Any]]] = {}
        for gi, group in enumerate(self.param_groups):
            if group["roles"] is None:
                # torch.optim.SGD(foreach=True)'s update on one flat buffer (bit-identical); else torch's kernel
                if not flat_sgd_step(self.state, self._elayouts, gi, group,
                                     True if group["foreach"] is None else group["foreach"]):
                    self._sgd_group(group)
            elif (p0 := group["params"][0]).grad is not None or any(p.grad is not None for p in group["params"]):
                key = (*_hyper(group), p0.dtype, p0.device)
                batches.setdefault(key, []).append(group)
        preps = []
        for groups in batches.values():
            prep = self._prepare_flat(groups) if self.flat else None
            preps.append(self._prepare(groups) if prep is None else prep)
        if preps:
            if self.check:
                self._check(preps)
            for b in preps:
                if b.flat is not None:
                    self._apply_flat(b)
                else:
                    self._apply(b)
            v, R = (torch.cat([getattr(b, n) for b in preps]) for n in ("v", "R"))
            self._record(v, R, [b.clamped for b in preps if b.clamped is not None])
        self._tele["steps"] = int(self._tele["steps"]) + 1
        return loss

    def _sgd_group(self, group: dict[str, Any]) -> None:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                if group["momentum"] != 0:
                    bufs.append(self.state[p].get("momentum_buffer"))
        if not params:
            return
        _sgd_functional(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                        lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                        maximize=group["maximize"], has_sparse_grad=False,
                        foreach=True if group["foreach"] is None else group["foreach"])
        if group["momentum"] != 0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b

    def _prepare(self, groups: list[dict[str, Any]]) -> _Prep:
        """Read-only part of the step of blocks sharing hyper-parameters: per block ``v``, ``gs``
        (skeleton entries of layer 1) and ``sigma``; then, on the concatenated (sum H,) vectors, the
        skeleton path gradient, its momentum buffer and ``R``. Nothing is written."""
        hp = groups[0]
        scratch = self._scratch(groups)
        ws, gds, g0s, lays = [], [], [], []
        vs, gks, sigmas, centres = [], [], [], []
        for group in groups:
            params = group["params"]
            w = [p.detach() for p in params]
            g = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
            if any(t.is_sparse for t in g):
                raise ValueError(f"GSGD block {group['block']!r}: sparse gradients are not supported")
            if hp["maximize"]:
                g = [-t for t in g]
            lay = [self._layer(p, r) for p, r in zip(params, group["roles"])]
            vs.append(_take(w[0], lay[0]))
            gks.append(_take(g[0], lay[0]))
            sigma = _sigma_term(w[1], g[1], lay[1], scratch)
            for wl, gl, ll in zip(w[2:], g[2:], lay[2:]):
                sigma = sigma + _sigma_term(wl, gl, ll, scratch)
            sigmas.append(sigma)
            if hp["wnorm"]:
                wn = [t.norm(2, dim=1, keepdim=True) for t in w]
                i0 = lay[0].index
                centres.append(wn[0][(i0[0], torch.zeros_like(i0[0]), *i0[2:])])
                g_d = [t * n for t, n in zip(g, wn)]
            else:
                g_d = g
            ws.append(w)
            gds.append(g_d)
            g0s.append(g[0])
            lays.append(lay)
        v, gsk, sigma = torch.cat(vs), torch.cat(gks), torch.cat(sigmas)
        d_s = (v * gsk - sigma) / (v * torch.cat(centres)) if hp["wnorm"] else gsk - sigma / v
        mom, sbuf = hp["momentum"], None
        if mom != 0:
            olds = [self.state[g["params"][0]].get("skeleton_buffer") for g in groups]
            if all(s is None for s in olds):
                sbuf = d_s.clone()
            else:
                old = torch.cat([d_s.new_zeros(t.shape) if s is None else s for s, t in zip(olds, vs)])
                has = torch.cat([torch.full(t.shape, s is not None, device=v.device) for s, t in zip(olds, vs)])
                sbuf = torch.where(has, old * mom + d_s * (1 - hp["dampening"]), d_s)
            d_s = d_s + mom * sbuf if hp["nesterov"] else sbuf
        R, clamped = _path_ratio(hp, d_s, v)
        return _Prep(groups, ws, g0s, gds, lays, [t.numel() for t in vs], v, R, sbuf, clamped)

    def _apply(self, b: _Prep) -> None:
        """In-place part: dense updates of every entry (layer 1 of all blocks by ``torch._foreach_*``),
        then the skeleton entries are overwritten (layer 1: ``v R``; layers >= 2: their saved
        constants, bit-identical) and zeroed in the momentum buffers (the path gradient has no
        skeleton component)."""
        hp, state, sizes = b.groups[0], self.state, b.sizes
        lr, wd, mom, damp, nest = (hp[k] for k in ("lr", "weight_decay", "momentum", "dampening", "nesterov"))
        v, R = b.v, b.R
        firsts = [g["params"][0] for g in b.groups]
        if b.sbuf is not None:
            for p, s in zip(firsts, b.sbuf.split(sizes)):
                state[p]["skeleton_buffer"] = s
        # layer 1 of every block: U <- U - lr D off-skeleton (as SGD), U[k, k mod C_in, c] <- v_k R_k
        w1 = [w[0] for w in b.ws]
        g1 = [g[0] for g in b.gd]
        zeros = [t.new_zeros(n) for t, n in zip(w1, sizes)]
        if mom != 0:
            bufs = [state[p].get("momentum_buffer") for p in firsts]
            old = [i for i, t in enumerate(bufs) if t is not None]
            if old:
                ob, og, ow = ([t[i] for i in old] for t in (bufs, g1, w1))
                torch._foreach_mul_(ob, mom)
                torch._foreach_add_(ob, og, alpha=1 - damp)
                if wd:
                    torch._foreach_add_(ob, ow, alpha=wd * (1 - damp))
            for i, t in enumerate(bufs):
                if t is None:                                  # first step: buf = d (torch.optim.SGD)
                    bufs[i] = g1[i].clone()
                    if wd:
                        bufs[i].add_(w1[i], alpha=wd)
                    state[firsts[i]]["momentum_buffer"] = bufs[i]
            for t, lay, z in zip(bufs, b.lays, zeros):
                _put(t, lay[0], z)
        if mom == 0 or nest:
            if wd:
                torch._foreach_mul_(w1, 1 - lr * wd)
            torch._foreach_add_(w1, g1, alpha=-lr)
            if nest:
                torch._foreach_add_(w1, bufs, alpha=-lr * mom)
        else:
            torch._foreach_add_(w1, bufs, alpha=-lr)
        for w, lay, s in zip(w1, b.lays, (v * R).split(sizes)):
            _put(w, lay[0], s)
        # layers >= 2: U <- (U - lr D / v_k) / R_k off-skeleton, D = g / v_k + wd U v_k (or its buffer);
        # written as U <- a U + b g (+ c buf), buf <- mom buf + e g (+ f U), a..f per input channel k
        names, vecs = _rest_coefficients(hp, v, R)
        stacked = torch.stack(vecs).split(sizes, dim=1)
        for group, ws, gs, lays, vb, st, z in zip(b.groups, b.ws, b.gd, b.lays, v.split(sizes), stacked, zeros):
            spread: dict[int, Tensor] = {}
            for p, w, g, lay in zip(group["params"][1:], ws[1:], gs[1:], lays[1:]):
                keep = _take(w, lay)
                buf = state[p].get("momentum_buffer") if mom != 0 else None
                first = mom != 0 and buf is None
                if first:                                      # first step: buf = d (torch.optim.SGD)
                    buf = g / _col(vb, w.dim())
                    if wd:
                        buf.add_(wd * w * _col(vb, w.dim()))
                    _put(buf, lay, z)
                    state[p]["momentum_buffer"] = buf
                if _fast(w, g, buf):
                    if lay.taps not in spread:
                        spread[lay.taps] = _spread(st, lay.taps)
                    col = dict(zip(names, spread[lay.taps].unbind(0)))
                    wv, gv, bv = _flat2(w), _flat2(g), None if buf is None else _flat2(buf)
                else:
                    col = {n: _col(t, w.dim()) for n, t in zip(names, st.unbind(0))}
                    wv, gv, bv = w, g, buf
                if bv is not None and not first:
                    bv.mul_(mom).addcmul_(gv, col["e_g"])
                    if wd:
                        bv.addcmul_(wv, col["f_w"])
                    _put(buf, lay, z)
                wv.mul_(col["a_w"])
                if "b_g" in col:
                    wv.addcmul_(gv, col["b_g"])
                if bv is not None:
                    wv.addcmul_(bv, col["c_buf"])
                _put(w, lay, keep)

    def _prepare_flat(self, groups: list[dict[str, Any]]) -> _Prep | None:
        """:meth:`_prepare` on the flat layout of the batch (built or rebuilt here when needed): the same
        (sum H,) vectors, from a few whole-batch ops. None (nothing done) where the batch does not qualify
        (:func:`bnlab.optim._gsgd_flat.eligible`; e.g. the first step with momentum). Layouts are cached by
        the batch's groups (not their hyper-parameter values: an lr schedule keeps the layout); building one
        drops any cached layout that shares a parameter with it."""
        key = tuple(map(id, groups))
        fb = self._flats.get(key)
        if fb is None or not fb.valid(groups, self.state):
            if not eligible(groups, self.state):
                return None
            mine = {id(p) for g in groups for p in g["params"]}
            for k in [k for k, old in self._flats.items() if any(id(p) in mine for p in old.params)]:
                del self._flats[k]
            fb = self._flats[key] = FlatBatch(groups, self.state)
        if not fb.load_grads():
            return None
        hp = groups[0]
        g1sum = fb.layer1_sum() if self.check else None
        v, gsk = fb.skeleton_values()
        d_s = gsk - fb.sigma() / v
        mom, sbuf = hp["momentum"], None
        if mom != 0:
            sbuf = fb.SB * mom + d_s * (1 - hp["dampening"])
            d_s = d_s + mom * sbuf if hp["nesterov"] else sbuf
        R, clamped = _path_ratio(hp, d_s, v)
        return _Prep(groups, [], fb.g1, [], [], fb.sizes, v, R, sbuf, clamped, fb, g1sum)

    def _apply_flat(self, b: _Prep) -> None:
        """:meth:`_apply` on the flat buffers (the same operations per element, in the same order)."""
        fb, hp = b.flat, b.groups[0]
        assert fb is not None
        lr, wd, mom, damp, nest = (hp[k] for k in ("lr", "weight_decay", "momentum", "dampening", "nesterov"))
        v, R = b.v, b.R
        if b.sbuf is not None:
            fb.SB.copy_(b.sbuf)
        fb.coefficients(torch.stack(_rest_coefficients(hp, v, R)[1]))
        fb.update_rest(mom, wd, nest)
        fb.update_first(lr, mom, damp, wd, nest, v * R)

    def _check(self, preps: list[_Prep]) -> None:
        """Raise ``FloatingPointError`` (before any block weight is written) on non-finite or zero
        ``R``, ``v == 0`` or a non-finite gradient (layer 1 by its sum; layers >= 2 reach ``R``
        through ``sigma``); warn once per block on ``R_k <= 0``. One host sync, ~10 small ops: ``v R`` (the
        new skeleton weights) is finite and non-zero iff ``v R / (v R)`` is finite; the per-block
        details are computed only when a flag is raised."""
        v, R = (torch.cat([getattr(b, n) for b in preps]) if len(preps) > 1 else getattr(preps[0], n)
                for n in ("v", "R"))
        g1 = [b.g1sum if b.g1sum is not None else torch.stack([g.sum() for g in b.g0]) for b in preps]
        vr = v * R
        vals = torch.cat([vr * vr.reciprocal(), *(g.to(R.dtype) for g in g1)])  # non-finite iff a check fails
        bad, flip = torch.stack([~torch.isfinite(vals).all(), (R <= 0).any()]).tolist()
        if not (bad or flip):
            return
        groups = [g for b in preps for g in b.groups]
        sizes = [n for b in preps for n in b.sizes]
        vs, Rs = v.split(sizes), R.split(sizes)
        if bad:
            gsums = [g.sum() for b in preps for g in b.g0]  # per block (the flat path summed them all at once)
            for group, vb, Rb, gb in zip(groups, vs, Rs, gsums):
                if not (torch.isfinite(Rb).all() and (vb != 0).all() and (Rb != 0).all() and torch.isfinite(gb)
                        and torch.isfinite(vb * Rb).all() and (vb * Rb != 0).all()):
                    raise FloatingPointError(
                        f"GSGD block {group['block']!r}: degenerate step (min |v_k| = {float(vb.abs().min()):.3g}, "
                        f"R_k in [{float(Rb.min()):.3g}, {float(Rb.max()):.3g}]); no weight was changed. "
                        "Lower lr or set r_min")
        for group, vb, Rb in zip(groups, vs, Rs):
            name = group["block"]
            if name not in self._warned and bool((Rb <= 0).any()):
                self._warned.add(name)
                k = int(torch.argmin(Rb))
                warnings.warn(f"GSGD block {name!r}: path ratio R_k = {float(Rb[k]):.3g} <= 0 for skeleton "
                              f"path {k} (v_k changes sign; |v_k| = {float(vb[k].abs()):.3g}); "
                              "set r_min to clamp (warned once per block; telemetry counts "
                              "gsgd_sign_flips)", RuntimeWarning, stacklevel=3)


def _builder(model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
             nesterov: bool = False, **options: Any) -> GSGD:
    """``make_optimizer("gsgd", model, ...)``: refuses a model that is not in path space."""
    from ..path.reparam import param_groups

    allowed = {"wnorm", "r_min", "dampening", "check", "maximize", "foreach", "flat"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"optimizer 'gsgd': unknown option(s) {sorted(unknown)}; expected {sorted(allowed)}")
    if not math.isfinite(lr):
        raise ValueError(f"lr must be finite, got {lr!r}")
    return GSGD(param_groups(model), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                **options)


def _register() -> None:
    from . import register_optimizer

    register_optimizer("gsgd", _builder)


_register()
