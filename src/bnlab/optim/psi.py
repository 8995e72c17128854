"""PSI-SGD / PSI-SGDM / PSI-GD: SGD on the positively-scale-invariant (PSI) manifold.

Paper: Mingyang Yi, "Accelerating Training of Batch Normalization: A Manifold Perspective",
UAI 2022, PMLR 180:1128-1137 (spec: ``/work/shared/methods/psi_manifold.md``; our notes:
``docs/methods/psi_manifold.md``).

Every PSI *unit* is one output neuron ``theta_j = (w_j, b_j)`` of a weight layer whose output is
absorbed by a training-mode BN (rows of a Linear weight, output filters of a Conv weight, dim 1 of a
ConvTranspose weight; the pre-BN bias appended when present). On the quotient by per-unit positive
scaling the metric is ``<u, v> / ||theta||^2`` (Prop. 2, eq. 6), the Riemannian gradient is
``||theta||^2 * grad`` (eq. 7) and the retraction is ``theta + xi`` (Prop. 3, eq. 8). The update
(eqs. 10-12, Algorithm 1), per unit, in the paper form (``momentum_form="paper"``)::

    U     <- rho * U - lr * ||theta||^2 * G            (U_0 = 0; lr inside the buffer)
    theta <- theta + U                                 (rho = 0: theta - lr * ||theta||^2 * G)
    if ||theta|| > renorm_threshold:                   (paper Sec. 6.2 overflow guard, 1e4)
        c = renorm_target / ||theta||;  theta *= c;  U *= c;  running_mean *= c;  running_var *= c^2

Parameter groups with ``"psi": False`` are updated by ``torch.optim.SGD``'s own functional kernel
(:func:`torch.optim.sgd.sgd`), so they are bit-identical to ``torch.optim.SGD``.

Extensions (not in the paper, all off by default): ``momentum_form="torch"``,
``retraction="normalize"``, ``transport="project"``, ``project_grad``, ``psi_weight_decay``
(coupled L2 through the PSI rule, spec Sec. 3.7).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

from . import register_optimizer

__all__ = ["PSISGD", "flat_sgd_step", "psi_param_groups"]

_MOMENTUM_FORMS = ("paper", "torch")
_RETRACTIONS = ("additive", "normalize")
_TRANSPORTS = ("none", "project")
_CHECKS = ("raise", "warn", "off")
# AdamP's orthogonality test (Heo et al. 2021, delta = 0.1): a unit is flagged when
# |cos(theta_j, g_j)| > delta / sqrt(d_j).
_GUARD_DELTA = 0.1
# Fast path: the exact post-step norms are computed only when the triangle bound
# ||theta|| + ||U|| exceeds (1 - margin) * renorm_threshold; the margin covers the rounding of the
# computed norms (relative error <~ d * eps, 6e-5 for d = 1000 in float32) with room to spare.
_GUARD_MARGIN = 1e-2


def _other_dims(t: Tensor, out_dim: int) -> list[int]:
    return [d for d in range(t.dim()) if d != out_dim]


def _rowsum(t: Tensor, out_dim: int) -> Tensor:
    """Sum of ``t`` over every dim except ``out_dim`` -> shape (O,). 1-D tensors are returned as is."""
    if t.dim() == 1:
        return t
    return t.sum(dim=_other_dims(t, out_dim))


def _rowsq(t: Tensor, out_dim: int) -> Tensor:
    """Squared row norms ``||t_j||^2`` over every dim except ``out_dim`` -> (O,), in one pass (no
    squared temporary); 1-D tensors: ``t**2``. Both step paths use it, so they agree bit for bit."""
    if t.dim() == 1:
        return t.square()
    return torch.linalg.vector_norm(t, dim=_other_dims(t, out_dim)).square()


def _layout_key(params: list[Tensor]) -> tuple[Any, ...]:
    """Cheap identity of a group's tensors for the flat-layout caches: storage addresses and shapes
    (a replaced ``p.data``, a dtype or device change all allocate new storage)."""
    return (id(params), len(params), [p.data_ptr() for p in params], [p.shape for p in params])


def _bview(s: Tensor, like: Tensor, out_dim: int) -> Tensor:
    """View the per-unit vector ``s`` (O,) so it broadcasts against ``like`` along ``out_dim``."""
    shape = [1] * like.dim()
    shape[out_dim if like.dim() > 1 else 0] = -1
    return s.view(shape)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _FlatLayout:
    """Cached per-group metadata of the fast path (:meth:`PSISGD._psi_step_fast`).

    The group's tensors are laid out in one flat vector: weights bucketed by row length ``L`` (so
    each bucket is an ``(R_b, L)`` row matrix of consecutive units), then all biases. ``rows`` is
    the total number of PSI rows (units' output neurons); unit ``k`` owns rows
    ``row_ranges[k]``; bias element ``i`` belongs to row ``bias_rows[i]``.
    """

    def __init__(self, key: tuple[Any, ...], params: list[Tensor], units: list[tuple[int, int, int]]) -> None:
        self.key = key
        weights = sorted(range(len(units)), key=lambda k: params[units[k][0]][0].numel())  # stable
        self.ts: list[Tensor] = []
        self.buckets: list[tuple[int, int, int, int]] = []  # (elem_start, elem_stop, rows, L)
        self.row_ranges: list[tuple[int, int]] = [(0, 0)] * len(units)
        self.units = units
        elem = row = 0
        for k in weights:
            w = params[units[k][0]]
            n_out, length = w.shape[0], w[0].numel()
            if self.buckets and self.buckets[-1][3] == length:
                a, _, r, _ = self.buckets[-1]
                self.buckets[-1] = (a, elem + w.numel(), r + n_out, length)
            else:
                self.buckets.append((elem, elem + w.numel(), n_out, length))
            self.ts.append(w)
            self.row_ranges[k] = (row, row + n_out)
            elem += w.numel()
            row += n_out
        self.n_w, self.rows = elem, row
        bias_rows: list[int] = []
        self.bias_of: list[int] = []  # unit index of each bias tensor, in layout order
        for k in weights:
            bi = units[k][1]
            if bi != -1:
                self.ts.append(params[bi])
                self.bias_of.append(k)
                bias_rows.extend(range(*self.row_ranges[k]))
        dev = params[units[0][0]].device
        self.order = weights  # unit indices in layout order
        self.n_units = len(weights)
        self.row_sizes = [params[units[k][0]].shape[0] for k in weights]
        self.cshapes = [(-1,) + (1,) * (params[units[k][0]].dim() - 1) for k in weights]
        pos = {k: j for j, k in enumerate(weights)}
        self.bias_pos = [pos[k] for k in self.bias_of]
        self.row_unit = torch.repeat_interleave(torch.arange(len(weights), device=dev),
                                                torch.tensor(self.row_sizes, device=dev))
        self.counts: Tensor | None = None  # renorm firings per unit (layout order)
        self.bn_src: Any = None  # the PSISGD._bn mapping the lists below were resolved from
        self.bn_m: list[tuple[int, Tensor]] = []
        self.bn_v: list[tuple[int, Tensor]] = []
        self.count_views: list[Tensor] = []
        self.bias_rows = torch.tensor(bias_rows, dtype=torch.long, device=dev) if bias_rows else None
        # s_j in a persistent buffer, with a view per tensor (layout order) shaped to broadcast against it
        self.s_buf = torch.empty(row, dtype=params[units[0][0]].dtype, device=dev)
        self.s_views = [self.s_buf[slice(*self.row_ranges[k])].view(cs) for k, cs in zip(weights, self.cshapes)] + \
            [self.s_buf[slice(*self.row_ranges[k])] for k in self.bias_of]
        self.numels = [t.numel() for t in self.ts]
        self.total = sum(self.numels)
        t0 = params[units[0][0]]
        # persistent flat work buffers (fresh multi-MB allocations cost page faults every step)
        self.theta, self.grad, self.scratch = (torch.empty(self.total, dtype=t0.dtype, device=t0.device)
                                               for _ in range(3))
        self.gviews, self.thviews = self.views(self.grad), self.views(self.theta)
        # the parameters themselves become views of ``theta`` (``p.data = view``, values copied): the
        # step then reads and writes them as one flat tensor, with no gather (not for non-contiguous
        # tensors, e.g. channels_last weights: those stay put and are gathered every step)
        self.flat_params = all(t.is_contiguous() for t in self.ts)
        if self.flat_params:
            torch._foreach_copy_(self.thviews, [t.detach() for t in self.ts])
            for t, v in zip(self.ts, self.thviews):
                t.data = v
        self.ubuf: Tensor | None = None
        self.uviews: list[Tensor] = []
        self.ubuf2: Tensor | None = None  # the momentum update is written here, then the two swap
        self.uviews2: list[Tensor] = []
        # lazily reduced angle telemetry: per-row running sum / max, and the number of steps
        self.ang_sum: Tensor | None = None
        self.ang_max: Tensor | None = None
        self.ang_steps = 0

    @classmethod
    def euclidean(cls, key: tuple[Any, ...], params: list[Tensor]) -> _FlatLayout:
        """A layout of a Euclidean group: just the flat order of ``params`` and work buffers."""
        lay = cls.__new__(cls)
        lay.key, lay.ts = key, list(params)
        lay.numels = [t.numel() for t in params]
        lay.total = sum(lay.numels)
        lay.theta, lay.grad = (torch.empty(lay.total, dtype=params[0].dtype, device=params[0].device)
                               for _ in range(2))
        lay.gviews, lay.thviews = lay.views(lay.grad), lay.views(lay.theta)
        lay.ubuf, lay.uviews = None, []
        lay.flat_params = all(t.is_contiguous() for t in params)  # parameters become views of theta
        if lay.flat_params:
            torch._foreach_copy_(lay.thviews, [t.detach() for t in params])
            for t, v in zip(params, lay.thviews):
                t.data = v
        return lay

    def rows_dot(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Per-row ``<x_j, y_j>`` (``||x_j||^2`` when ``y`` is None) of flat vectors -> (rows,).

        Squares go through :func:`_rowsq`'s one-pass norm; products through the scratch buffer."""
        parts = []
        for a, b, r, length in self.buckets:
            xb = x[a:b].view(r, length)
            if y is None:
                parts.append(torch.linalg.vector_norm(xb, dim=1).square())
            else:
                parts.append(torch.mul(xb, y[a:b].view(r, length), out=self.scratch[a:b].view(r, length)).sum(1))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.bias_rows is not None:
            xb = x[self.n_w:]
            out.index_add_(0, self.bias_rows, xb.square() if y is None else xb * y[self.n_w:])
        return out

    def scale_rows_(self, x: Tensor, s: Tensor) -> Tensor:
        """``x_j *= s_j`` for every row ``j`` of the flat vector ``x`` (in place); returns ``x``."""
        row = 0
        for a, b, r, length in self.buckets:
            x[a:b].view(r, length).mul_(s[row:row + r, None])
            row += r
        if self.bias_rows is not None:
            x[self.n_w:].mul_(s[self.bias_rows])
        return x

    def addcmul_rows_(self, out: Tensor, x: Tensor, s: Tensor, value: float) -> Tensor:
        """``out_j += value * x_j * s_j`` for every row ``j`` (in place, one pass; the reference path's
        ``_foreach_addcmul_`` element by element); returns ``out``."""
        row = 0
        for a, b, r, length in self.buckets:
            out[a:b].view(r, length).addcmul_(x[a:b].view(r, length), s[row:row + r, None], value=value)
            row += r
        if self.bias_rows is not None:
            out[self.n_w:].addcmul_(x[self.n_w:], s[self.bias_rows], value=value)
        return out

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of the flat vector shaped like the layout's tensors."""
        return [v.view(t.shape) for v, t in zip(flat.split(self.numels), self.ts)]


class _FusedLayout:
    """Cached per-group data of the compiled path (:meth:`PSISGD._psi_step_fused`): the units'
    weights and biases in unit order, their row ranges (the angle accumulators are per row, in unit
    order, with the attributes :meth:`PSISGD._flush_angles` reads), the scalar tensor and counters."""

    def __init__(self, key: tuple[Any, ...], params: list[Tensor], units: list[tuple[int, int, int]]) -> None:
        self.key, self.units = key, units
        self.ws = [params[wi] for wi, _, _ in units]
        self.bs: list[Tensor | None] = [None if bi == -1 else params[bi] for _, bi, _ in units]
        self.row_sizes = [w.shape[0] for w in self.ws]
        self.row_ranges: list[tuple[int, int]] = []
        row = 0
        for n in self.row_sizes:
            self.row_ranges.append((row, row + n))
            row += n
        self.rows = row
        w0 = self.ws[0]
        self.scal = torch.zeros(4, dtype=w0.dtype, device=w0.device)  # lr, rho, lam, threshold
        self.scal_vals: tuple[float, ...] = ()
        self.ang_sum: Tensor | None = None
        self.ang_max: Tensor | None = None
        self.ang_steps = 0
        self.compiled = False  # the first call compiled successfully


def flat_sgd_step(state: Any, cache: dict[int, _FlatLayout], gi: int, group: dict[str, Any],
                  foreach: bool | None) -> bool:
    """``torch.optim.SGD(foreach=True)``'s update for one Euclidean group on one flat gradient
    buffer (``_multi_tensor_sgd``'s ops, same order, elementwise identical): a handful of
    whole-group ops instead of three foreach. Momentum buffers are views of one flat buffer, and so
    are the (contiguous) parameters themselves, ``p.data`` set once when the layout is built, as
    for the PSI groups: the update is one flat ``add_``. Returns False (nothing done) where torch's
    kernel is used instead: ``foreach`` not True, missing/sparse grads, mixed dtypes or devices,
    tensor lr, buffers partly initialised. ``state``: the optimiser's state (momentum buffers),
    ``cache``: its layouts by group index ``gi``; shared by :class:`PSISGD` and
    :class:`bnlab.optim.gsgd.GSGD`."""
    params: list[Tensor] = group["params"]
    if foreach is not True or not params or not isinstance(group["lr"], (int, float)):
        return False
    gs = [p.grad for p in params]
    if any(g is None or g.is_sparse for g in gs):
        return False
    key = _layout_key(params)
    lay = cache.get(gi)
    if lay is None or lay.key != key:
        dt, dev = params[0].dtype, params[0].device
        if dt not in (torch.float32, torch.float64) or any(p.dtype != dt or p.device != dev for p in params):
            return False
        lay = _FlatLayout.euclidean(key, params)
        lay.key = _layout_key(params)  # the parameters moved into the flat buffer
        cache[gi] = lay
    torch._foreach_copy_(lay.gviews, gs)  # gather into the flat buffer, one dispatch
    grad = lay.grad
    if group["maximize"]:
        grad.neg_()
    wd, rho = group["weight_decay"], group["momentum"]
    if wd != 0:
        if not lay.flat_params:
            torch._foreach_copy_(lay.thviews, params)
        grad.add_(lay.theta, alpha=wd)
    step_views, step_flat = lay.gviews, grad
    if rho != 0:
        st = state
        if lay.ubuf is None or st.get(params[0]) is not lay.sdicts[0] or \
                not all(d.get("momentum_buffer") is v for d, v in zip(lay.sdicts, lay.uviews)):
            have = [st[p].get("momentum_buffer") for p in params]
            if any(h is None for h in have) and not all(h is None for h in have):
                return False
            lay.ubuf = torch.empty_like(grad)
            lay.uviews = lay.views(lay.ubuf)
            if have[0] is None:
                lay.ubuf.copy_(grad)  # torch: buf = clone(grad) on the first step
            else:
                for v, h in zip(lay.uviews, have):
                    v.copy_(h)
                lay.ubuf.mul_(rho).add_(grad, alpha=1 - group["dampening"])
            for p, v in zip(params, lay.uviews):
                st[p]["momentum_buffer"] = v
            lay.sdicts = [st[p] for p in params]  # per-parameter state dicts: no tensor hashing per step
        else:
            lay.ubuf.mul_(rho).add_(grad, alpha=1 - group["dampening"])
        if group["nesterov"]:
            grad.add_(lay.ubuf, alpha=rho)
        else:
            step_views, step_flat = lay.uviews, lay.ubuf
    if lay.flat_params:
        lay.theta.add_(step_flat, alpha=-group["lr"])  # the parameters, as one flat tensor
    else:
        torch._foreach_add_(params, step_views, alpha=-group["lr"])
    return True

class PSISGD(Optimizer):
    """PSI-GD / PSI-SGD / PSI-SGDM (Yi, UAI 2022, eqs. 9-12, Algorithm 1) with SGD groups.

    Args:
        params: parameter groups, normally from :func:`psi_param_groups`. A PSI group has
            ``"psi": True`` and ``"psi_units"``: a list of ``(w_idx, b_idx, out_dim)`` (indices into
            the group's ``params``; ``b_idx = -1`` for no bias; ``out_dim`` 0, or 1 for transposed
            convs). Optional ``"psi_names"`` (weight names, for telemetry) and ``"psi_norms"`` (the
            absorbing BN module name per unit, for :meth:`bind_bn_stats`). Groups without ``psi``
            are Euclidean and follow ``torch.optim.SGD`` exactly.
        lr, momentum: step size and momentum ``rho`` (paper: PSI-SGD 1.0/0; PSI-SGDM 0.1/0.9).
        dampening, weight_decay, nesterov: ``torch.optim.SGD`` options of the Euclidean groups.
        psi_weight_decay: coupled L2 on PSI units, passed through the PSI rule (default 0, paper).
        momentum_form: ``"paper"`` (lr inside the buffer) or ``"torch"`` (``b <- rho b + s G``,
            ``theta <- theta - lr b``); identical at constant lr.
        retraction: ``"additive"`` (paper, with the guard) or ``"normalize"`` (keeps every
            ``||theta_j||`` fixed, rescaling buffers and BN statistics; same quotient trajectory).
        renorm_threshold, renorm_target: the paper's overflow guard (``None`` disables it).
        transport: ``"none"`` (paper) or ``"project"`` (buffer projected onto the tangent space of
            the new point after each step).
        project_grad: remove the radial gradient component (caused by BN eps) before the step.
        maximize: ascend instead of descend (both kinds of groups).
        check_invariance: ``"raise"`` / ``"warn"`` / ``"off"``: on the first ``guard_steps`` steps,
            test every PSI unit with AdamP's orthogonality test ``|cos(theta_j, g_j)| <
            0.1/sqrt(d_j)`` and refuse (or warn about) parameters that are not scale-invariant.
        check_finite: raise ``ValueError`` on non-finite gradients or zero-norm units in PSI groups
            (one host sync per step).
        bn_stats: a model (the BN modules named in ``psi_norms`` are looked up in it) or a mapping
            ``{(group_index, w_idx): (running_mean, running_var)}``; rescaled with their unit.
        track_angles: accumulate the angular step per layer for :meth:`telemetry`.
        foreach: passed to ``torch.optim.sgd.sgd`` for the Euclidean groups.
        fused: ``True``: PSI groups step through one compiled graph per step
            (:mod:`bnlab.optim._fused`, ``torch.compile``, no gathers). Slower than the eager path on
            CPU (measured 2.1-2.3x SGD vs 1.4x, first step compiles 1-2 min for ResNet-56;
            ``docs/results/speed_optim.md``); meant for GPUs (unmeasured). ``False`` (default): the
            eager paths. Configurations the fast path does not cover, and the invariance-check
            steps, run eagerly either way.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        psi_weight_decay: float = 0.0,
        momentum_form: str = "paper",
        retraction: str = "additive",
        renorm_threshold: float | None = 1e4,
        renorm_target: float = 1.0,
        transport: str = "none",
        project_grad: bool = False,
        maximize: bool = False,
        check_invariance: str = "raise",
        guard_steps: int = 3,
        check_finite: bool = True,
        bn_stats: nn.Module | Mapping[tuple[int, int], tuple[Tensor, Tensor]] | None = None,
        track_angles: bool = True,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            psi_weight_decay=psi_weight_decay, momentum_form=momentum_form, retraction=retraction,
            renorm_threshold=renorm_threshold, renorm_target=renorm_target, transport=transport,
            project_grad=project_grad, maximize=maximize, foreach=foreach, psi=False,
        )
        if check_invariance not in _CHECKS:
            raise ValueError(f"check_invariance must be one of {_CHECKS}, got {check_invariance!r}")
        if isinstance(guard_steps, bool) or not isinstance(guard_steps, int) or guard_steps < 0:
            raise ValueError(f"guard_steps must be an int >= 0, got {guard_steps!r}")
        self.check_invariance = check_invariance
        self.guard_steps = guard_steps
        self.check_finite = bool(check_finite)
        self.track_angles = bool(track_angles)
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got {fused!r}")
        self.fused = fused
        self._fused: dict[int, _FusedLayout | None] = {}
        self._steps_done = 0
        self._bn: dict[tuple[int, int], tuple[Tensor | None, Tensor | None]] = {}
        self._layouts: dict[int, _FlatLayout | None] = {}
        self._elayouts: dict[int, _FlatLayout] = {}
        super().__init__(params, defaults)  # each group is validated in add_param_group
        if check_invariance == "off" and any(g["psi"] for g in self.param_groups):
            warnings.warn("PSISGD: check_invariance='off': parameters in PSI groups are not checked for "
                          "scale invariance; a non-invariant parameter gets a wrong (norm-scaled) update",
                          stacklevel=2)
        if bn_stats is not None:
            self.bind_bn_stats(bn_stats)

    # -- validation ---------------------------------------------------------------------------
    @staticmethod
    def _check_number(gi: int, key: str, value: Any, low: float = 0.0, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low \
                or not math.isfinite(value):
            raise ValueError(f"param group {gi}: {key} must be a finite number >= {low}, got {value!r}")

    def _validate_group(self, gi: int, group: dict[str, Any]) -> None:
        for key in ("lr", "momentum", "dampening", "weight_decay", "psi_weight_decay"):
            self._check_number(gi, key, group[key])
        if not group["psi"]:
            if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
                raise ValueError(f"param group {gi}: nesterov=True requires momentum > 0 and dampening=0, "
                                 f"got momentum={group['momentum']!r}, dampening={group['dampening']!r}")
            return
        for key, choices in (("momentum_form", _MOMENTUM_FORMS), ("retraction", _RETRACTIONS),
                             ("transport", _TRANSPORTS)):
            if group[key] not in choices:
                raise ValueError(f"param group {gi}: {key} must be one of {choices}, got {group[key]!r}")
        if group["nesterov"] or group["dampening"] != 0:
            raise ValueError(f"param group {gi} (PSI): nesterov/dampening are not part of PSI-SGDM "
                             f"(Algorithm 1), got nesterov={group['nesterov']!r}, "
                             f"dampening={group['dampening']!r}; set them on Euclidean groups only")
        self._check_number(gi, "renorm_threshold", group["renorm_threshold"], 0.0, allow_none=True)
        self._check_number(gi, "renorm_target", group["renorm_target"], 0.0)
        if group["renorm_threshold"] is not None and not group["renorm_target"] > 0:
            raise ValueError(f"param group {gi}: renorm_target must be > 0, got {group['renorm_target']!r}")
        params = group["params"]
        units = group.get("psi_units")
        if not isinstance(units, (list, tuple)) or not units:
            raise ValueError(f"param group {gi}: a PSI group needs 'psi_units', a non-empty list of "
                             f"(w_idx, b_idx, out_dim), got {units!r}")
        seen: set[int] = set()
        for u in units:
            if not (isinstance(u, (list, tuple)) and len(u) == 3 and all(isinstance(v, int) for v in u)):
                raise ValueError(f"param group {gi}: psi unit must be (w_idx, b_idx, out_dim) ints, "
                                 f"got {u!r}")
            wi, bi, od = u
            if not 0 <= wi < len(params) or wi in seen:
                raise ValueError(f"param group {gi}: psi unit {u!r}: w_idx out of range or used twice "
                                 f"({len(params)} params)")
            w = params[wi]
            if w.dim() < 1 or od not in (0, 1) or od >= max(w.dim(), 1) or (w.dim() == 1 and od != 0):
                raise ValueError(f"param group {gi}: psi unit {u!r}: out_dim must be 0 or 1 and < weight "
                                 f"rank, weight shape {list(w.shape)}")
            seen.add(wi)
            if bi != -1:
                if not 0 <= bi < len(params) or bi in seen:
                    raise ValueError(f"param group {gi}: psi unit {u!r}: b_idx out of range or used twice")
                b = params[bi]
                if b.dim() != 1 or b.numel() != w.shape[od]:
                    raise ValueError(f"param group {gi}: psi unit {u!r}: bias shape {list(b.shape)} does not "
                                     f"match {w.shape[od]} output units of weight {list(w.shape)}")
                seen.add(bi)
        if len(seen) != len(params):
            missing = sorted(set(range(len(params))) - seen)
            raise ValueError(f"param group {gi}: params {missing} of a PSI group belong to no psi unit; "
                             f"put them in a Euclidean group")
        names = group.get("psi_names")
        if names is not None and len(names) != len(units):
            raise ValueError(f"param group {gi}: psi_names has {len(names)} entries for {len(units)} units")
        norms = group.get("psi_norms")
        if norms is not None and len(norms) != len(units):
            raise ValueError(f"param group {gi}: psi_norms has {len(norms)} entries for {len(units)} units")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(len(self.param_groups) - 1, self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # leave the optimiser as it was
            raise

    # -- BN statistics binding ----------------------------------------------------------------
    def bind_bn_stats(self, source: nn.Module | Mapping[tuple[int, int], tuple[Tensor, Tensor]]) -> None:
        """Bind the BN running statistics rescaled with their unit (re-bind after loading a state).

        ``source``: the model (BN modules named in each group's ``psi_norms``), or a mapping
        ``{(group_index, w_idx): (running_mean, running_var)}`` of (O,) tensors.
        """
        bound: dict[tuple[int, int], tuple[Tensor | None, Tensor | None]] = {}
        if isinstance(source, nn.Module):
            for gi, group in enumerate(self.param_groups):
                if not group["psi"] or not group.get("psi_norms"):
                    continue
                for (wi, _, _), name in zip(group["psi_units"], group["psi_norms"]):
                    if name is None:
                        continue
                    try:
                        m = source.get_submodule(name)
                    except AttributeError as e:
                        raise ValueError(f"bind_bn_stats: model has no module {name!r} (psi_norms of "
                                         f"group {gi})") from e
                    bound[(gi, wi)] = (getattr(m, "running_mean", None), getattr(m, "running_var", None))
        elif isinstance(source, Mapping):
            bound = {tuple(k): tuple(v) for k, v in source.items()}  # type: ignore[misc]
        else:
            raise TypeError(f"bn_stats must be an nn.Module or a mapping, got {type(source).__name__}")
        for (gi, wi), (rm, rv) in bound.items():
            if not (0 <= gi < len(self.param_groups) and self.param_groups[gi]["psi"]):
                raise ValueError(f"bn_stats key {(gi, wi)!r}: group {gi} is not a PSI group")
            unit = next((u for u in self.param_groups[gi]["psi_units"] if u[0] == wi), None)
            if unit is None:
                raise ValueError(f"bn_stats key {(gi, wi)!r}: no psi unit with w_idx {wi} in group {gi}")
            n_out = self.param_groups[gi]["params"][wi].shape[unit[2]]
            for t in (rm, rv):
                if t is not None and t.shape != (n_out,):
                    raise ValueError(f"bn_stats key {(gi, wi)!r}: running stat of shape {list(t.shape)}, "
                                     f"expected ({n_out},)")
        self._bn = bound

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        guard = self.check_invariance != "off" and self._steps_done < self.guard_steps
        for gi, group in enumerate(self.param_groups):
            if group["psi"]:
                if not (self._use_fast and (self.fused and self._psi_step_fused(gi, group, guard)
                                            or self._psi_step_fast(gi, group, guard))):
                    self._psi_step(gi, group, guard)
            elif not (self._use_fast and self._sgd_step_flat(gi, group)):
                self._sgd_step(group)
        self._steps_done += 1
        return loss

    def _sgd_step(self, group: dict[str, Any]) -> None:
        """``torch.optim.SGD.step`` for one group, through torch's own functional kernel."""
        params, grads, bufs = [], [], []
        sparse = False
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            sparse = sparse or p.grad.is_sparse
            if group["momentum"] != 0:
                bufs.append(self.state[p].get("momentum_buffer"))
        if not params:
            return
        _torch_sgd(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                   lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                   maximize=group["maximize"], has_sparse_grad=sparse, foreach=group["foreach"])
        if group["momentum"] != 0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b

    def _sgd_step_flat(self, gi: int, group: dict[str, Any]) -> bool:
        """:func:`flat_sgd_step` for Euclidean group ``gi`` (layouts cached in ``self._elayouts``)."""
        return flat_sgd_step(self.state, self._elayouts, gi, group, group["foreach"])

    # -- fast path ------------------------------------------------------------------------------
    _use_fast = True  # tests switch it off to compare against the reference path
    _compile_fused = True  # tests switch it off to run the fused step function eagerly (no compile)

    def _layout(self, gi: int, group: dict[str, Any]) -> _FlatLayout | None:
        """The cached flat layout of PSI group ``gi``; None when the fast path does not apply
        (mixed or low-precision dtypes, several devices, a transposed-conv unit)."""
        params: list[Tensor] = group["params"]
        key = _layout_key(params) + (id(group["psi_units"]),)
        lay = self._layouts.get(gi, False)
        if lay is not False and (lay is None or lay.key == key):
            return lay
        if lay:
            self._flush_angles(gi, lay)
        units = [tuple(u) for u in group["psi_units"]]
        dt, dev = params[0].dtype, params[0].device
        ok = dt in (torch.float32, torch.float64) and all(p.dtype == dt and p.device == dev for p in params) \
            and all(od == 0 or params[wi].dim() == 1 for wi, _, od in units)
        lay = _FlatLayout(key, params, units) if ok else None  # type: ignore[arg-type]
        if lay is not None:
            lay.key = _layout_key(params) + (id(group["psi_units"]),)  # the parameters moved into it
        self._layouts[gi] = lay
        return lay

    def _momentum_views(self, lay: _FlatLayout) -> list[Tensor]:
        """The momentum buffers as views of one flat buffer (``lay.ubuf``), kept in ``self.state``.

        Rebuilt (values copied) when a buffer is missing or was replaced, e.g. by ``load_state_dict``."""
        st = self.state
        if lay.ubuf is not None and all(st[t].get("momentum_buffer") is v for t, v in zip(lay.ts, lay.uviews)):
            return lay.uviews
        t0 = lay.ts[0]
        lay.ubuf = torch.zeros(lay.total, dtype=t0.dtype, device=t0.device)
        lay.uviews = lay.views(lay.ubuf)
        for t, v in zip(lay.ts, lay.uviews):
            old = st[t].get("momentum_buffer")
            if old is not None:
                v.copy_(old)
            st[t]["momentum_buffer"] = v
        return lay.uviews

    @staticmethod
    def _fast_eligible(group: dict[str, Any]) -> bool:
        """The configurations the fast and compiled paths implement: additive retraction, no radial
        projection, and (with momentum) the paper's momentum form without transport."""
        return not group["project_grad"] and group["retraction"] == "additive" and (
            group["momentum"] == 0 or (group["momentum_form"] == "paper" and group["transport"] == "none"))

    def _psi_step_fast(self, gi: int, group: dict[str, Any], guard: bool) -> bool:
        """Algorithm 1 on the group's flat layout: a few whole-group ops instead of per-tensor ones.

        Same arithmetic, element by element, as :meth:`_psi_step` (paper momentum form, additive
        retraction with the overflow guard, no transport). Returns False (nothing done) when the
        configuration needs the reference path: the invariance check steps, ``project_grad``,
        ``momentum_form="torch"``, ``retraction="normalize"``, ``transport="project"``, missing or
        sparse gradients, or a layout :meth:`_layout` refuses. Host syncs: one (the finite check and
        the guard's triangle bound together), plus one when the bound comes near the threshold.
        Memory passes: see ``docs/methods/psi_manifold.md`` (no weight gather: the parameters are
        views of ``lay.theta``; no gradient gather with momentum and no decay)."""
        rho = group["momentum"]
        if guard or not self._fast_eligible(group):
            return False
        lay = self._layout(gi, group)
        if lay is None:
            return False
        gs = [t.grad for t in lay.ts]
        if any(g is None or g.is_sparse for g in gs):
            return False
        lr = group["lr"]
        lam = group["psi_weight_decay"]
        # with momentum and no decay G enters only the buffer update: no gather, it is read in place
        direct = rho != 0 and lam == 0
        if not lay.flat_params:
            torch._foreach_copy_(lay.thviews, lay.ts)  # gather into the flat buffer
        theta, grad = lay.theta, lay.grad
        if not direct:
            torch._foreach_copy_(lay.gviews, gs)  # one dispatch
            if group["maximize"]:
                grad.neg_()
        s = lay.rows_dot(theta)  # s_j = ||w_j||^2 + b_j^2
        if lam != 0:
            grad.add_(theta, alpha=lam)  # coupled L2 (spec Sec. 3.7)
        if rho != 0:
            self._momentum_views(lay)
            if lay.ubuf2 is None:
                lay.ubuf2 = torch.empty_like(lay.ubuf)  # type: ignore[arg-type]
                lay.uviews2 = lay.views(lay.ubuf2)
            # U <- rho U - lr s G (eq. 11; the Riemannian gradient s G of eq. 7 inside addcmul, not
            # materialised), written to the second buffer: nothing persistent changes before the
            # finite check below
            torch.mul(lay.ubuf, rho, out=lay.ubuf2)  # type: ignore[arg-type]
            if direct:  # per tensor, G as autograd left it (maximize: -lr * -G == lr * G exactly)
                lay.s_buf.copy_(s)
                torch._foreach_addcmul_(lay.uviews2, gs, lay.s_views, value=lr if group["maximize"] else -lr)
                delta = lay.ubuf2
            else:
                delta = lay.addcmul_rows_(lay.ubuf2, grad, s, -lr)
            dviews = lay.uviews2
        else:
            delta = lay.scale_rows_(grad, s).mul_(-lr)  # -lr ||theta||^2 G (eq. 7, 10), in place
            dviews = lay.gviews  # rgrad and delta live in lay.grad
        thr = group["renorm_threshold"]
        check = self.check_finite
        # ||U_j||^2: the guard's triangle bound, the angles, and the finite check (a non-finite G_j
        # makes U_j non-finite: s_j > 0 is tested too), all from one read of U
        dd = lay.rows_dot(delta) if check or self.track_angles or thr is not None else None
        flags = []
        if check:
            flags.append(~(torch.isfinite(dd.sum() + s.sum()) & (s.amin() > 0)))  # type: ignore[union-attr]
        if thr is not None:  # ||theta_j + U_j|| <= ||theta_j|| + ||U_j||
            flags.append(((s.sqrt() + dd.sqrt()) > thr * (1 - _GUARD_MARGIN)).any())  # type: ignore[union-attr]
        fl = torch.stack(flags).tolist() if flags else []  # one host sync
        if check and fl[0]:
            return False  # nothing written; the reference path raises the precise error
        near = bool(fl[-1]) if thr is not None else False
        if rho != 0:
            lay.ubuf, lay.ubuf2, lay.uviews, lay.uviews2 = lay.ubuf2, lay.ubuf, lay.uviews2, lay.uviews
            st = self.state
            for t, v in zip(lay.ts, lay.uviews):
                st[t]["momentum_buffer"] = v
        # retraction R_theta(xi) = theta + xi (Prop. 3)
        if lay.flat_params:
            theta.add_(delta)
        else:
            torch._foreach_add_(lay.ts, dviews)
            theta.add_(delta)  # the flat copy now equals the updated parameters
        # exact new norms (as the reference path computes them), for the angles, and for the guard only
        # when the triangle bound came within _GUARD_MARGIN of the threshold: same decisions, bit for bit
        n2 = lay.rows_dot(theta) if self.track_angles or near else None
        if self.track_angles:
            self._accumulate_angles_fast(lay, s, dd, n2)  # type: ignore[arg-type]
        if near:
            nrm = n2.sqrt()  # type: ignore[union-attr]
            fire = nrm > thr
            if bool(fire.any()):
                c = torch.where(fire, float(group["renorm_target"]) / nrm, torch.ones_like(nrm))
                self._apply_renorm(gi, group, lay, c, rho != 0)
        return True

    def _fused_layout(self, gi: int, group: dict[str, Any]) -> _FusedLayout | None:
        """The cached :class:`_FusedLayout` of PSI group ``gi``; None where the compiled path does not
        apply (mixed or low-precision dtypes, several devices, non-contiguous or transposed-conv units)."""
        params: list[Tensor] = group["params"]
        key = _layout_key(params) + (id(group["psi_units"]),)
        lay = self._fused.get(gi, False)
        if lay is not False and (lay is None or lay.key == key):
            return lay
        if lay:
            self._flush_angles(gi, lay)  # type: ignore[arg-type]
        units = [tuple(u) for u in group["psi_units"]]
        dt, dev = params[0].dtype, params[0].device
        ok = dt in (torch.float32, torch.float64) and all(
            p.dtype == dt and p.device == dev and p.is_contiguous() for p in params) \
            and all(od == 0 or params[wi].dim() == 1 for wi, _, od in units)
        lay = _FusedLayout(key, params, units) if ok else None  # type: ignore[arg-type]
        self._fused[gi] = lay
        return lay

    def _psi_step_fused(self, gi: int, group: dict[str, Any], guard: bool) -> bool:
        """Algorithm 1 through the compiled kernel :func:`bnlab.optim._fused.psi_update` (``fused=True``).

        Covers the fast path's configurations (:meth:`_psi_step_fast`), in place on the parameters
        (no flat gather). Returns False (nothing written) where the eager paths must run: other
        configurations, missing/sparse/non-contiguous gradients, a failed finite check (the
        reference path then raises the precise error), or a compile failure (warned once; the group
        then stays eager). The guard's rescaling, when a row exceeds the threshold, is eager. One host
        sync per step (finite check and guard decision together)."""
        rho = group["momentum"]
        if guard or not self._fast_eligible(group):
            return False
        lay = self._fused_layout(gi, group)
        if lay is None:
            return False
        gs = [w.grad for w in lay.ws]
        gbs = [None if b is None else b.grad for b in lay.bs]
        if any(g is None or g.is_sparse or not g.is_contiguous() for g in gs) or any(
                b is not None and (g is None or g.is_sparse) for b, g in zip(lay.bs, gbs)):
            return False
        st = self.state
        momentum = rho != 0
        if momentum:
            for t in (*lay.ws, *(b for b in lay.bs if b is not None)):
                if "momentum_buffer" not in st[t]:
                    st[t]["momentum_buffer"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            us = [st[w]["momentum_buffer"] for w in lay.ws]
            ubs = [None if b is None else st[b]["momentum_buffer"] for b in lay.bs]
            if not all(u.is_contiguous() for u in us):
                return False
        else:
            us, ubs = list(gs), [None] * len(gs)  # unused by the kernel
        thr = group["renorm_threshold"]
        vals = (float(group["lr"]), float(rho), float(group["psi_weight_decay"]),
                math.inf if thr is None else float(thr))
        if vals != lay.scal_vals:
            lay.scal.copy_(torch.tensor(vals, dtype=lay.scal.dtype))
            lay.scal_vals = vals
        if self.track_angles and lay.ang_sum is None:
            lay.ang_sum = lay.scal.new_zeros(lay.rows)
            lay.ang_max = lay.scal.new_zeros(lay.rows)
        dummy = lay.scal[:0]
        from ._fused import compiled_psi_update, psi_update

        fn = compiled_psi_update() if self._compile_fused else psi_update
        args = (lay.ws, gs, us, lay.bs, gbs, ubs, lay.ang_sum if self.track_angles else dummy,
                lay.ang_max if self.track_angles else dummy, lay.scal)
        opts = dict(momentum=momentum, maximize=bool(group["maximize"]), decay=vals[2] != 0,
                    angles=self.track_angles, check=self.check_finite, guard=thr is not None)
        if lay.compiled is False:
            try:
                out = fn(*args, **opts)
                lay.compiled = True
            except Exception as e:  # noqa: BLE001 - any compiler failure: stay correct, eagerly
                warnings.warn(f"PSISGD(fused=True): torch.compile failed ({type(e).__name__}: {e}); "
                              f"param group {gi} uses the eager path", RuntimeWarning, stacklevel=3)
                self._fused[gi] = None
                return False
        else:
            out = fn(*args, **opts)
        ok, fire = out[:2].tolist()
        if not ok:
            return False
        if self.track_angles:
            lay.ang_steps += 1
        if fire:
            nrm = out[2:]
            c = torch.where(nrm > thr, float(group["renorm_target"]) / nrm, torch.ones_like(nrm))
            self._apply_renorm_units(gi, lay, c, momentum)
        return True

    def _apply_renorm_units(self, gi: int, lay: _FusedLayout, c: Tensor, bufs: bool) -> None:
        """:meth:`_apply_renorm` for the compiled path's unit-ordered rows: scale the units that fired
        (weights, biases, buffers, BN statistics) by c (rows,); count the rescaled rows."""
        st = self.state
        cw = c.split(lay.row_sizes)
        fired = torch.stack([(v != 1).sum() for v in cw]).tolist()
        if not all("renorm_count" in st[w] for w in lay.ws):
            for w in lay.ws:
                st[w].setdefault("renorm_count", torch.zeros((), dtype=torch.long, device=c.device))
        ts, cs = [], []
        for k, (w, b, n) in enumerate(zip(lay.ws, lay.bs, fired)):
            if not n:
                continue
            st[w]["renorm_count"] = st[w]["renorm_count"] + n
            ck = cw[k]
            for t in (w, b):
                if t is None:
                    continue
                cv = _bview(ck, t, 0)
                ts.append(t)
                cs.append(cv)
                if bufs:
                    ts.append(st[t]["momentum_buffer"])
                    cs.append(cv)
            rm, rv = self._bn.get((gi, lay.units[k][0]), (None, None))
            if rm is not None:
                rm.mul_(ck.to(rm.dtype))
            if rv is not None:
                rv.mul_(ck.to(rv.dtype).square())
        torch._foreach_mul_(ts, cs)

    def _apply_renorm(self, gi: int, group: dict[str, Any], lay: _FlatLayout, c: Tensor, bufs: bool) -> None:
        """The overflow guard fired: scale weights, buffers and BN statistics of each unit by c (rows,),
        and count the rescaled rows in ``renorm_count`` (0-d views of one per-layout counter)."""
        cw = c.split(lay.row_sizes)  # per unit, layout order
        params = group["params"]
        st = self.state
        ws = [params[lay.units[k][0]] for k in lay.order]
        if lay.counts is None or not all(st[w].get("renorm_count") is v for w, v in zip(ws, lay.count_views)):
            lay.counts = torch.zeros(len(ws), dtype=torch.long, device=c.device)
            lay.count_views = list(lay.counts.unbind())
            for w, v in zip(ws, lay.count_views):
                if "renorm_count" in st[w]:
                    v.copy_(st[w]["renorm_count"])
                st[w]["renorm_count"] = v
        per_unit = torch.zeros_like(lay.counts).index_add_(0, lay.row_unit, (c != 1).long())
        lay.counts.add_(per_unit)
        # only the units that fired are rescaled (elsewhere c == 1, and x * 1 == x exactly)
        sel = per_unit.nonzero().flatten().tolist()
        selected = set(sel)
        idx = sel + [lay.n_units + i for i, j in enumerate(lay.bias_pos) if j in selected]
        cviews = [cw[j].view(lay.cshapes[j]) for j in sel] + [cw[j] for j in lay.bias_pos if j in selected]
        torch._foreach_mul_([lay.ts[i] for i in idx], cviews)
        if bufs:
            torch._foreach_mul_([lay.uviews[i] for i in idx], cviews)
        if lay.bn_src is not self._bn:  # resolve the bound BN statistics once per binding
            lay.bn_src = self._bn
            pairs = [self._bn.get((gi, lay.units[k][0]), (None, None)) for k in lay.order]
            lay.bn_m = [(j, rm) for j, (rm, _) in enumerate(pairs) if rm is not None]
            lay.bn_v = [(j, rv) for j, (_, rv) in enumerate(pairs) if rv is not None]
        if lay.bn_m:
            bn_m = [(j, rm) for j, rm in lay.bn_m if j in selected]
            if bn_m:
                torch._foreach_mul_([rm for _, rm in bn_m], [cw[j].to(rm.dtype) for j, rm in bn_m])
        if lay.bn_v:
            bn_v = [(j, rv) for j, rv in lay.bn_v if j in selected]
            if bn_v and all(rv.dtype == c.dtype for _, rv in bn_v):
                c2 = c.square().split(lay.row_sizes)
                torch._foreach_mul_([rv for _, rv in bn_v], [c2[j] for j, _ in bn_v])
            elif bn_v:
                torch._foreach_mul_([rv for _, rv in bn_v], [cw[j].to(rv.dtype).square() for j, rv in bn_v])

    def _accumulate_angles_fast(self, lay: _FlatLayout, s: Tensor, dd: Tensor, n2: Tensor) -> None:
        """Per-row angle of this step (as :meth:`_accumulate_angles`), kept as per-row running
        sum/max tensors; reduced per layer only by :meth:`_flush_angles` (telemetry, state_dict).

        ``<theta, U> = (||theta + U||^2 - ||theta||^2 - ||U||^2) / 2`` from the row norms the step has
        anyway (``s``, ``dd``, ``n2``: old, step, new), instead of a product pass; its absolute error
        ~ eps * s_j leaves the angle's relative error ~ eps * ||theta_j|| / ||U_j|| (float32, steps of
        1e-4 rad: ~1e-3; telemetry only)."""
        dot = (n2 - s - dd) * 0.5
        r = s.sqrt()
        ang = torch.atan2((dd - dot.square() / s).clamp_min(0).sqrt(), r + dot / r)
        if lay.ang_sum is None:
            lay.ang_sum, lay.ang_max = ang, ang.clone()
        else:
            lay.ang_sum.add_(ang)
            torch.maximum(lay.ang_max, ang, out=lay.ang_max)
        lay.ang_steps += 1

    def _flush_angles(self, gi: int, lay: _FlatLayout) -> None:
        """Move a layout's per-row angle accumulators into the per-weight state (angle_sum/max/count)."""
        if lay.ang_sum is None or lay.ang_max is None:
            return
        params = self.param_groups[gi]["params"]
        for k, (wi, _, _) in enumerate(lay.units):
            r0, r1 = lay.row_ranges[k]
            st = self.state[params[wi]]
            a_sum, a_max = lay.ang_sum[r0:r1].sum(), lay.ang_max[r0:r1].max()
            if "angle_sum" not in st:
                st["angle_sum"] = torch.zeros((), dtype=a_sum.dtype, device=a_sum.device)
                st["angle_max"] = torch.zeros((), dtype=a_sum.dtype, device=a_sum.device)
                st["angle_count"] = torch.zeros((), dtype=a_sum.dtype, device=a_sum.device)
            st["angle_sum"] += a_sum
            st["angle_max"] = torch.maximum(st["angle_max"], a_max)
            st["angle_count"] += lay.ang_steps * (r1 - r0)
        lay.ang_sum = lay.ang_max = None
        lay.ang_steps = 0

    def _flush_all_angles(self) -> None:
        for gi, lay in [*self._layouts.items(), *self._fused.items()]:
            if lay is not None and gi < len(self.param_groups):
                self._flush_angles(gi, lay)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """``Optimizer.state_dict`` after reducing the fast path's pending angle telemetry."""
        self._flush_all_angles()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``; drops cached layouts (buffers are re-viewed on the next step)."""
        self._layouts, self._elayouts, self._fused = {}, {}, {}
        super().load_state_dict(state_dict)

    _SETTINGS = ("check_invariance", "guard_steps", "check_finite", "track_angles", "fused", "_steps_done", "_bn")

    def __getstate__(self) -> dict[str, Any]:
        """``copy.deepcopy`` / pickle: ``Optimizer``'s state plus this optimiser's settings (the cached
        layouts are rebuilt on the next step; pending angle telemetry is reduced first)."""
        self._flush_all_angles()
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._SETTINGS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._layouts, self._elayouts, self._fused = {}, {}, {}

    def _psi_step(self, gi: int, group: dict[str, Any], guard: bool) -> None:
        """Algorithm 1 for every unit of the group; vectorised over units, foreach over tensors.

        The general (reference) path: every option, any dtype/layout. :meth:`_psi_step_fast` handles
        the common configurations with identical results and falls back here otherwise."""
        params: list[Tensor] = group["params"]
        lr, rho = group["lr"], group["momentum"]
        # flat lists over the tensors of the group (weights and biases); each tensor knows its unit slot
        units = [tuple(u) for u in group["psi_units"] if params[u[0]].grad is not None]
        if not units:
            return
        ts: list[Tensor] = []
        gs: list[Tensor] = []
        dims: list[int] = []
        owner: list[int] = []  # index into units
        for k, (wi, bi, od) in enumerate(units):
            for idx in (wi, bi):
                if idx == -1:
                    continue
                p = params[idx]
                g = p.grad
                if g is None:
                    g = torch.zeros_like(p)  # a bias without grad (unused): zero, the unit still moves
                if g.is_sparse:
                    raise ValueError(f"param group {gi}: PSISGD does not support sparse gradients "
                                     f"(param {idx} of the group, shape {list(p.shape)})")
                ts.append(p)
                gs.append(g)
                dims.append(od if idx == wi else 0)
                owner.append(k)
        if group["maximize"]:
            gs = torch._foreach_neg(gs)
        # per-unit squared norms s_j = ||w_j||^2 + b_j^2, in fp32 or better
        sq = [_rowsq(t.to(_acc_dtype(t)), d) for t, d in zip(ts, dims)]
        s = self._unit_sum(sq, owner, len(units))
        svec = [s[k] for k in owner]
        if self.check_finite:
            self._check_finite(gi, group, units, ts, gs, s)
        if guard or group["project_grad"]:  # on the loss gradient, before any weight decay
            dot = self._unit_sum([_rowsum((t * g).to(_acc_dtype(t)), d) for t, g, d in zip(ts, gs, dims)],
                                 owner, len(units))
            if guard:
                self._guard(gi, group, units, ts, gs, dims, owner, s, dot)
            if group["project_grad"]:
                coef = [(dot[k] / s[k]) for k in owner]
                gs = torch._foreach_sub(gs, [t * _bview(c.to(t.dtype), t, d) for t, c, d in
                                             zip(ts, coef, dims)])
        lam = group["psi_weight_decay"]
        if lam != 0:
            gs = torch._foreach_add(gs, ts, alpha=lam)  # coupled L2 (spec Sec. 3.7)
        scale = [_bview(v.to(t.dtype), t, d) for v, t, d in zip(svec, ts, dims)]
        paper = group["momentum_form"] == "paper"
        # Riemannian gradient ||theta||^2 G (eq. 7); the paper-form momentum takes it inside addcmul
        rgrad = None if rho != 0 and paper else torch._foreach_mul(gs, scale)
        if rho != 0:
            bufs = []
            for t in ts:
                st = self.state[t]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            torch._foreach_mul_(bufs, rho)
            if paper:
                torch._foreach_addcmul_(bufs, gs, scale, value=-lr)  # U <- rho U - lr s G   (eq. 11)
                delta = bufs
            else:
                torch._foreach_add_(bufs, rgrad)  # b <- rho b + s G
                delta = torch._foreach_mul(bufs, -lr)
        else:
            bufs = []
            delta = torch._foreach_mul(rgrad, -lr)
        if self.track_angles:
            self._accumulate_angles(group, units, ts, delta, dims, owner, s)
        torch._foreach_add_(ts, delta)  # retraction R_theta(xi) = theta + xi (Prop. 3)
        # rescaling: the normalised retraction, or the paper's overflow guard
        c = self._rescale_factors(group, ts, dims, owner, len(units), s)
        if c is not None:
            cv = [c[k] for k in owner]
            cb = [_bview(v.to(t.dtype), t, d) for v, t, d in zip(cv, ts, dims)]
            torch._foreach_mul_(ts, cb)
            if bufs:
                torch._foreach_mul_(bufs, cb)
            for k, (wi, _, _) in enumerate(units):
                st = self.state[params[wi]]
                fired = (c[k] != 1).sum()
                st["renorm_count"] = st["renorm_count"] + fired if "renorm_count" in st else fired
                rm, rv = self._bn.get((gi, wi), (None, None))
                if rm is not None:
                    rm.mul_(c[k].to(rm.dtype))
                if rv is not None:
                    rv.mul_(c[k].to(rv.dtype).square())
        if bufs and group["transport"] == "project":
            s_new = self._unit_sum([_rowsq(t.to(_acc_dtype(t)), d) for t, d in zip(ts, dims)],
                                   owner, len(units))
            dot = self._unit_sum([_rowsum((t * b).to(_acc_dtype(t)), d) for t, b, d in zip(ts, bufs, dims)],
                                 owner, len(units))
            coef = [_bview((dot[k] / s_new[k]).to(t.dtype), t, d) for k, t, d in zip(owner, ts, dims)]
            torch._foreach_sub_(bufs, torch._foreach_mul(ts, coef))

    @staticmethod
    def _unit_sum(parts: list[Tensor], owner: list[int], n: int) -> list[Tensor]:
        if len(parts) == n:  # every tensor is its own unit (owner == range(n))
            return list(parts)
        out: list[Tensor | None] = [None] * n
        for k, v in zip(owner, parts):
            out[k] = v if out[k] is None else out[k] + v
        return out  # type: ignore[return-value]

    def _rescale_factors(self, group: dict[str, Any], ts: list[Tensor], dims: list[int], owner: list[int],
                         n: int, s: list[Tensor]) -> list[Tensor] | None:
        """Per-unit factors c (O,): ``||theta_old||/||theta_new||`` for the normalised retraction,
        ``where(||theta|| > threshold, target/||theta||, 1)`` for the guard; None when neither."""
        normalize = group["retraction"] == "normalize"
        thr = group["renorm_threshold"]
        if not normalize and thr is None:
            return None
        n2 = self._unit_sum([_rowsq(t.to(_acc_dtype(t)), d) for t, d in zip(ts, dims)], owner, n)
        if normalize:
            return [torch.sqrt(a / b) for a, b in zip(s, n2)]
        tgt = float(group["renorm_target"])
        out = []
        for v in n2:
            nrm = v.sqrt()
            out.append(torch.where(nrm > thr, tgt / nrm, torch.ones_like(nrm)))
        return out

    def _accumulate_angles(self, group: dict[str, Any], units: list[tuple[int, int, int]], ts: list[Tensor],
                           delta: list[Tensor], dims: list[int], owner: list[int], s: list[Tensor]) -> None:
        """Angle between theta_t and theta_t + delta per unit: atan2(||delta_perp||, ||theta|| +
        <theta, delta>/||theta||); summed / maxed per layer in the weight's state."""
        n = len(units)
        dot = self._unit_sum([_rowsum((t * d_).to(_acc_dtype(t)), d) for t, d_, d in zip(ts, delta, dims)],
                             owner, n)
        dd = self._unit_sum([_rowsq(d_.to(_acc_dtype(d_)), d) for d_, d in zip(delta, dims)],
                            owner, n)
        params = group["params"]
        for k, (wi, _, _) in enumerate(units):
            r = s[k].sqrt()
            perp = (dd[k] - dot[k].square() / s[k]).clamp_min(0).sqrt()
            ang = torch.atan2(perp, r + dot[k] / r)
            st = self.state[params[wi]]
            if "angle_sum" not in st:
                st["angle_sum"] = torch.zeros((), dtype=ang.dtype, device=ang.device)
                st["angle_max"] = torch.zeros((), dtype=ang.dtype, device=ang.device)
                st["angle_count"] = torch.zeros((), dtype=ang.dtype, device=ang.device)
            st["angle_sum"] += ang.sum()
            st["angle_max"] = torch.maximum(st["angle_max"], ang.max())
            st["angle_count"] += ang.numel()

    @staticmethod
    def _unit_label(group: dict[str, Any], k: int, unit: tuple[int, int, int]) -> str:
        names = group.get("psi_names")
        if names:
            pos = [tuple(u) for u in group["psi_units"]].index(tuple(unit))
            return repr(names[pos])
        return f"param {unit[0]}"

    def _check_finite(self, gi: int, group: dict[str, Any], units: list[tuple[int, int, int]],
                      ts: list[Tensor], gs: list[Tensor], s: list[Tensor]) -> None:
        gn = torch._foreach_norm(gs)
        flags = torch.stack([~torch.isfinite(v) for v in gn] + [(v == 0).any() | ~torch.isfinite(v).all()
                                                                 for v in s])
        if not bool(flags.any()):
            return
        for k, unit in enumerate(units):
            label = self._unit_label(group, k, unit)
            if not bool(torch.isfinite(s[k]).all()):
                raise ValueError(f"PSISGD: param group {gi}, {label}: non-finite weights")
            zero = (s[k] == 0).nonzero().flatten().tolist()
            if zero:
                raise ValueError(f"PSISGD: param group {gi}, {label}: unit(s) {zero[:8]} have zero norm; "
                                 f"a PSI unit must be non-zero (the quotient excludes 0); re-initialise them")
        bad = [i for i, v in enumerate(gn) if not bool(torch.isfinite(v))]
        raise ValueError(f"PSISGD: param group {gi}: non-finite gradient in {len(bad)} PSI tensor(s) "
                         f"(shapes {[list(ts[i].shape) for i in bad][:4]}); skip the step (e.g. GradScaler) "
                         f"or lower the learning rate")

    def _guard(self, gi: int, group: dict[str, Any], units: list[tuple[int, int, int]], ts: list[Tensor],
               gs: list[Tensor], dims: list[int], owner: list[int], s: list[Tensor],
               dot: list[Tensor]) -> None:
        """AdamP's orthogonality test per unit: flag ``|cos(theta_j, g_j)| > 0.1/sqrt(d_j)``."""
        g2 = self._unit_sum([_rowsq(g.to(_acc_dtype(g)), d) for g, d in zip(gs, dims)], owner,
                            len(units))
        length = [0] * len(units)
        for k, t, d in zip(owner, ts, dims):
            length[k] += t.numel() // t.shape[d]
        viol = []
        for k in range(len(units)):
            cos = dot[k].abs() / (s[k].sqrt() * g2[k].sqrt()).clamp_min(torch.finfo(s[k].dtype).tiny)
            viol.append((cos * math.sqrt(length[k])).max())
        worst = torch.stack(viol)
        bad = (worst > _GUARD_DELTA).nonzero().flatten().tolist()
        if not bad:
            return
        labels = [self._unit_label(group, k, units[k]) for k in bad]
        msg = (f"PSISGD: param group {gi}: {', '.join(labels[:6])} not scale-invariant: "
               f"|cos(theta_j, grad_j)| * sqrt(d_j) = {[round(float(worst[k]), 3) for k in bad[:6]]} > "
               f"{_GUARD_DELTA} (AdamP test); expected weights whose outputs reach a training-mode BN. "
               f"Build the groups with psi_param_groups(model) or put these parameters in a Euclidean group")
        if self.check_invariance == "raise":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)

    # -- telemetry ----------------------------------------------------------------------------
    @torch.no_grad()
    def telemetry(self, reset: bool = True) -> dict[str, float]:
        """Floats for the trainer's per-epoch log: mean/max angular step (rad) since the last call,
        representative-norm summary and guard firings, overall and per PSI layer."""
        self._flush_all_angles()
        out: dict[str, float] = {}
        all_norms: list[Tensor] = []
        a_sum = a_cnt = 0.0
        a_max = 0.0
        renorms = 0.0
        for gi, group in enumerate(self.param_groups):
            if not group["psi"]:
                continue
            params = group["params"]
            names = group.get("psi_names") or [f"g{gi}.p{u[0]}" for u in group["psi_units"]]
            for (wi, bi, od), name in zip(group["psi_units"], names):
                w = params[wi]
                s = _rowsq(w.to(_acc_dtype(w)), od)
                if bi != -1:
                    s = s + params[bi].to(s.dtype).square()
                nrm = s.sqrt()
                all_norms.append(nrm.flatten())
                out[f"psi_norm_mean/{name}"] = float(nrm.mean())
                st = self.state.get(w, {})
                if "angle_count" in st and float(st["angle_count"]) > 0:
                    cnt = float(st["angle_count"])
                    out[f"psi_angle_mean/{name}"] = float(st["angle_sum"]) / cnt
                    a_sum += float(st["angle_sum"])
                    a_cnt += cnt
                    a_max = max(a_max, float(st["angle_max"]))
                    if reset:
                        st["angle_sum"].zero_()
                        st["angle_max"].zero_()
                        st["angle_count"].zero_()
                if "renorm_count" in st:
                    renorms += float(st["renorm_count"])
        if not all_norms:
            return out
        norms = torch.cat(all_norms)
        out.update({"psi_norm_min": float(norms.min()), "psi_norm_median": float(norms.median()),
                    "psi_norm_max": float(norms.max()), "psi_renorms": renorms})
        if a_cnt > 0:
            out["psi_angle_mean"] = a_sum / a_cnt
            out["psi_angle_max"] = a_max
        return out


# -- parameter groups --------------------------------------------------------------------------
def psi_param_groups(
    model: nn.Module,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = 0.0,
    nesterov: bool | None = None,
    *,
    psi_lr: float | None = None,
    psi_momentum: float | None = None,
    psi_weight_decay: float = 0.0,
    example_input: Any = None,
    mode: str = "auto",
    verify: bool = False,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a PSI group and a Euclidean group.

    The PSI group holds every scale-invariant weight found by
    :func:`bnlab.optim.invariance.find_scale_invariant` (with its bias), as
    ``{"params", "psi": True, "psi_units": [(w_idx, b_idx, out_dim)], "psi_names", "psi_norms"}``;
    ``psi_weight_decay`` is 0 unless asked. The Euclidean group holds the rest (BN gamma/beta,
    classifier, weights not followed by a training-mode BN). ``lr``, ``momentum``, ``weight_decay``,
    ``nesterov`` set the Euclidean group, ``psi_lr``/``psi_momentum`` the PSI group (``None``: use
    the optimiser's defaults). Empty groups are omitted.
    """
    from .invariance import find_scale_invariant

    units = find_scale_invariant(model, example_input, mode=mode, verify=verify)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    psi_params: list[Tensor] = []
    psi_units: list[tuple[int, int, int]] = []
    names: list[str] = []
    norms: list[str | None] = []
    used: set[str] = set()
    for u in units:
        if u.weight not in named or (u.bias is not None and u.bias not in named):
            continue  # frozen weight (or bias): leave it to the Euclidean group / untouched
        wi = len(psi_params)
        psi_params.append(named[u.weight])
        bi = -1
        if u.bias is not None:
            bi = len(psi_params)
            psi_params.append(named[u.bias])
            used.add(u.bias)
        used.add(u.weight)
        psi_units.append((wi, bi, u.out_dim))
        names.append(u.weight)
        norms.append(u.norm)
    groups: list[dict[str, Any]] = []
    if psi_params:
        g: dict[str, Any] = {"params": psi_params, "psi": True, "psi_units": psi_units, "psi_names": names,
                             "psi_norms": norms, "psi_weight_decay": psi_weight_decay}
        if psi_lr is not None:
            g["lr"] = psi_lr
        if psi_momentum is not None:
            g["momentum"] = psi_momentum
        groups.append(g)
    rest = [p for n, p in named.items() if n not in used]
    if rest:
        e: dict[str, Any] = {"params": rest, "psi": False}
        for key, val in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                         ("nesterov", nesterov)):
            if val is not None:
                e[key] = val
        groups.append(e)
    if not groups:
        raise ValueError("psi_param_groups: model has no trainable parameters")
    return groups


# -- trainer registry ---------------------------------------------------------------------------
_PSI_KEYS = ("momentum_form", "retraction", "renorm_threshold", "renorm_target", "transport", "project_grad",
             "check_invariance", "guard_steps", "check_finite", "track_angles", "foreach", "fused")


def _builder(kind: str) -> Callable[..., PSISGD]:
    def build(model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, **options: Any) -> PSISGD:
        opts = dict(options)
        psi_lr = float(opts.pop("psi_lr", lr))
        psi_wd = float(opts.pop("psi_weight_decay", 0.0))
        mode = opts.pop("mode", "auto")
        kwargs = {k: opts.pop(k) for k in _PSI_KEYS if k in opts}
        kwargs.setdefault("foreach", True)  # Euclidean groups: like torch.optim.SGD(foreach=True)
        if opts:
            raise ValueError(f"optimizer {kind!r}: unknown option(s) {sorted(opts)}; expected psi_lr, "
                             f"psi_weight_decay, mode, {', '.join(_PSI_KEYS)}")
        if kind == "psi-gd":
            e_mom, p_mom, nest = 0.0, 0.0, False
        elif kind == "psi-sgd":
            e_mom, p_mom, nest = momentum, 0.0, nesterov
        else:
            e_mom, p_mom, nest = momentum, momentum, nesterov
        groups = psi_param_groups(model, lr=lr, momentum=e_mom, weight_decay=weight_decay,
                                  nesterov=nest and e_mom > 0, psi_lr=psi_lr, psi_momentum=p_mom,
                                  psi_weight_decay=psi_wd, mode=mode)
        return PSISGD(groups, lr=lr, bn_stats=model, **kwargs)

    return build


for _name in ("psi-sgd", "psi-sgdm", "psi-gd"):
    register_optimizer(_name, _builder(_name))
