"""Active-set second-order polish for the program certificate of (C-BN) (squared loss, ``weights=None``).

Given an ADMM iterate ``W`` (C, 2P, q) and its split variable ``Z`` (C, 2P, N) / scaled dual ``Yd = ρu``, guess
the SUPPORT S (blocks with ``w_j != 0``) and, per block, the ACTIVE cone rows ``E_j`` (rows ADMM holds at
``z_ji = 0`` with a positive multiplier), then solve the reduced problem exactly by damped Newton:

    min_{w_j ∈ null(G_{E_j}), j ∈ S}  ½||Σ_{j∈S} F_j w_j - y||² + β Σ_{j∈S} ||w_j||,
    F_j = σ_j diag(D_j) U' (N, q),  G_j = diag(2D_j - 1) U' (N, q).

``w_j = Q_j (m_j ⊙ v_j)``: ``Q_j`` the eigenvectors of ``G_E^T G_E`` and ``m_j`` the mask of its null directions
(padded to q, so all blocks batch). Rows outside ``E_j`` are checked afterwards: violated ones join E, rows of E
whose multiplier is negative leave it (a primal active-set loop, ``rounds``). The dual point follows from the
polished primal's KKT conditions (convex_bn.md "Solvers"): ``ν = -(pred - y)`` exactly, and on each support block
``G_E^T λ_E = β w_j/||w_j|| + F_j^T(pred - y)`` (min-norm least squares, clamped to λ >= 0); on the zero blocks
ADMM's ``λ = ((2D-1) ⊙ (-Yd - σDν))_+``. Any λ >= 0 gives a valid bound through ``ConvexBNProblem.dual_bound``
(the ``t`` scaling); only its tightness depends on the guess.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import ConvexBNProblem

__all__ = ["polish_active_set"]


def _null_basis(Gm: Tensor, rel: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """For masked row matrices ``Gm`` (B, N, q) (rows outside E zeroed): eigenpairs of ``Gm^T Gm`` (B, q, q).
    Returns (Q (B, q, q), null mask (B, q) float, inverse eigenvalues on the range (B, q))."""
    ev, Q = torch.linalg.eigh(Gm.transpose(1, 2) @ Gm)
    top = ev[:, -1:].clamp_min(1e-300)
    rng = ev > rel * top
    inv = torch.where(rng, 1 / torch.where(rng, ev, torch.ones_like(ev)), torch.zeros_like(ev))
    return Q, (~rng).to(Gm.dtype), inv


def _armijo(f, x: Tensor, d: Tensor, fx: float, dec: float, step: float, min_step: float):
    """Backtracking line search from ``step`` (halving) for the Armijo condition
    ``f(x + t d) <= f(x) - 1e-4 t dec``. Returns ``(t, x + t d, f(x + t d))``, or None below ``min_step``."""
    while step > min_step:
        xn = x + step * d
        fn = f(xn)
        if fn <= fx - 1e-4 * step * dec:
            return step, xn, fn
        step *= 0.5
    return None


def _newton(Bm: Tensor, y: Tensor, v: Tensor, mask: Tensor, beta: float, iters: int = 30) -> Tensor:
    """Damped Newton on ``f(v) = ½||Bm v - y||² + β Σ_j ||v_j||`` with ``Bm`` (N, S·q), v/mask (S, q).
    Masked coordinates stay 0 (identity rows in the Hessian). Armijo backtracking; stops on a relative
    Newton decrement <= 1e-15 or no decrease."""
    S, q = v.shape
    H0 = Bm.T @ Bm
    c0 = Bm.T @ y
    eye = torch.eye(q, dtype=v.dtype, device=v.device)

    def f(v):
        r = Bm @ v.reshape(-1) - y
        return 0.5 * float(r @ r) + beta * float(v.norm(dim=-1).sum())

    fv = f(v)
    for _ in range(iters):
        nv = v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        u = v / nv
        g = (H0 @ v.reshape(-1) - c0).reshape(S, q) + beta * u
        g = g * mask
        Hb = (beta / nv)[..., None] * (eye - u[:, :, None] * u[:, None, :])       # (S, q, q)
        Hb = Hb * (mask[:, :, None] * mask[:, None, :]) + torch.diag_embed(1 - mask)
        H = H0 * (mask.reshape(-1)[:, None] * mask.reshape(-1)[None, :])
        ar = torch.arange(S, device=v.device)
        H.view(S, q, S, q)[ar, :, ar, :] += Hb                                   # block-diagonal part
        H.diagonal().add_(1e-14 * float(H.diagonal().abs().max()))
        try:
            L = torch.linalg.cholesky(H)
            d = -torch.cholesky_solve(g.reshape(-1, 1), L).reshape(S, q)
        except RuntimeError:
            d = -torch.linalg.lstsq(H, g.reshape(-1, 1)).solution.reshape(S, q)
        dec = -float((g * d).sum())
        if dec <= 1e-15 * max(1.0, abs(fv)):
            break
        found = _armijo(f, v, d, fv, dec, 1.0, 1e-8)
        if found is None:
            break
        _, v, fv = found
    return v


def polish_active_set(p: ConvexBNProblem, W: Tensor, Z: Tensor, Yd: Tensor, iters: int = 300, outer: int = 3,
                      lam_rel: float = 1e-3, max_vars: int = 4000, cache: dict | None = None,
                      keep_ratio: float = 0.95, screen_iters: int = 200
                      ) -> tuple[Tensor, Tensor] | None:
    """Polished point ``W_pol`` (C, 2P, q) (rows of E hold with equality to rounding; the caller repairs and
    checks feasibility) and multipliers ``lam`` (C, 2P, N) >= 0 for ``p.dual_bound(W_pol, lam)``.

    ``W``, ``Z``, ``Yd``: ADMM's iterate, split variable ``U'w_j`` (C, 2P, N) and scaled dual ``ρu``. The
    support is ADMM's nonzero blocks whose dual ratio (``_block_ratios`` after ``screen_iters`` FISTA steps on
    their λ) is >= ``keep_ratio`` (a zero block of the optimum has ratio <= 1, a nonzero one exactly 1; ADMM
    keeps many small spurious blocks). The initial active rows of a support block are the (at most q-1) rows
    with ``z_ji = 0`` and the largest ADMM multipliers ``λ_ji > lam_rel · max_i λ_ji``.
    Returns None when the polish does not apply (loss not squared, E2 weights, pooled)
    or the reduced problem has more than ``max_vars`` variables, and, with a ``cache`` dict, when the guessed
    support and active rows equal those of the previous call (the polish would return the same point)."""
    if p.loss != "squared" or p.weights is not None or p.pool is not None:
        return None
    Up, beta = p.Up, p.beta
    A = p.A.T                                                           # (2P, N) ±1
    F = p.sigma[:, None, None] * (p.Dsgn.T[:, :, None] * Up[None])      # (2P, N, q)
    Ds = p.Dsgn.T[None]
    q = W.shape[-1]
    nu_z = -p.loss_grad(torch.einsum("cjn,j->cn", Z * Ds, p.sigma))     # ADMM's ν (from the feasible z)
    lam_admm = (A[None] * (-Yd - p.sigma[None, :, None] * nu_z[:, None, :] * Ds)).clamp_min(0)
    W_out = torch.zeros_like(W)
    nrm = W.norm(dim=-1)
    guesses = []
    S0 = [(nrm[c] > 0).nonzero().flatten() for c in range(W.shape[0])]
    _refine_blocks(p, lam_admm, nu_z, S0, screen_iters)                # screening: ADMM's support blocks whose
    R = _block_ratios(p, lam_admm, nu_z)                               # dual ratio stays < keep_ratio are 0
    for c in range(W.shape[0]):
        S = S0[c][R[c, S0[c]] >= keep_ratio]
        if S.numel() * W.shape[-1] > max_vars:
            return None
        la = torch.where(Z[c, S] == 0, lam_admm[c, S], torch.zeros_like(lam_admm[c, S]))
        E = la > lam_rel * la.amax(-1, keepdim=True).clamp_min(1e-300)
        top = la.topk(min(q - 1, la.shape[-1]), dim=-1).indices             # at most q-1 rows: keep a null space
        guesses.append((S, E & torch.zeros_like(E).scatter_(-1, top, True)))
    if cache is not None:
        key = [(S.tolist(), E.nonzero().tolist()) for S, E in guesses]
        if cache.get("key") == key:
            return None
        cache["key"] = key
    from .admm import repair_cone

    Wf, _ = repair_cone(p, W)                                           # feasible start (E: its equality rows)
    start = [S[Wf[c, S].norm(dim=-1) > 0] for c, (S, _E) in enumerate(guesses)]
    keep = [S[:0] for S in start]
    for _ in range(outer):
        for c, S in enumerate(start):
            if S.numel() == 0:
                continue
            w0 = torch.where((W_out[c, S].norm(dim=-1) > 0)[:, None], W_out[c, S], Wf[c, S])
            W_out[c] = 0
            W_out[c, S] = _active_set_newton(A[S][:, :, None] * Up[None], F[S], p.Y[c], w0, beta, iters,
                                             torch.isin(S, keep[c]))
        nrm = W_out.norm(dim=-1)                                        # blocks the polish kept nonzero
        supports = [(nrm[c] > 0).nonzero().flatten() for c in range(W.shape[0])]
        lam = _multipliers(p, W_out, Yd, supports, F)
        # a block of ADMM's support that the polish dropped but whose dual ratio stays > 1 is re-added
        R = _block_ratios(p, lam, p.Y - p.predict(W_out))
        back = [S0[c][(R[c, S0[c]] > 1 + 1e-12) & (nrm[c, S0[c]] == 0)] for c in range(W.shape[0])]
        if all(b.numel() == 0 for b in back):
            break
        for c, b in enumerate(back):                                    # start: the block's cone projection of
            if b.numel():                                               # -∇ (the FISTA residual), small
                res = ((p.sigma[b, None] * p.Dsgn.T[b] * (p.Y[c] - p.predict(W_out)[c])[None])
                       + p.A.T[b] * lam[c, b]) @ Up
                Wf[c, b] = 1e-3 * res * float(nrm[c].max()) / res.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        Wf, _ = repair_cone(p, Wf)
        back = [b[Wf[c, b].norm(dim=-1) > 0] for c, b in enumerate(back)]
        start = [torch.cat([supports[c], back[c]]) for c in range(W.shape[0])]
        keep = [torch.cat([keep[c], back[c]]) for c in range(W.shape[0])]
    return W_out, lam


def _active_set_newton(G: Tensor, Fs: Tensor, y: Tensor, w: Tensor, beta: float, iters: int,
                       keep: Tensor | None = None) -> Tensor:
    """Feasible primal active-set damped Newton for one output on the support blocks: G, Fs (B, N, q), y (N,),
    a cone-feasible start w (B, q). Minimises ``½||Σ_j Fs_j w_j - y||² + β Σ||w_j||`` s.t. ``G_j w_j >= 0``.
    Each step is Newton on the subspace ``null(G_E)`` of the equality rows E, cut by a ratio test at the first
    inactive row it would violate (that row joins E); at a subspace optimum the most negative multiplier per
    block leaves E, and blocks with ``||Fs_j^T r_{-j}||_{null} < β`` (optimum 0) are dropped. Returns w."""
    B, N, q = G.shape
    Ff = Fs.permute(1, 0, 2).reshape(N, B * q)
    K4 = (Ff.T @ Ff).view(B, q, B, q)
    cy = (Ff.T @ y).view(B, q)
    eye = torch.eye(q, dtype=w.dtype, device=w.device)
    ar = torch.arange(B, device=w.device)

    def fval(w):
        r = Ff @ w.reshape(-1) - y
        return 0.5 * float(r @ r) + beta * float(w.norm(dim=-1).sum())

    gcur = (G @ w[:, :, None])[..., 0]
    E = gcur <= 1e-9 * gcur.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    alive = (w.norm(dim=-1) > 0).to(w.dtype)[:, None]
    fv = fval(w)
    Q = eye.expand(B, q, q).clone()
    m0 = torch.ones_like(w)
    changed = torch.ones(B, dtype=torch.bool, device=w.device)
    for _ in range(iters):
        if bool(changed.any()):                                         # bases only of blocks whose E changed
            Q[changed], m0[changed], _ = _null_basis(G[changed] * E[changed][:, :, None].to(G.dtype))
            changed[:] = False
        m = m0 * alive
        nw = w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        u = w / nw
        gw = torch.einsum("aibj,bj->ai", K4, w) - cy + beta * u * alive
        gv = (Q.transpose(1, 2) @ gw[:, :, None])[..., 0] * m
        H = torch.einsum("aiq,aibj,bjr->aqbr", Q, K4, Q)
        Hb = (beta / nw)[..., None] * (eye - u[:, :, None] * u[:, None, :])
        H[ar, :, ar, :] += Q.transpose(1, 2) @ Hb @ Q
        mf = m.reshape(-1)
        H = H.reshape(B * q, B * q) * (mf[:, None] * mf[None, :]) + torch.diag(1 - mf)
        H.diagonal().add_(1e-14 * float(H.diagonal().abs().max()))
        try:
            dv = -torch.cholesky_solve(gv.reshape(-1, 1), torch.linalg.cholesky(H)).reshape(B, q) * m
        except RuntimeError:
            dv = -torch.linalg.lstsq(H, gv.reshape(-1, 1)).solution.reshape(B, q) * m
        dec = -float((gv * dv).sum())
        if dec <= 1e-15 * max(1.0, abs(fv)):                           # optimal on the current subspace
            r = Ff @ w.reshape(-1) - y
            lamE = _block_multipliers(G, E, w, Fs, r, beta)
            lmin = torch.where(E, lamE, torch.full_like(lamE, float("inf"))).amin(-1, keepdim=True)
            rem = E & (lamE == lmin) & (lmin < -1e-9 * lamE.abs().amax(-1, keepdim=True)) & (alive > 0)
            if bool(rem.any()):
                E = E & ~rem
                changed |= rem.any(-1)
                continue
            Fq = Fs @ (Q * m[:, None, :])                               # (B, N, q) on the null spaces
            rmj = r[None, :] - (Fs @ w[:, :, None])[..., 0]             # residual without block j
            tj = (Fq.transpose(1, 2) @ rmj[:, :, None])[..., 0].norm(dim=-1) / beta
            drop = (tj < 1) & (alive[:, 0] > 0)
            if keep is not None:
                drop &= ~keep
            if bool(drop.any()):
                alive[drop] = 0
                w = w * alive
                fv = fval(w)
                continue
            break
        dw = (Q @ dv[:, :, None])[..., 0]
        Gd = (G @ dw[:, :, None])[..., 0]
        gcur = (G @ w[:, :, None])[..., 0]
        cand = ~E & (Gd < 0) & (alive > 0)
        alpha = torch.where(cand, (-gcur / torch.where(cand, Gd, -torch.ones_like(Gd))).clamp_min(0),
                            torch.full_like(Gd, float("inf")))
        amax = float(alpha.min())
        step = min(1.0, amax)
        full = step
        step, w, fv = _armijo(fval, w, dw, fv, dec, step, 1e-12) or (0.0, w, fv)
        if step == full and amax <= 1.0:                                # blocked: the row(s) join E
            newrows = alpha <= amax * (1 + 1e-9) + 1e-300
            changed |= (newrows & ~E).any(-1)
            E = E | newrows
        tiny = (w.norm(dim=-1) < 1e-10 * float(w.norm(dim=-1).max())) & (alive[:, 0] > 0)
        if bool(tiny.any()):                                            # collapsed blocks are zero blocks
            alive[tiny] = 0
            w = w * alive
            fv = fval(w)
    return w


def _block_multipliers(G: Tensor, E: Tensor, w: Tensor, Fs: Tensor, r: Tensor, beta: float) -> Tensor:
    """Min-norm λ (B, N), supported on the rows E, of the stationarity ``G_E^T λ_E = β w/||w|| + F^T r`` of
    the support blocks: G, Fs (B, N, q), E (B, N) bool, w (B, q), r (N,) = pred - y. Not clamped."""
    b = beta * w / w.norm(dim=-1, keepdim=True).clamp_min(1e-300) + (Fs.transpose(1, 2) @ r[:, None])[..., 0]
    Gm = G * E[:, :, None].to(G.dtype)
    Q, _, inv = _null_basis(Gm)
    x = Q @ ((Q.transpose(1, 2) @ b[:, :, None]) * inv[:, :, None])       # (Gm^T Gm)^+ b
    return (Gm @ x)[..., 0]


def _multipliers(p: ConvexBNProblem, Wp: Tensor, Yd: Tensor, supports: list[Tensor], F: Tensor,
                 fista_iters: int = 200, refine_support: bool = True, refine_stop: float | None = 1.0) -> Tensor:
    """λ (C, 2P, N) >= 0: on support blocks the min-norm solution of ``G_E^T λ = β w/||w|| + F^T r`` over the
    rows E where the polished block is active (|g| <= 1e-9 max|g|), clamped at 0; elsewhere ADMM's
    ``λ = ((2D-1) ⊙ (-Yd - σDν))_+`` with the polished ν."""
    Up, beta = p.Up, p.beta
    A = p.A.T
    Ds = p.Dsgn.T[None]
    pred = p.predict(Wp)
    r = pred - p.Y                                                      # = -ν (C, N)
    lam = (A[None] * (-Yd + p.sigma[None, :, None] * r[:, None, :] * Ds)).clamp_min(0)
    for c, S in enumerate(supports):
        if S.numel() == 0:
            continue
        w = Wp[c, S]
        G = A[S][:, :, None] * Up[None]
        g = (G @ w[:, :, None])[..., 0]
        E = g.abs() <= 1e-9 * g.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        lam[c, S] = _block_multipliers(G, E, w, F[S], r[c], beta).clamp_min(0)
    R = _block_ratios(p, lam, -r)
    blocks = []
    for c, S in enumerate(supports):
        zero = torch.ones(R.shape[1], dtype=torch.bool, device=R.device)
        zero[S] = False
        # zero blocks near 1, and support blocks above 1 (a wrong active set E gives a least-squares λ_E whose
        # ratio exceeds 1: the FISTA on all rows of the block brings it back to its minimum over λ >= 0)
        blocks.append(((zero & (R[c] > 0.9)) | (~zero & (R[c] > 1 + 1e-12) & refine_support)).nonzero().flatten())
    _refine_blocks(p, lam, -r, blocks, fista_iters, stop_at=refine_stop)
    R = _block_ratios(p, lam, -r)                                       # the few still above 1: more steps
    _refine_blocks(p, lam, -r, [b[R[c, b] > 1] for c, b in enumerate(blocks)], 10 * fista_iters,
                   stop_at=refine_stop)
    return lam


def _block_ratios(p: ConvexBNProblem, lam: Tensor, nu: Tensor) -> Tensor:
    """(C, 2P) dual ratios ``||U'^T(σ_j D_j ν_c + A_j λ_cj)|| / β`` (<= 1 on all blocks: dual feasible)."""
    cvec = (p.sigma[None, :, None] * p.Dsgn.T[None] * nu[:, None, :]) @ p.Up
    return (cvec + (p.A.T[None] * lam) @ p.Up).norm(dim=-1) / p.beta


def _refine_blocks(p: ConvexBNProblem, lam: Tensor, nu: Tensor, blocks: list[Tensor], iters: int,
                   stop_at: float | None = None, check_every: int = 20) -> None:
    """In place, for the listed blocks per output: FISTA on ``min_{λ >= 0} ½||U'^T(σ_j D_j ν + A_j λ_j)||²``
    (step 1: ``||diag(A_j)U'||₂ = 1``), warm-started at the given λ. Any λ >= 0 stays valid for the bound;
    this only tightens it (drives the block's dual ratio to its minimum over λ). ``stop_at``: stop as soon as
    every listed block's dual ratio at the current λ is <= ``stop_at`` (checked every ``check_every`` steps;
    with 1.0 nothing is lost for the bound: ``dual_bound``'s scaling t is capped at 1 anyway)."""
    Up, A = p.Up, p.A.T
    for c, idx in enumerate(blocks):
        if idx.numel() == 0 or iters <= 0:
            continue
        cj = (p.sigma[idx, None] * p.Dsgn.T[idx] * nu[c][None]) @ Up                # (B, q) = U'^T σDν
        Aj = A[idx]
        x = lam[c, idx].clone()
        yk, t = x.clone(), 1.0
        for k in range(iters):
            if stop_at is not None and k % check_every == 0:
                if float((cj + (Aj * x) @ Up).norm(dim=-1).max()) <= stop_at * p.beta:
                    break
            res = cj + (Aj * yk) @ Up                                            # (B, q)
            xn = (yk - Aj * (res @ Up.T)).clamp_min(0)
            tn = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
            yk = xn + ((t - 1) / tn) * (xn - x)
            x, t = xn, tn
        lam[c, idx] = x
