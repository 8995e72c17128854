"""The three SGD effects of Complete BN (Peng et al., TPAMI 2024; cbn.md Sec. 3.1 and Sec. 6).

For the non-convex SGD bound (cbn.md Sec. 3.1, eq. (A)/(B)) three quantities matter:

(i)   the local gradient Lipschitz constant L, estimated
      (a) Santurkar et al. (2018) style, along the gradient on a fixed mini-batch:
          L_eff = max_s ||grad L(w - s g) - grad L(w)|| / ||s g||,  s in steps * lr;
      (b) optionally as the top Hessian eigenvalue, by power iteration with Hessian-vector products
          on the average loss of a few mini-batches (as PyHessian);
(ii)  E||g||^2 = (1/K) sum_k ||g_k||^2 over K mini-batch gradients g_k;
(iii) Var(g) = K/(K-1) [ (1/K) sum_k ||g_k||^2 - ||g_bar||^2 ],  g_bar = (1/K) sum_k g_k.

Per layer (per parameter tensor) the same second moment and variance are reported, plus the
scale-normalised second moment E||g_W||^2 * ||W||^2 (cbn.md Sec. 6.4), which is invariant to the
scale of weights that feed a normalisation.

Probes run with train-mode normalisation (batch statistics), gradients of the data loss only (no
weight decay), and leave the model exactly as found: parameters, every buffer (BN running stats and
``num_batches_tracked``), ``.grad`` fields, train/eval flags and the global RNG state are restored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ThreeEffects", "three_effects"]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ThreeEffects:
    """Result of :func:`three_effects`. All values are Python floats.

    ``lipschitz``: L_eff (Sec. 6.3a); ``loss_range``: max - min loss over the probe steps;
    ``hessian_top``: lambda_max (Sec. 6.3b) or NaN when not computed; ``grad_sq_norm``: E||g||^2;
    ``grad_variance``: Var(g); ``mean_grad_sq_norm``: ||g_bar||^2; ``signal_fraction``:
    ||g_bar||^2 / E||g||^2; ``scaled_grad_sq_norm``: sum over layers of E||g_W||^2 ||W||^2;
    ``loss``: mean loss over the K batches; ``per_layer``: name -> {grad_sq_norm, grad_variance,
    scaled_grad_sq_norm, weight_sq_norm}.
    """

    lipschitz: float
    loss_range: float
    hessian_top: float
    grad_sq_norm: float
    grad_variance: float
    mean_grad_sq_norm: float
    signal_fraction: float
    scaled_grad_sq_norm: float
    loss: float
    num_batches: int
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """The scalar fields as a flat ``{prefix + name: float}`` dict (for metric logs)."""
        return {prefix + k: float(v) for k, v in asdict(self).items() if k != "per_layer"}

    def to_dict(self) -> dict:
        return asdict(self)


class _Snapshot:
    """Saves parameters, buffers, grads, training flags and the RNG state; ``restore`` puts them back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [p.detach().clone() for p in model.parameters()]
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        self.buffers = [b.detach().clone() for b in model.buffers()]
        self.modes = [m.training for m in model.modules()]
        self.rng = torch.get_rng_state()

    @torch.no_grad()
    def restore(self) -> None:
        for p, v, g in zip(self.model.parameters(), self.params, self.grads):
            p.copy_(v)
            p.grad = g
        for b, v in zip(self.model.buffers(), self.buffers):
            b.copy_(v)
        for m, t in zip(self.model.modules(), self.modes):
            m.training = t
        torch.set_rng_state(self.rng)


def _loss_and_grad(model: nn.Module, loss_fn: LossFn, batch, params: list[Tensor],
                   create_graph: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
    x, y = batch
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
    return loss, grads


def _sq_norms(ts: Sequence[Tensor]) -> Tensor:
    """Squared L2 norm of each tensor, as a (n,) float64 tensor (foreach kernel)."""
    return torch.stack(torch._foreach_norm(list(ts))).double().pow(2)


def _lipschitz(model: nn.Module, loss_fn: LossFn, batch, params: list[Tensor], steps: Sequence[float]
               ) -> tuple[float, float]:
    """Santurkar-style L_eff and the loss range along -g on one batch (cbn.md Sec. 6.3a)."""
    loss0, g = _loss_and_grad(model, loss_fn, batch, params)
    g = [t.detach() for t in g]
    gnorm = math.sqrt(float(_sq_norms(g).sum()))
    w0 = [p.detach().clone() for p in params]
    losses, best = [float(loss0.detach())], 0.0
    if gnorm == 0.0:
        return 0.0, 0.0
    for s in steps:
        with torch.no_grad():
            torch._foreach_copy_(params, w0)
            torch._foreach_add_(params, g, alpha=-s)
        loss_s, g_s = _loss_and_grad(model, loss_fn, batch, params)
        diff = math.sqrt(float(_sq_norms(torch._foreach_sub([t.detach() for t in g_s], g)).sum()))
        best = max(best, diff / (s * gnorm))
        losses.append(float(loss_s.detach()))
    with torch.no_grad():
        torch._foreach_copy_(params, w0)
    return best, max(losses) - min(losses)


def _hessian_top(model: nn.Module, loss_fn: LossFn, batches: Sequence, params: list[Tensor],
                 iters: int, seed: int) -> float:
    """lambda_max of the Hessian of the mean loss over ``batches`` by power iteration (Sec. 6.3b)."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    norm = math.sqrt(float(_sq_norms(v).sum()))
    v = torch._foreach_div(v, norm)
    eig = 0.0
    for _ in range(iters):
        hv = [torch.zeros_like(p) for p in params]
        for batch in batches:
            _, g = _loss_and_grad(model, loss_fn, batch, params, create_graph=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
            h = torch.autograd.grad(dot, params, allow_unused=True)
            h = [torch.zeros_like(p) if t is None else t.detach() for p, t in zip(params, h)]
            torch._foreach_add_(hv, h, alpha=1.0 / len(batches))
        eig = float(sum((a * b).sum() for a, b in zip(hv, v)))  # Rayleigh quotient v^T H v
        norm = math.sqrt(float(_sq_norms(hv).sum()))
        if norm == 0.0:
            return 0.0
        v = torch._foreach_div(hv, norm)
    return eig


def three_effects(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable,
    *,
    max_batches: int | None = None,
    lr: float = 0.1,
    steps: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    hessian: bool = False,
    hessian_batches: int = 3,
    hessian_iters: int = 20,
    seed: int = 0,
) -> ThreeEffects:
    """Estimate L, E||g||^2 and Var(g) of ``loss_fn(model(x), y)`` at the current weights.

    Args:
        model: any module; normalisation layers are put in train mode for the probes.
        loss_fn: ``loss_fn(output, target) -> scalar`` (the data loss; no weight decay).
        batches: iterable of ``(x, y)`` mini-batches (K >= 2 of them, e.g. K=8..32 training
            batches). The first is used for L_eff, the first ``hessian_batches`` for lambda_max.
        max_batches: use at most this many batches.
        lr: the current learning rate; L_eff steps are ``steps * lr``.
        hessian: also run the power iteration (``hessian_iters`` Hessian-vector products per batch).
        seed: seed of the power iteration's start vector.

    Returns:
        :class:`ThreeEffects`. The model (parameters, buffers, grads, modes) and the global RNG
        state are left exactly as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if not lr > 0 or not steps or any(not s > 0 for s in steps):
        raise ValueError(f"lr and steps must be positive, got lr={lr!r}, steps={tuple(steps)!r}")
    batch_list = []
    for b in batches:
        if max_batches is not None and len(batch_list) >= max_batches:
            break
        batch_list.append(b)
    if len(batch_list) < 2:
        raise ValueError(f"batches must hold at least 2 mini-batches (for a variance), got {len(batch_list)}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")

    snap = _Snapshot(model)
    try:
        model.train()
        k = len(batch_list)
        g_sum = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        sq_sum = torch.zeros(len(params), dtype=torch.float64, device=params[0].device)
        loss_sum = 0.0
        for batch in batch_list:
            loss, g = _loss_and_grad(model, loss_fn, batch, params)
            g = [t.detach().double() for t in g]
            torch._foreach_add_(g_sum, g)
            sq_sum += _sq_norms(g)
            loss_sum += float(loss.detach())
        w_sq = _sq_norms([p.detach() for p in params])
        g_bar = torch._foreach_div(g_sum, k)
        bar_sq = _sq_norms(g_bar)
        second = sq_sum / k                                       # E||g_l||^2 per tensor
        var = (second - bar_sq) * (k / (k - 1))                   # unbiased, per tensor
        lip, loss_range = _lipschitz(model, loss_fn, batch_list[0], params, [s * lr for s in steps])
        snap_buffers_only(model, snap)  # the Lipschitz probe moved BN buffers; reset before Hessian
        lam = float("nan")
        if hessian:
            lam = _hessian_top(model, loss_fn, batch_list[:max(1, hessian_batches)], params,
                               hessian_iters, seed)
    finally:
        snap.restore()
    total = float(second.sum())
    per_layer = {
        n: {"grad_sq_norm": float(second[i]), "grad_variance": float(var[i]),
            "scaled_grad_sq_norm": float(second[i] * w_sq[i]), "weight_sq_norm": float(w_sq[i])}
        for i, n in enumerate(names)
    }
    return ThreeEffects(
        lipschitz=lip,
        loss_range=loss_range,
        hessian_top=lam,
        grad_sq_norm=total,
        grad_variance=float(var.sum()),
        mean_grad_sq_norm=float(bar_sq.sum()),
        signal_fraction=float(bar_sq.sum()) / total if total > 0 else float("nan"),
        scaled_grad_sq_norm=float((second * w_sq).sum()),
        loss=loss_sum / k,
        num_batches=k,
        per_layer=per_layer,
    )


@torch.no_grad()
def snap_buffers_only(model: nn.Module, snap: _Snapshot) -> None:
    """Put the snapshot's buffers back (probes in train mode update BN running statistics)."""
    for b, v in zip(model.buffers(), snap.buffers):
        b.copy_(v)
