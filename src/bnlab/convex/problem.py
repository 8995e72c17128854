"""The convex programs as data: objective, constraints and the Lagrangian dual (certificate).

(C-BN), convex_bn.md §2.3, batched over C one-vs-all outputs (§2.6 option 1) and with the losses of
§2.5. Variables ``W`` (C, 2P, q): rows ``0..P-1`` are the ``s_i`` (sign +1), rows ``P..2P-1`` the
``s'_i`` (sign -1), all with pattern ``D_i``. ``q = k + 1`` columns of ``U'``.

    pred_c = Σ_j σ_j D_j ⊙ (U' w_cj)                 (n,)   [pooled by ``pool`` for the GAP-CNN, §4.1]
    obj    = Σ_c ℓ(pred_c, y_c) + β Σ_{c,j} ||Λ w_cj||_2           (Λ = diag(weights), §5.3 E2; 1 = C-BN)
    s.t.   (2D_j - 1) ⊙ (U' w_cj) >= 0                  (exact ReLU program; dropped in the gated relaxation)

Dual (derived for this implementation, docs/methods/convex_bn.md): with ``ν_c = -∇ℓ(pred_c)`` and
multipliers ``λ_cj >= 0``, every ``t ∈ [0, 1]`` with ``||Λ^{-1} U'^T (σ_j D_j ν_c + (2D_j-1) λ_cj)|| <= β/t``
gives the lower bound ``Σ_c -ℓ*(-t ν_c)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ConvexBNProblem", "LOSSES"]

LOSSES = ("squared", "logistic", "hinge")


@dataclass
class ConvexBNProblem:
    """Shapes: ``Up`` (N, q) with N = n (or n·K for the GAP-CNN), ``D`` (N, P) bool, ``Y`` (C, n),
    ``weights`` (q,) or None; ``pool`` = K positions averaged per sample (None: no pooling)."""

    Up: Tensor
    D: Tensor
    Y: Tensor
    beta: float
    loss: str = "squared"
    weights: Tensor | None = None
    pool: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite float, got {self.beta!r}")
        if self.Y.dim() == 1:
            self.Y = self.Y[None]
        if self.loss in ("logistic", "hinge"):
            bad = (self.Y.abs() != 1).any()
            if bool(bad):
                raise ValueError(f"loss={self.loss!r} needs labels in {{-1, +1}}, got values "
                                 f"{torch.unique(self.Y)[:5].tolist()}")
        self.Dsgn = torch.cat([self.D, self.D], 1).to(self.Up.dtype)         # (N, 2P)
        P = self.D.shape[1]
        self.sigma = torch.cat([torch.ones(P), -torch.ones(P)]).to(self.Up)  # (2P,)
        self.A = 2 * self.Dsgn - 1                                           # (N, 2P) ±1

    # shapes --------------------------------------------------------------------------------------
    @property
    def n_outputs(self) -> int:
        return int(self.Y.shape[0])

    @property
    def n_patterns(self) -> int:
        return int(self.D.shape[1])

    def zeros(self) -> Tensor:
        return self.Up.new_zeros(self.n_outputs, 2 * self.n_patterns, self.Up.shape[1])

    # forward pieces -------------------------------------------------------------------------------
    def hidden(self, W: Tensor) -> Tensor:
        """``U' w_cj`` for all blocks: (C, 2P, N)."""
        return W @ self.Up.T

    def _pool(self, z: Tensor) -> Tensor:
        return z if self.pool is None else z.reshape(z.shape[0], -1, self.pool).mean(-1)

    def _unpool(self, g: Tensor) -> Tensor:
        return g if self.pool is None else (g / self.pool).repeat_interleave(self.pool, dim=-1)

    def predict(self, W: Tensor, gated: bool = True) -> Tensor:
        """(C, n) predictions; gated uses ``D ⊙``, else ``relu`` (the realised network)."""
        H = self.hidden(W)
        H = H * self.Dsgn.T if gated else H.clamp_min(0)
        return self._pool(torch.einsum("cjn,j->cn", H, self.sigma))

    def grad_from_pred(self, g: Tensor) -> Tensor:
        """Adjoint of ``predict``: maps ∂/∂pred (C, n) to ∂/∂W (C, 2P, q)."""
        g = self._unpool(g)
        return self.sigma[None, :, None] * ((g[:, None, :] * self.Dsgn.T[None]) @ self.Up)

    def loss_value(self, Z: Tensor) -> Tensor:
        Y = self.Y
        if self.loss == "squared":
            return 0.5 * ((Z - Y) ** 2).sum()
        if self.loss == "logistic":
            return torch.nn.functional.softplus(-Y * Z).sum()
        return (1 - Y * Z).clamp_min(0).sum()

    def loss_grad(self, Z: Tensor) -> Tensor:
        if self.loss == "squared":
            return Z - self.Y
        if self.loss == "logistic":
            return -self.Y * torch.sigmoid(-self.Y * Z)
        raise ValueError("loss='hinge' is non-smooth: use solver='cvxpy'")

    def neg_conj(self, nu: Tensor) -> Tensor:
        """``Σ -ℓ*(-ν)`` (the dual objective), ν (C, n); -inf outside the domain."""
        Y = self.Y
        if self.loss == "squared":
            return (nu * Y).sum() - 0.5 * (nu ** 2).sum()
        p = Y * nu
        if bool((p < -1e-12).any() or (p > 1 + 1e-12).any()):
            return torch.tensor(-math.inf, dtype=nu.dtype)
        p = p.clamp(0, 1)
        if self.loss == "hinge":
            return p.sum()
        ent = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
        return ent.sum()

    def norms(self, W: Tensor) -> Tensor:
        """(C, 2P) block norms ``||Λ w||``."""
        return (W if self.weights is None else W * self.weights).norm(dim=-1)

    def penalty(self, W: Tensor) -> Tensor:
        return self.beta * self.norms(W).sum()

    def objective(self, W: Tensor, gated: bool = True) -> Tensor:
        return self.loss_value(self.predict(W, gated)) + self.penalty(W)

    def violation(self, W: Tensor) -> Tensor:
        """Max constraint violation ``max(-(2D-1) ⊙ U'w)_+`` relative to ``max |U' w|``, floored at
        ``1e-12 max(1, max|Y|)`` so that an optimum at W ≈ 0 (rounding noise only) is not called violated."""
        H = self.hidden(W)
        scale = H.abs().max().clamp_min(1e-12 * max(1.0, float(self.Y.abs().max())))
        return (-(H * self.A.T)).clamp_min(0).max() / scale

    def dual_bound(self, W: Tensor, lam: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Lower bound from the residual ``ν = -ℓ'(pred)`` and multipliers ``lam`` (C, 2P, N) >= 0
        (None: the gated relaxation, λ = 0). Returns (bound, max scaled dual-constraint norm / β)."""
        Z = self.predict(W, gated=True)
        if self.loss == "hinge":
            nu = self.Y * ((self.Y * Z) < 1).to(Z)
        else:
            nu = -self.loss_grad(Z)
        nuN = self._unpool(nu)                                      # (C, N)
        M = self.sigma[None, :, None] * (nuN[:, None, :] * self.Dsgn.T[None])   # (C, 2P, N)
        if lam is not None:
            M = M + self.A.T[None] * lam
        R = M @ self.Up                                              # (C, 2P, q)
        if self.weights is not None:
            R = R / self.weights
        worst = R.norm(dim=-1).max() / self.beta
        t_max = torch.clamp(1 / worst.clamp_min(1e-300), max=1.0)
        if self.loss == "squared":                                   # best t in [0, t_max], closed form
            t = torch.clamp((nu * self.Y).sum() / (nu ** 2).sum().clamp_min(1e-300), 0, t_max)
        else:
            t = t_max
        return self.neg_conj(t * nu), worst
