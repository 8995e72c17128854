"""ADMM for (C-BN) with the cone constraints handled exactly in a per-sample prox (solver ``"admm"``).

Splitting (ours; convex_bn.md §2.3 rewritten): with ``z_j = U' w_j`` (N,) per block j,

    min_{W, Z}  β Σ_j ||w_j||  +  ℓ(Σ_j σ_j D_j ⊙ z_j, y) + I{(2D_j - 1) ⊙ z_j >= 0 ∀j}     s.t. U' w_j = z_j.

* W-step: ``U'^T U' = I``, so ``argmin β||w|| + ρ/2 ||U' w - v||² = blocksoft(U'^T v, β/ρ)``: one matmul
  (C, 2P, N) @ (N, q) and a group soft threshold, batched over outputs and blocks.
* Z-step: separable over samples i. Entries with ``D_ji = 0`` get ``z = min(v, 0)``; the entries with
  ``D_ji = 1`` solve ``min ℓ(Σ σ_j z_j) + ρ/2 ||z - v||², z >= 0``, whose KKT point is
  ``z_j = (v_j - g σ_j / ρ)_+`` with the scalar ``g = ℓ'(pred)``. Squared loss: ``g = r`` solves the monotone
  piecewise-linear equation ``r + y - Σ_j σ_j (v_j - r σ_j/ρ)_+ = 0`` exactly (breakpoints sorted per sample,
  one vectorised pass, then one active-set polish); logistic loss: bisection on ``g``.
  Gated relaxation (no cones): the same with ``(·)_+`` dropped, closed form.
* Over-relaxation α = 1.6, residual balancing of ρ (Boyd et al. 2011, §3.4.1).
* Certificate: the scaled dual ``y = ρ u`` satisfies ``-y_j = σ_j D_j ν + (2D_j-1) λ_j`` at a fixed point, so
  ``λ = ((2D-1) ⊙ (-y - σ D ν))_+`` is passed to ``ConvexBNProblem.dual_bound`` (the same certificate as the
  other solvers): a valid lower bound at every iterate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .problem import ConvexBNProblem

__all__ = ["admm", "zprox_squared", "zprox_logistic"]


def _blocksoft(V: Tensor, thr: float) -> Tensor:
    nrm = V.norm(dim=-1, keepdim=True)
    return V * (1 - thr / nrm.clamp_min(1e-300)).clamp_min(0)


def prox_weighted_norm(Cm: Tensor, lam: Tensor | None, kappa: float, iters: int = 80) -> Tensor:
    """Blockwise ``argmin_w κ||Λ w|| + ½||w - c||²`` for ``Cm`` (..., q), ``Λ = diag(lam)`` (None: Λ = I,
    the group soft threshold). ``w = c/(1 + μλ²)`` with ``μ > 0`` the root of ``μ||Λc/(1+μλ²)|| = κ``
    (increasing in μ; bisection in log μ); ``w = 0`` iff ``||Λ^{-1}c|| <= κ``."""
    if lam is None:
        return _blocksoft(Cm, kappa)
    zero = (Cm / lam).norm(dim=-1, keepdim=True) <= kappa
    lo = torch.full_like(Cm[..., :1], -60.0)
    hi = torch.full_like(Cm[..., :1], 60.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        mu = torch.exp(mid)
        f = mu * (lam * Cm / (1 + mu * lam ** 2)).norm(dim=-1, keepdim=True) - kappa
        hi = torch.where(f > 0, mid, hi)
        lo = torch.where(f > 0, lo, mid)
    mu = torch.exp(0.5 * (lo + hi))
    return torch.where(zero, torch.zeros_like(Cm), Cm / (1 + mu * lam ** 2))


def zprox_squared(V: Tensor, M: Tensor, s: Tensor, Y: Tensor, rho: float, gated: bool = False) -> Tensor:
    """Exact prox of ``Σ_i ½(Σ_j s_j M_ij z_ij - y_i)² + cone indicator`` at ``V``, step 1/ρ.

    V (C, N, J), M (N, J) bool (pattern D), s (J,) ±1, Y (C, N) -> Z (C, N, J)."""
    Mf = M.to(V.dtype)
    if gated:                                    # z_j = v_j - r s_j/ρ on M, r = (Σ s v - y)/(1 + |M|/ρ)
        r = ((V * (s * Mf)).sum(-1) - Y) / (1 + Mf.sum(-1) / rho)
        return V - (r[..., None] / rho) * s * Mf
    b = rho * s * V                                                   # breakpoints r = ρ s_j v_j
    bs, idx = torch.sort(b, dim=-1)
    Me = Mf.expand_as(V)
    sp = torch.gather(Me * (s > 0), -1, idx)                          # + entries in sorted order
    sm = torch.gather(Me * (s < 0), -1, idx)                          # - entries
    suf = lambda a: a.flip(-1).cumsum(-1).flip(-1)  # noqa: E731
    Splus = suf(sp * bs) - bs * suf(sp)                               # Σ_{+} (b_j - b_k)_+
    Sminus = bs * sm.cumsum(-1) - (sm * bs).cumsum(-1)                # Σ_{-} (b_k - b_j)_+
    h = bs + Y[..., None] - (Splus - Sminus) / rho                    # h(b_k), nondecreasing in k
    J = V.shape[-1]
    K = (h < 0).sum(-1, keepdim=True)                                 # root lies in [b_{K-1}, b_K]
    k0, k1 = (K - 1).clamp(0, J - 1), K.clamp(0, J - 1)
    b0, b1 = bs.gather(-1, k0), bs.gather(-1, k1)
    h0, h1 = h.gather(-1, k0), h.gather(-1, k1)
    den = (h1 - h0)
    mid = b0 - h0 * (b1 - b0) / torch.where(den > 0, den, torch.ones_like(den))
    left = b0 - h0 / (1 + sp.sum(-1, keepdim=True) / rho)             # all + active, no - active
    right = b1 - h1 / (1 + sm.sum(-1, keepdim=True) / rho)            # all - active, no + active
    r = torch.where(K == 0, left, torch.where(K == J, right, mid))
    # active-set polish: exact root of the linear piece selected by r
    act = ((V - r * s / rho) > 0) & M
    a = act.to(V.dtype)
    r = ((V * s * a).sum(-1, keepdim=True) - Y[..., None]) / (1 + a.sum(-1, keepdim=True) / rho)
    return torch.where(M, (V - r * s / rho).clamp_min(0), V.clamp_max(0))


def zprox_squared_newton(V: Tensor, M: Tensor, s: Tensor, Y: Tensor, rho: float, r0: Tensor | None,
                         max_newton: int = 12) -> tuple[Tensor, Tensor]:
    """Same prox as :func:`zprox_squared` (cone-constrained), by a bracketed semismooth Newton method on the
    scalar residual ``r`` per sample, warm-started at ``r0`` (C, N, 1); falls back to the sorting method
    if some sample has not settled after ``max_newton`` steps. Returns (Z, r)."""
    y = Y[..., None]
    inf = torch.tensor(math.inf, dtype=V.dtype, device=V.device)
    sp, sn = s > 0, s < 0
    bp = torch.where(M[:, sp], rho * V[..., sp], -inf)               # breakpoints of the + blocks (C, N, P)
    bn = torch.where(M[:, sn], -rho * V[..., sn], inf)               # breakpoints of the - blocks
    if r0 is None:
        r = (bp.clamp_min(0).sum(-1, keepdim=True) - bn.clamp_max(0).neg().sum(-1, keepdim=True)) / rho - y
    else:
        r = r0
    lo = torch.full_like(r, -math.inf)
    hi = torch.full_like(r, math.inf)
    for _ in range(max_newton):
        dp = (bp - r).clamp_min_(0)
        dn = (r - bn).clamp_min_(0)
        h = r + y - (dp.sum(-1, keepdim=True) - dn.sum(-1, keepdim=True)) / rho
        done = h.abs() <= 1e-13 * (1 + y.abs() + r.abs())
        if bool(done.all()):
            break
        slope = 1 + ((dp > 0).sum(-1, keepdim=True) + (dn > 0).sum(-1, keepdim=True)).to(V.dtype) / rho
        lo = torch.where(h < 0, r, lo)
        hi = torch.where(h > 0, r, hi)
        rn = r - h / slope                                            # exact root of the current piece
        bad = ~((rn > lo) & (rn < hi)) & torch.isfinite(lo) & torch.isfinite(hi)
        rn = torch.where(bad, 0.5 * (lo + hi), rn)
        r = torch.where(done, r, rn)
    else:
        Z = zprox_squared(V, M, s, Y, rho)
        return Z, ((Z * (s * M)).sum(-1, keepdim=True) - y)
    return torch.where(M, (V - r * s / rho).clamp_min(0), V.clamp_max(0)), r


def zprox_logistic(V: Tensor, M: Tensor, s: Tensor, Y: Tensor, rho: float, gated: bool = False,
                   iters: int = 60) -> Tensor:
    """As :func:`zprox_squared` for ``Σ softplus(-y_i pred_i)`` (y = ±1): bisection on ``g = ℓ'(pred)``,
    which lies in ``[-1, 0]`` (y = +1) or ``[0, 1]`` (y = -1)."""
    Mf = M.to(V.dtype)
    y = Y[..., None]

    def z_of(g):
        u = V - g * s / rho
        return u if gated else u.clamp_min(0)

    lo = torch.minimum(-y, torch.zeros_like(y))
    hi = torch.maximum(-y, torch.zeros_like(y))
    for _ in range(iters):
        g = 0.5 * (lo + hi)
        pred = (z_of(g) * s * Mf).sum(-1, keepdim=True)
        phi = g + y * torch.sigmoid(-y * pred)                        # g - ℓ'(pred), increasing in g
        pos = phi > 0
        hi = torch.where(pos, g, hi)
        lo = torch.where(pos, lo, g)
    g = 0.5 * (lo + hi)
    return torch.where(M, z_of(g), V if gated else V.clamp_max(0))


def admm_bound(p: ConvexBNProblem, Z: Tensor, Yd: Tensor, gated: bool = False) -> float:
    """Lagrangian lower bound from the ADMM state: ``ν = -ℓ'(Σ σ D ⊙ Z)`` (C, N) and the multiplier
    ``Yd = ρu`` (C, 2P, N) of ``U'w = z``; ``λ = ((2D-1) ⊙ (-Yd - σ D ν))_+`` (λ = 0 if gated), then
    the dual point (tν, tλ) is scaled into ``max_j ||U'^T(σ_j D_j ν + (2D_j-1) λ_j)|| <= β``."""
    Ds = p.Dsgn.T[None]                                               # (1, 2P, N)
    nu = -p.loss_grad(torch.einsum("cjn,j->cn", Z * Ds, p.sigma))     # (C, N)
    M = p.sigma[None, :, None] * nu[:, None, :] * Ds
    if not gated:
        A = p.A.T[None]
        M = M + A * (A * (-Yd - M)).clamp_min(0)
    R = M @ p.Up
    if p.weights is not None:
        R = R / p.weights
    worst = float(R.norm(dim=-1).max()) / p.beta
    t_max = min(1.0, 1.0 / max(worst, 1e-300))
    if p.loss == "squared":
        t = min(max(float((nu * p.Y).sum()) / max(float((nu ** 2).sum()), 1e-300), 0.0), t_max)
    else:
        t = t_max
    return float(p.neg_conj(t * nu))


class _Anderson:
    """Safeguarded type-II Anderson acceleration of a fixed-point map x -> F(x) (Zhang, O'Donoghue & Boyd
    2020, as in SCS 3): memory ``m``, Tikhonov-regularised least squares; flat state of size S."""

    def __init__(self, m: int, size: int, like: Tensor):
        self.m = m
        self.dG = like.new_zeros(m, size)
        self.dF = like.new_zeros(m, size)
        self.k = 0
        self.g_prev = self.f_prev = None

    def reset(self) -> None:
        self.k = 0
        self.g_prev = self.f_prev = None

    def step(self, x: Tensor, g: Tensor) -> Tensor:
        """Given x and g = F(x) (flat), return the extrapolated next point."""
        f = g - x
        if self.g_prev is not None:
            i = self.k % self.m
            self.dG[i] = g - self.g_prev
            self.dF[i] = f - self.f_prev
            self.k += 1
        self.g_prev, self.f_prev = g, f
        j = min(self.k, self.m)
        if j == 0:
            return g
        dF, dG = self.dF[:j], self.dG[:j]
        H = dF @ dF.T
        H = H + (1e-10 * float(H.diagonal().max()) + 1e-300) * torch.eye(j, dtype=H.dtype, device=H.device)
        gam = torch.linalg.solve(H, dF @ f)
        return g - gam @ dG


def admm(p: ConvexBNProblem, tol: float = 1e-6, constraint_tol: float | None = None, max_iter: int = 20000,
         rho: float | None = None, alpha: float = 1.6, gated: bool = False, check_every: int = 10,
         W0: Tensor | None = None, anderson: int | None = None, adapt_rho: bool = True, balance: float = 10.0,
         certify: str = "program", bar=None) -> dict:
    """Run ADMM on an unweighted, unpooled problem ``p`` (tensors on the target device/dtype).

    Returns a dict with W (C, 2P, q), objective, dual bound, gap, violation, iterations, history."""
    if p.pool is not None:
        raise ValueError(f"solver='admm' does not support pooled problems (pool={p.pool}); use solver='al'")
    if certify not in ("program", "network"):
        raise ValueError(f"certify must be 'program' or 'network', got {certify!r}")
    if p.loss not in ("squared", "logistic"):
        raise ValueError(f"solver='admm' needs loss 'squared' or 'logistic', got loss={p.loss!r}; "
                         "use solver='cvxpy'")
    ctol = tol if constraint_tol is None else constraint_tol
    Up, beta, lam_w = p.Up, p.beta, p.weights
    M = p.Dsgn.bool()                                                 # (N, 2P)
    s = p.sigma                                                       # (2P,)
    A = p.A.T[None]                                                   # (1, 2P, N)
    Y = p.Y
    zprox = zprox_squared if p.loss == "squared" else zprox_logistic
    W = p.zeros() if W0 is None else W0.clone()
    HW = W @ Up.T                                                     # (C, 2P, N)
    Z = HW.clone() if gated else HW * (A * HW >= 0)
    Uu = torch.zeros_like(Z)
    if rho is None:                                                   # balance β against the data scale
        rho = max(1e-3, min(1e3, beta / max(1e-12, float(Y.abs().max()) / math.sqrt(Up.shape[0]))))
    hist: list[dict] = []
    pv = db = math.inf
    viol = math.inf
    shape = (2,) + tuple(Z.shape)
    S = 2 * Z.numel()
    if anderson is None:                                              # memory budget ~ 2 m S doubles <= 4e8 B
        anderson = int(max(0, min(10, 2.5e7 // S)))
    aa = _Anderson(anderson, S, Z) if anderson > 0 else None

    rcache: list = [None]

    def F(x):
        Z, Uu = x[0], x[1]
        W = prox_weighted_norm((Z - Uu) @ Up, lam_w, beta / rho)
        HW = W @ Up.T
        Hh = alpha * HW + (1 - alpha) * Z
        Vz = (Hh + Uu).transpose(1, 2).contiguous()
        if p.loss == "squared" and not gated:
            Zn, rcache[0] = zprox_squared_newton(Vz, M, s, Y, rho, rcache[0])
        else:
            Zn = zprox(Vz, M, s, Y, rho, gated)
        Zn = Zn.transpose(1, 2)
        return torch.stack([Zn, Uu + Hh - Zn]), W, HW

    x = torch.stack([Z, Uu])
    stats = [0, 0]
    g, W, HW = F(x)
    res = float((g - x).norm())
    it = 1
    while it < max_iter:
        if aa is not None:
            xa = aa.step(x.reshape(-1), g.reshape(-1)).reshape(shape)
            ga, Wa, HWa = F(xa)
            it += 1
            ra = float((ga - xa).norm())
            if ra <= res * (1 + 1e-3) or not math.isfinite(res):      # accept the extrapolation
                x, g, W, HW, res = xa, ga, Wa, HWa, ra
                stats[0] += 1
            else:                                                     # safeguard: plain ADMM step
                aa.reset()
                stats[1] += 1
                x = g
                g, W, HW = F(x)
                it += 1
                res = float((g - x).norm())
        else:
            x = g
            g, W, HW = F(x)
            it += 1
            res = float((g - x).norm())
        if bar is not None:
            bar.update(1)
        if it % check_every and it < max_iter:
            continue
        Z, Uu = g[0], g[1]
        rp = float((HW - Z).norm())
        rd = rho * float(((Z - x[0]) @ Up).norm())
        viol = 0.0 if gated else float(p.violation(W))
        if certify == "network":                                      # realised ReLU network (any W)
            pv = float(p.objective(W, gated=gated))
        else:
            pv = float(p.objective(W))
        db = max(float(p.dual_bound(W)[0]) if gated else -math.inf, admm_bound(p, Z, rho * Uu, gated))
        gap = (pv - db) / max(1.0, abs(pv))
        hist.append({"iter": it, "objective": pv, "dual": db, "gap": gap, "violation": viol, "rho": rho,
                     "r_primal": rp, "r_dual": rd})
        if bar is not None:
            bar.set_postfix(gap=f"{gap:.1e}", viol=f"{viol:.0e}")
        if gap <= tol and (certify == "network" or viol <= ctol):
            break
        if not math.isfinite(pv):
            raise FloatingPointError(f"admm diverged (objective {pv}) at iteration {it}, rho={rho}")
        if adapt_rho and (rp > balance * rd or rd > balance * rp):    # residual balancing (resets AA)
            fac = 2.0 if rp > balance * rd else 0.5
            rho *= fac
            x = torch.stack([g[0], g[1] / fac])
            g, W, HW = F(x)
            it += 1
            res = float((g - x).norm())
            if aa is not None:
                aa.reset()
    return {"W": W, "objective": pv, "dual": db, "gap": (pv - db) / max(1.0, abs(pv)), "violation": viol,
            "iterations": it, "history": hist, "aa_accepted": stats[0], "aa_rejected": stats[1]}

