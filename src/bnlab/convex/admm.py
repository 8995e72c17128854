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

from .polish import polish_active_set
from .problem import ConvexBNProblem

__all__ = ["admm", "admm_network", "admm_bound_nj", "repair_cone", "polish_scale", "zprox_squared",
           "zprox_squared_nj", "zprox_logistic"]


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


def zprox_squared_nj(V: Tensor, Mf: Tensor, s: Tensor, Y: Tensor, rho: float, r0: Tensor | None = None,
                     max_newton: int = 20, Mneg: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The cone-constrained squared-loss prox of :func:`zprox_squared` in the ``(C, N, J)`` layout with float
    masks (no ``torch.where`` on (C, N, J) tensors: it is ~10x slower than arithmetic on this CPU build), for
    the network-certificate fast path. ``Mf`` (N, J) = D as 0/1 floats. Bracketed semismooth Newton on the
    scalar ``r`` per sample (as :func:`zprox_squared_newton`), stopping at ``|h(r)| <= 64 eps (1 + |y| + |r| +
    Σ|d|/ρ)`` (eps of the dtype); if some sample has not settled after ``max_newton`` steps its last bracketed
    ``r`` is kept (an inexact prox step: the ADMM iterate moves on, and the certificate, evaluated from the
    iterate, does not depend on the prox being exact). ``Mneg`` = 1 - Mf (optional, precomputed). Returns
    (Z, r)."""
    B = V * rho
    y = Y[..., None]
    S2 = torch.stack([s, torch.ones_like(s)], 1)                      # (J, 2): Σ s_j d_j and Σ d_j in one pass
    ones = S2[:, 1]
    eps = 64 * torch.finfo(V.dtype).eps

    def active(r):                                                    # d_j = M (ρ v_j - s_j r)_+ = ρ z_j on M
        return torch.addcmul(B, r, s, value=-1.0).clamp_min_(0).mul_(Mf)

    r = (B.clamp_min(0).mul_(Mf) @ s)[..., None] / rho - y if r0 is None else r0
    lo = torch.full_like(r, -math.inf)
    hi = torch.full_like(r, math.inf)
    d = active(r)
    for _ in range(max_newton):
        sums = (d @ S2) / rho                                         # (C, N, 2)
        h = r + y - sums[..., :1]
        done = h.abs() <= eps * (1 + y.abs() + r.abs() + sums[..., 1:])
        if bool(done.all()):
            break
        slope = 1 + (torch.sign(d) @ ones)[..., None] / rho
        lo = torch.where(h < 0, r, lo)
        hi = torch.where(h > 0, r, hi)
        rn = r - h / slope                                            # exact root of the current piece
        bad = ~((rn > lo) & (rn < hi)) & torch.isfinite(lo) & torch.isfinite(hi)
        rn = torch.where(bad, 0.5 * (lo + hi), rn)
        r = torch.where(done, r, rn)
        d = active(r)
    return d.div_(rho).add_(V.clamp_max(0).mul_(1 - Mf if Mneg is None else Mneg)), r


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
    return _scaled_dual_value(p, nu, R)


def _scaled_dual_value(p: ConvexBNProblem, nu: Tensor, R: Tensor) -> float:
    """Dual objective at ``(t nu, t lambda)``: ``R`` (..., q) holds the blocks' ``U'^T(sigma_j D_j nu +
    (2D_j-1) lambda_j)``; ``t <= 1`` scales them into ``||.|| <= beta`` (the squared loss also takes the best
    ``t`` along the ray). Shared by the dual bounds of both ADMM layouts."""
    if p.weights is not None:
        R = R / p.weights
    worst = float(R.norm(dim=-1).max()) / p.beta
    t_max = min(1.0, 1.0 / max(worst, 1e-300))
    if p.loss == "squared":
        t = min(max(float((nu * p.Y).sum()) / max(float((nu ** 2).sum()), 1e-300), 0.0), t_max)
    else:
        t = t_max
    return float(p.neg_conj(t * nu))


def repair_cone(p: ConvexBNProblem, W: Tensor, rounds: int = 10, rank_tol: float = 1e-12) -> tuple[Tensor, dict]:
    """Exactly cone-feasible point near ``W`` (C, 2P, q): the "repair" of the program certificate.

    Block j is feasible iff ``G_j w >= 0`` with ``G_j = diag(2D_j - 1) U'`` (N, q). For every block with a
    violated row, let S be its violated rows (S grows over ``rounds`` by rows that become violated; a
    wider "nearly active" set was tried and moved the objective far more), and replace ``w`` by its orthogonal
    projection onto the subspace ``{v : g_i·v = 0, i ∈ S}``: ``w ← (I - Π_S) w``, ``Π_S`` the projector onto
    ``range(U'^T diag(1_S) U')`` (``(2D-1)² = 1``), from a batched (B, q, q) eigendecomposition over the
    violating blocks only. Rows in S then hold with equality (to rounding), rows outside S are feasible; a
    block still violated after ``rounds`` (by more than 1e-13 of ``max |U'W|`` or 1e-12 of its own
    ``max |U'w_j|``, e.g. a block that collapsed to rounding noise) is set to 0, which is always feasible.
    The projection never increases ``||w||``; with violations of order ε the move is O(ε).

    Returns ``(W_feasible, info)``, info: blocks repaired, rounds used, blocks zeroed."""
    C, J, q = W.shape
    Up = p.Up
    Af = p.A.T.repeat(C, 1)                                            # (C·2P, N) ±1
    Wf = W.reshape(C * J, q).clone()
    G = Af * (Wf @ Up.T)                                               # (B, N), feasible iff >= 0
    scale = float(G.abs().max()) if G.numel() else 0.0
    eps = (-G).amax(-1, keepdim=True)                                  # largest violation per block
    bad = (eps[:, 0] > 0).nonzero().flatten()
    info = {"blocks": int(bad.numel()), "rounds": 0, "zeroed": 0}
    if bad.numel() == 0 or scale == 0.0:
        return W.clone(), info
    w0, Ab = Wf[bad], Af[bad]
    Sb = G[bad] < 0                                                    # violated rows
    w = w0.clone()
    todo = torch.arange(bad.numel(), device=W.device)                  # blocks whose S changed
    UU = (Up[:, :, None] * Up[:, None, :]).reshape(Up.shape[0], q * q)  # (N, q²): rows u_i u_i^T
    for rnd in range(rounds):
        info["rounds"] = rnd + 1
        Ms = (Sb[todo].to(Up.dtype) @ UU).view(-1, q, q)              # (b, q, q) = U'^T diag(1_S) U', one GEMM
        ev, V = torch.linalg.eigh(Ms)
        Vk = V * (ev > rank_tol * ev[:, -1:].clamp_min(1e-300)).to(Up.dtype)[:, None, :]
        w[todo] = w0[todo] - (Vk @ (Vk.transpose(1, 2) @ w0[todo, :, None]))[..., 0]
        new = (Ab[todo] * (w[todo] @ Up.T) < 0) & ~Sb[todo]
        grow = new.any(-1)
        if not bool(grow.any()):
            break
        Sb[todo] |= new
        todo = todo[grow]
    Hb = Ab * (w @ Up.T)
    worst = (-Hb).clamp_min(0).amax(-1)                               # rounding only, unless not converged
    own = Hb.abs().amax(-1)                                            # the block's own scale: a block that
    drop = (worst > 1e-13 * scale) | (worst > 1e-12 * own)            # collapsed to rounding noise is dropped
    info["zeroed"] = int(drop.sum())
    w = torch.where(drop[:, None], torch.zeros_like(w), w)
    Wf[bad] = w
    return Wf.reshape(C, J, q), info


def admm_bound_nj(p: ConvexBNProblem, Z: Tensor, Yd: Tensor, gated: bool = False) -> float:
    """:func:`admm_bound` for the ``(C, N, J)`` layout (Z, Yd = ρu of the fast path), evaluated in ``p``'s
    dtype (float64: the inputs are cast first, so a float32 iterate still gets an exact float64 bound for the
    dual point it defines)."""
    Z, Yd = Z.to(p.Up.dtype), Yd.to(p.Up.dtype)
    Mf = p.Dsgn                                                       # (N, 2P)
    nu = -p.loss_grad((Z * Mf) @ p.sigma)                             # (C, N)
    M = nu[..., None] * (Mf * p.sigma)                                # (C, N, 2P) = σ_j D_j ν
    if not gated:
        A = p.A
        M = M + A * (A * (-Yd - M)).clamp_min_(0)
    R = M.transpose(1, 2) @ p.Up                                      # (C, 2P, q)
    return _scaled_dual_value(p, nu, R)


def admm_network(p: ConvexBNProblem, tol: float = 1e-6, max_iter: int = 20000, rho: float | None = None,
                 alpha: float = 1.6, gated: bool = False, check_every: int = 10, W0: Tensor | None = None,
                 adapt_rho: bool = True, balance: float = 10.0, iter_dtype: torch.dtype | None = None,
                 stall_checks: int = 10, bar=None) -> dict:
    """ADMM with the network certificate (``certify="network"``), fast path: the same iteration as
    :func:`admm` (no Anderson) with Z, u stored as (C, N, 2P) (no transposes), arithmetic masks, the z-prox of
    :func:`zprox_squared_nj` (squared loss with cones; logistic / gated: :func:`zprox_logistic` /
    :func:`zprox_squared`), and the bulk iterations in ``iter_dtype`` (None: float32 when ``p`` is float64 and
    tol >= 1e-6, else ``p``'s dtype). Every check is evaluated in ``p``'s dtype (float64): the primal value is
    the realised network's ``objective(W, gated=False)`` of the float64 copy of W that is returned, the dual
    bound :func:`admm_bound_nj` of the dual point the iterate defines (valid for any iterate), so the
    certificate is as exact as in float64 iterations. If the certified gap has not improved for
    ``stall_checks`` checks while still > tol, the iteration continues in ``p``'s dtype (float32 rounding
    floor). Returns the dict of :func:`admm` (Z, Yd in the (C, 2P, N) layout, ``p``'s dtype)."""
    dt64 = p.Up.dtype
    if iter_dtype is None:
        iter_dtype = torch.float32 if (dt64 == torch.float64 and tol >= 1e-6) else dt64
    beta = p.beta
    Y64 = p.Y
    cone_sq = p.loss == "squared" and not gated

    def consts(dt):
        Mf = p.Dsgn.to(dt)
        return (p.Up.to(dt), Y64.to(dt), None if p.weights is None else p.weights.to(dt), Mf, 1 - Mf, Mf.bool(),
                p.sigma.to(dt))

    dt = iter_dtype
    Up, Y, lam_w, Mf, Mneg, Mb, s = consts(dt)
    W = p.zeros().to(dt) if W0 is None else W0.to(dt)
    HW = torch.matmul(Up, W.transpose(1, 2))                          # (C, N, 2P)
    Z = HW.clone() if gated else HW.clamp_min(0) * Mf + HW.clamp_max(0) * Mneg
    U = torch.zeros_like(Z)
    if rho is None:                                                   # as admm()
        rho = max(1e-3, min(1e3, beta / max(1e-12, float(Y64.abs().max()) / math.sqrt(p.Up.shape[0]))))
    hist: list[dict] = []
    r = None
    pv = db = gap = viol = math.inf
    best_gap, since_best = math.inf, 0
    W64 = W.to(dt64)
    it = 0
    while it < max_iter:
        Zp = Z
        W = prox_weighted_norm((Z - U).transpose(1, 2) @ Up, lam_w, beta / rho)   # (C, 2P, q)
        HW = torch.matmul(Up, W.transpose(1, 2))                      # (C, N, 2P)
        V = torch.lerp(Z, HW, alpha).add_(U)                          # over-relaxed U'w + u
        if cone_sq:
            Z, r = zprox_squared_nj(V, Mf, s, Y, rho, r, Mneg=Mneg)
        elif p.loss == "squared":
            Z = zprox_squared(V, Mb, s, Y, rho, gated=True)
        else:
            Z = zprox_logistic(V, Mb, s, Y, rho, gated)
        U = V.sub_(Z)                                                 # u + Hh - z
        it += 1
        if bar is not None:
            bar.update(1)
        if it % check_every and it < max_iter:
            continue
        rp = float((HW - Z).norm())
        rd = rho * float(((Z - Zp).transpose(1, 2) @ Up).norm())
        W64 = W.to(dt64)
        pv = float(p.objective(W64, gated=gated))                     # gated=False: the realised network
        db = admm_bound_nj(p, Z, rho * U, gated)
        if gated:
            db = max(db, float(p.dual_bound(W64)[0]))
        gap = (pv - db) / max(1.0, abs(pv))
        hist.append({"iter": it, "objective": pv, "dual": db, "gap": gap, "rho": rho, "r_primal": rp,
                     "r_dual": rd, "dtype": str(dt).replace("torch.", "")})
        if bar is not None:
            bar.set_postfix(gap=f"{gap:.1e}")
        if gap <= tol:
            break
        if not math.isfinite(pv):
            raise FloatingPointError(f"admm diverged (objective {pv}) at iteration {it}, rho={rho}")
        if gap < best_gap * (1 - 1e-3) - 1e-12:
            best_gap, since_best = gap, 0
        else:
            since_best += 1
        if dt != dt64 and since_best >= stall_checks:                 # float32 floor: continue in float64
            dt = dt64
            Up, Y, lam_w, Mf, Mneg, Mb, s = consts(dt)
            Z, U, r = Z.to(dt), U.to(dt), None if r is None else r.to(dt)
            since_best = 0
        if adapt_rho and (rp > balance * rd or rd > balance * rp):    # residual balancing
            fac = 2.0 if rp > balance * rd else 0.5
            rho *= fac
            U = U / fac
    viol = 0.0 if gated else float(p.violation(W64))
    Zt, Yd = Z.to(dt64).transpose(1, 2).contiguous(), (rho * U).to(dt64).transpose(1, 2).contiguous()
    return {"W": W64, "objective": pv, "dual": db, "gap": (pv - db) / max(1.0, abs(pv)), "violation": viol,
            "iterations": it, "history": hist, "aa_accepted": 0, "aa_rejected": 0, "repaired": False,
            "Z": Zt, "Yd": Yd}


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
         certify: str = "program", repair: bool = True, repair_every: int = 1, repair_frac: float = 0.05,
         polish: bool = True, newton_polish: bool = True, newton_start: int = 50, newton_gap: float = 1e-2,
         fast: bool = True, iter_dtype: torch.dtype | None = None, bar=None) -> dict:
    """Run ADMM on an unweighted, unpooled problem ``p`` (tensors on the target device/dtype).

    ``certify="program"`` with ``repair=True`` (default): at every ``repair_every``-th check that is at least
    ``repair_frac·iterations`` after the previous repair (bounded overhead, certification delayed by at most
    that fraction), the iterate is
    made exactly cone-feasible by :func:`repair_cone` (then, ``polish=True``, rescaled by
    :func:`polish_scale`, which keeps feasibility); the best repaired primal value and the best dual bound
    so far give the gap; stop when it is <= tol (the returned W is the best repaired point, violation <=
    1e-13 relative). ``repair=False``: the old rule (gap of the raw iterate <= tol and its violation <=
    constraint_tol; W is the raw iterate). ``newton_polish=True`` (squared loss, no E2 weights): at the same
    repair checks from iteration ``newton_start`` on, once the certified gap is <= ``newton_gap`` (the guess is
    poor before), :func:`bnlab.convex.polish.polish_active_set` solves the
    problem reduced to ADMM's support and active cone rows by damped Newton and builds a KKT dual point from it;
    its repaired primal and its dual bound (valid for any λ >= 0) compete with ADMM's.
    ``certify="network"``: see solvers.admm_solve; with ``fast=True`` (default) and no Anderson acceleration it
    runs :func:`admm_network` (float32 bulk iterations, ``iter_dtype``; float64 certificate).

    Returns a dict with W (C, 2P, q), objective, dual bound, gap, violation, iterations, history, and the
    final ADMM state Z (C, 2P, N) and Yd = ρu (C, 2P, N) (inputs of polish.polish_active_set)."""
    if p.pool is not None:
        raise ValueError(f"solver='admm' does not support pooled problems (pool={p.pool}); use solver='al'")
    if certify not in ("program", "network"):
        raise ValueError(f"certify must be 'program' or 'network', got {certify!r}")
    if not (isinstance(repair_every, int) and repair_every >= 1):
        raise ValueError(f"repair_every must be an int >= 1 (checks between repairs), got {repair_every!r}")
    use_repair = repair and certify == "program" and not gated
    if p.loss not in ("squared", "logistic"):
        raise ValueError(f"solver='admm' needs loss 'squared' or 'logistic', got loss={p.loss!r}; "
                         "use solver='cvxpy'")
    if certify == "network" and fast and not anderson:               # network certificate: fast path
        return admm_network(p, tol=tol, max_iter=max_iter, rho=rho, alpha=alpha, gated=gated,
                            check_every=check_every, W0=W0, adapt_rho=adapt_rho, balance=balance,
                            iter_dtype=iter_dtype, bar=bar)
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
    best_db = -math.inf                                               # best valid lower bound so far
    best_pv, best_W, best_viol = math.inf, None, math.inf             # best repaired (feasible) point
    n_checks = 0
    last_repair = 0
    viol = math.inf
    shape = (2,) + tuple(Z.shape)
    S = 2 * Z.numel()
    if anderson is None:                                              # memory budget ~ 2 m S doubles <= 4e8 B
        anderson = int(max(0, min(10, 2.5e7 // S)))
    aa = _Anderson(anderson, S, Z) if anderson > 0 else None

    rcache: list = [None]
    newton_cache: dict = {}                                           # last support/active-set guess

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
        rec = {"iter": it, "objective": pv, "dual": db, "gap": gap, "violation": viol, "rho": rho,
               "r_primal": rp, "r_dual": rd}
        n_checks += 1
        if use_repair:
            best_db = max(best_db, db)
            if (n_checks % repair_every == 0 and it - last_repair >= repair_frac * it) or it >= max_iter:
                last_repair = it
                Wr, info = repair_cone(p, W)
                vr = float(p.violation(Wr))
                if polish:
                    Wq = polish_scale(p, Wr)
                    vq = float(p.violation(Wq))
                    if vq <= max(vr, 1e-13):                              # keep the polish only if still feasible
                        Wr, vr = Wq, vq
                pr = float(p.objective(Wr))
                if pr < best_pv and vr <= 1e-12:                              # only feasible points are candidates
                    best_pv, best_W, best_viol = pr, Wr, vr
                cur_gap = (best_pv - best_db) / max(1.0, abs(best_pv))
                if newton_polish and it >= newton_start and cur_gap <= newton_gap:   # active-set Newton (polish.py)
                    out = polish_active_set(p, W, g[0], rho * g[1], cache=newton_cache)
                    if out is not None:
                        Wn, lam_n = out
                        dn = float(p.dual_bound(Wn, lam_n)[0])                # valid for any λ >= 0
                        if math.isfinite(dn):
                            best_db = max(best_db, dn)
                        Wn, _ = repair_cone(p, Wn)                            # rounding-level fix / guard
                        vn = float(p.violation(Wn))
                        pn = float(p.objective(Wn))
                        if pn < best_pv and vn <= 1e-12:
                            best_pv, best_W, best_viol = pn, Wn, vn
                        rec.update(newton_primal=pn, newton_dual=dn)
                rec.update(repaired=pr, repaired_blocks=info["blocks"], zeroed=info["zeroed"])
            gap = (best_pv - best_db) / max(1.0, abs(best_pv))
            rec.update(best_primal=best_pv, best_dual=best_db, certified_gap=gap)
        hist.append(rec)
        if bar is not None:
            bar.set_postfix(gap=f"{gap:.1e}", viol=f"{viol:.0e}")
        if use_repair:
            if gap <= tol:                                                # best_W is feasible (<= 1e-12)
                break
        elif gap <= tol and (certify == "network" or viol <= ctol):
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
    if use_repair:
        if best_W is None:                                            # no feasible candidate yet: W = 0
            best_W = torch.zeros_like(W)
            best_pv, best_viol = float(p.objective(best_W)), 0.0
        return {"W": best_W, "objective": best_pv, "dual": best_db, "gap": (best_pv - best_db) / max(1.0, abs(best_pv)),
                "violation": best_viol, "iterations": it, "history": hist, "aa_accepted": stats[0],
                "aa_rejected": stats[1], "repaired": True, "Z": g[0], "Yd": rho * g[1]}
    return {"W": W, "objective": pv, "dual": db, "gap": (pv - db) / max(1.0, abs(pv)), "violation": viol,
            "iterations": it, "history": hist, "aa_accepted": stats[0], "aa_rejected": stats[1], "repaired": False,
            "Z": g[0], "Yd": rho * g[1]}



def polish_scale(p: ConvexBNProblem, W: Tensor, iters: int = 100) -> Tensor:
    """Best nonnegative rescaling of the blocks of a cone-feasible ``W`` (C, 2P, q) (feasibility is kept):
    ``min_{c >= 0} ℓ(Σ_j c_j σ_j D_j ⊙ U'w_j) + β Σ_j c_j ||Λw_j||`` per output (squared loss: FISTA on the
    (B, B) Gram matrix of the nonzero blocks, starting at c = 1). Returns ``c ⊙ W``."""
    if p.loss != "squared":
        return W
    out = W.clone()
    nrm = p.norms(W)                                                  # (C, 2P)
    for c in range(W.shape[0]):
        nz = (nrm[c] > 0).nonzero().flatten()
        if nz.numel() == 0:
            continue
        F = (W[c, nz] @ p.Up.T) * p.Dsgn.T[nz] * p.sigma[nz, None]     # (B, N)
        G = F @ F.T
        b = F @ p.Y[c] - p.beta * nrm[c, nz]
        L = float(torch.linalg.eigvalsh(G)[-1]) * 1.01 + 1e-300
        x = torch.ones_like(b)
        yk, t = x.clone(), 1.0
        for _ in range(iters):
            xn = (yk - (G @ yk - b) / L).clamp_min(0)
            tn = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
            yk = xn + ((t - 1) / tn) * (xn - x)
            x, t = xn, tn
        out[c, nz] = W[c, nz] * x[:, None]
    return out
