"""EXPERIMENTAL: convex program of a two-layer CNN with channel-wise BN (convex_bn.md §4.1).

Model (paper BN convention, §1.1, with the batch = all ``N = n·K`` conv outputs of a channel):

    f(x_i) = Σ_j v_j · (1/K) Σ_k ( BN_{γ_j,α_j}(M w_j) )_+[i, k]                  (NC-CNN)
    BN_{γ,α}(h) = γ P_N h / ||P_N h|| + α / sqrt(N)          h = M w ∈ R^N,  M ∈ R^{N×h} (im2col patches)
    p* = min ℓ(f, y) + (β/2) Σ_j (γ_j² + α_j² + v_j²)

which is ``Conv2d(c, m, kernel, stride, padding, bias=False) -> BatchNorm2d(m) -> ReLU -> AdaptiveAvgPool2d(1)
-> Linear(m, C, bias=False)`` with full-batch BN (torch: ``γ = sqrt(N) γ_pt``, ``α = sqrt(N) β_pt``).
Convex program (§4.1; derivation in docs/methods/convex_cnn.md): ``P_N M = U Σ V^T``, ``U' = [U, 1/sqrt(N)]``,

    min ℓ( A Σ_l D_l U' (s_l − s'_l), y ) + β Σ_l (||s_l|| + ||s'_l||)   s.t. (2D_l − I) U' s_l >= 0, same for s'_l

with ``A`` (n × N) averaging the K positions of each image and ``D_l`` the affine arrangements of the N patch
points. It is the (C-BN) machinery of ``problem.ConvexBNProblem`` with ``pool=K``; recovery is §2.4 with
n -> N. Exact (= p*) when ``D`` holds every arrangement (``patterns="enumerate"``, feasible for tiny rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .patterns import Whitening, check_finite, sample_patterns, whiten
from .problem import LOSSES, ConvexBNProblem
from .recover import NeuronParams, load_recovered, recover
from .solvers import ConvexSolution, solve

__all__ = ["ConvPatches", "conv_patches", "enumerate_patterns", "network_patterns", "BNReLUCNN", "cnn_nc_objective",
           "ConvexCNN", "fit_convex_cnn"]

_CNN_SOLVERS = ("clarabel", "cvxpy", "scs", "al")


def _pair(v, name: str, minimum: int) -> tuple[int, int]:
    """int or pair of ints >= minimum -> (a, b)."""
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != 2 or not all(isinstance(a, (int, np.integer)) and a >= minimum for a in t):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of such ints, got {v!r}")
    return int(t[0]), int(t[1])


@dataclass
class ConvPatches:
    """im2col of a batch of images. ``M`` (n·K, c·kh·kw), rows ordered image-major (row ``i·K + k`` = patch k
    of image i), columns in ``Conv2d.weight[j].reshape(-1)`` order; ``out_hw`` = conv output size (K = Ho·Wo)."""

    M: np.ndarray
    n: int
    K: int
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out_hw: tuple[int, int]


def conv_patches(X, kernel_size, stride=1, padding=0) -> ConvPatches:
    """Patches of ``X`` (n, c, H, W) seen by ``Conv2d(c, ·, kernel_size, stride, padding)`` (zero padding)."""
    X = torch.as_tensor(np.asarray(X, dtype=np.float64) if not isinstance(X, Tensor) else X, dtype=torch.float64)
    if X.dim() != 4:
        raise ValueError(f"X must be 4-D images (n, channels, height, width), got shape {tuple(X.shape)}")
    check_finite("X", X.numpy())
    ks = _pair(kernel_size, "kernel_size", 1)
    st = _pair(stride, "stride", 1)
    pd = _pair(padding, "padding", 0)
    n, c, H, W = X.shape
    if H + 2 * pd[0] < ks[0] or W + 2 * pd[1] < ks[1]:
        raise ValueError(f"kernel_size={ks} does not fit images of size {(H, W)} with padding={pd}")
    cols = F.unfold(X, ks, padding=pd, stride=st)                      # (n, c·kh·kw, K)
    K = cols.shape[-1]
    Ho = (H + 2 * pd[0] - ks[0]) // st[0] + 1
    Wo = (W + 2 * pd[1] - ks[1]) // st[1] + 1
    M = cols.transpose(1, 2).reshape(n * K, -1).numpy()
    return ConvPatches(M=M, n=n, K=K, in_channels=c, kernel_size=ks, stride=st, padding=pd, out_hw=(Ho, Wo))


def enumerate_patterns(Up: np.ndarray, max_rays: int = 200_000, max_degenerate: int = 14,
                       atol: float = 1e-9) -> np.ndarray:
    """Every affine arrangement pattern ``1[U' g >= 0]`` of the rows of ``Up`` (N, q), as bool (N, P).

    Exact enumeration (our construction, docs/methods/convex_cnn.md §2 step 6): the rows of ``U'`` define a central,
    essential arrangement in R^q; each cell is a pointed cone with an extreme ray ``d`` = the null direction of
    q−1 independent rows. The cells at ``±d`` are ``sign(±U'd)`` with every 0/1 choice on the rows where
    ``U'd = 0``. In degenerate position this is a superset of the realisable patterns, which keeps the program
    exact (any D only adds feasible networks). Deduplicated, zero pattern dropped, canonical order.
    Cost: C(N_distinct, q−1) rays; raises if above ``max_rays``."""
    Up = np.asarray(Up, dtype=np.float64)
    if Up.ndim != 2:
        raise ValueError(f"Up must be 2-D (N, q), got shape {Up.shape}")
    N, q = Up.shape
    scale = np.abs(Up).max()
    _, first, inverse = np.unique(np.round(Up / scale, 10), axis=0, return_index=True, return_inverse=True)
    R = torch.as_tensor(Up[first])                                     # distinct rows (N', q)
    Nd = R.shape[0]
    if np.linalg.matrix_rank(Up) < q:
        raise ValueError(f"Up must have full column rank q={q}; got rank {np.linalg.matrix_rank(Up)}")
    n_rays = math.comb(Nd, q - 1)
    if n_rays > max_rays:
        raise ValueError(f"enumerating patterns needs C({Nd}, {q - 1}) = {n_rays} rays > max_rays={max_rays}; "
                         "expected a lower rank (smaller kernel, k=...) or use patterns='sample'")
    if q == 1:
        D = np.ones((N, 1), dtype=bool)
        return D
    sub = torch.combinations(torch.arange(Nd), r=q - 1)                # (S, q-1)
    A = R[sub.reshape(-1)].reshape(-1, q - 1, q)
    _, sv, Vh = torch.linalg.svd(A, full_matrices=True)
    ok = sv[:, -1] > 1e-9 * sv[:, 0]                                   # q-1 independent rows -> one ray
    d = Vh[ok, -1, :]                                                  # (S', q)
    H = d @ R.T                                                        # (S', N')
    zero = H.abs() <= atol * H.abs().amax(1, keepdim=True).clamp_min(1e-300)
    nz = zero.sum(1)
    if int(nz.max()) > max_degenerate:
        raise ValueError(f"a ray lies on {int(nz.max())} hyperplanes (> max_degenerate={max_degenerate}); "
                         "the data are too degenerate for exhaustive enumeration: use patterns='sample'")
    out = []
    for z in torch.unique(nz).tolist():                                # few distinct degeneracy levels
        rows = nz == z
        Hz, Zz = H[rows], zero[rows]
        idx = torch.argsort((~Zz).to(torch.int8), dim=1, stable=True)[:, :z]          # zero positions (S_z, z)
        bits = ((torch.arange(2 ** z)[:, None] >> torch.arange(z)[None, :]) & 1).bool()  # (2^z, z)
        for sgn in (1.0, -1.0):
            base = (sgn * Hz > 0)[:, None, :].expand(-1, 2 ** z, -1).clone()             # (S_z, 2^z, N')
            base.scatter_(2, idx[:, None, :].expand(-1, 2 ** z, -1), bits[None].expand(base.shape[0], -1, -1))
            out.append(base.reshape(-1, Nd))
    Dd = torch.cat(out).numpy()
    Dd = np.unique(Dd, axis=0)
    D = Dd[:, inverse.reshape(-1)].T                                    # back to all N rows
    D = np.unique(D.T, axis=0).T
    return D[:, D.any(0)]


class BNReLUCNN(nn.Module):
    """``Conv2d(c, m, kernel, stride, padding, bias=False) -> BatchNorm2d(m) -> ReLU -> AdaptiveAvgPool2d(1)
    -> Flatten -> Linear(m, C, bias=False)``. Input (n, c, H, W) -> output (n, C)."""

    def __init__(self, in_channels: int, width: int, kernel_size, stride=1, padding=0, n_outputs: int = 1,
                 eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(width, eps=eps)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Linear(width, n_outputs, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))

    @classmethod
    def from_params(cls, p: NeuronParams, patches: ConvPatches, eps: float = 1e-5,
                    dtype: torch.dtype = torch.float64) -> BNReLUCNN:
        """Load paper-convention weights (``p.W`` (c·kh·kw, m)) with BN statistics of the training patches:
        filters rescaled to unit biased variance over the N = n·K outputs, ``BatchNorm2d.weight =
        γ sqrt(1+eps)/sqrt(N)`` (cancels eps), ``.bias = α/sqrt(N)``, running stats = training statistics."""
        if p.width == 0:
            raise ValueError("the convex solution has no nonzero block (width 0): beta is at or above the value "
                             "where the optimum is f = 0; expected a smaller beta")
        Nt = patches.M.shape[0]
        Hm = patches.M @ p.W
        mu = Hm.mean(0)
        nrm = np.linalg.norm(Hm - mu, axis=0)
        if np.any(nrm <= 0):
            raise ValueError("a recovered filter has zero batch variance on the training patches; expected "
                             "filters with P_N M w != 0")
        scale = math.sqrt(Nt) / nrm
        net = cls(patches.in_channels, p.width, patches.kernel_size, patches.stride, patches.padding,
                  p.V.shape[1], eps).to(dtype)
        load_recovered(net.conv.weight, net.bn, net.out.weight, p, mu, scale, Nt, eps)
        return net.eval()


def cnn_nc_objective(net: BNReLUCNN, X: Tensor, Y: Tensor, beta: float, loss: str = "squared") -> Tensor:
    """(NC-CNN) of any ``BNReLUCNN`` on the full batch X (n, c, H, W), Y (n,) or (n, C), differentiable:
    train-mode BN (running stats untouched), paper parameters ``γ = sqrt(N) γ_pt sqrt(var/(var+eps))``,
    ``α = sqrt(N) β_pt`` with ``N = n·Ho·Wo`` and ``var`` the biased per-channel variance of the conv output."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    was, mom = net.training, net.bn.momentum
    net.bn.momentum = 0.0
    net.train()
    try:
        H = net.conv(X)
        Fo = net.out(net.pool(net.act(net.bn(H))).flatten(1))
    finally:
        net.train(was)
        net.bn.momentum = mom
    Y = Y.reshape(Fo.shape).to(Fo.dtype)
    if loss == "squared":
        lv = 0.5 * ((Fo - Y) ** 2).sum()
    elif loss == "logistic":
        lv = F.softplus(-Y * Fo).sum()
    else:
        lv = (1 - Y * Fo).clamp_min(0).sum()
    Nt = H.shape[0] * H.shape[2] * H.shape[3]
    var = H.var(dim=(0, 2, 3), unbiased=False)
    g = math.sqrt(Nt) * net.bn.weight * torch.sqrt(var / (var + net.bn.eps))
    a = math.sqrt(Nt) * net.bn.bias
    return lv + 0.5 * beta * ((g ** 2).sum() + (a ** 2).sum() + (net.out.weight ** 2).sum())


def network_patterns(net: BNReLUCNN, X) -> np.ndarray:
    """ReLU patterns ``1[BN(M w_j) >= 0]`` (N, m) of a CNN's channels on the full batch X (n, c, H, W),
    rows image-major as in :func:`conv_patches` (train-mode BN, running stats untouched). Adding them to the
    program's ``D`` makes the program's optimum <= that network's (NC-CNN) value (docs §2 step 4)."""
    X = torch.as_tensor(np.asarray(X, dtype=np.float64) if not isinstance(X, Tensor) else X)
    was, mom = net.training, net.bn.momentum
    net.bn.momentum = 0.0
    net.train()
    try:
        with torch.no_grad():
            Z = net.bn(net.conv(X.to(net.conv.weight.dtype)))                     # (n, m, Ho, Wo)
    finally:
        net.train(was)
        net.bn.momentum = mom
    return (Z.permute(0, 2, 3, 1).reshape(-1, Z.shape[1]) >= 0).numpy()


@dataclass
class ConvexCNN:
    """A solved (C-BN-CNN) program: ``patches`` (training im2col), ``whitening`` of ``patches.M``, patterns
    ``D`` (N, P), ``problem``, ``solution`` (certificate), recovered ``params`` (paper convention)."""

    patches: ConvPatches
    whitening: Whitening
    D: np.ndarray
    problem: ConvexBNProblem
    solution: ConvexSolution
    params: NeuronParams

    @property
    def objective(self) -> float:
        """Convex objective of the returned point (gated predictor ``A Σ D U' s``)."""
        return self.solution.objective

    def network_objective(self) -> float:
        """The same point's realised-ReLU objective (= (NC-CNN) of :meth:`network`; equal when feasible)."""
        W = torch.as_tensor(self.solution.W, dtype=self.problem.Up.dtype)
        return float(self.problem.objective(W, gated=False))

    def network(self, eps: float = 1e-5, dtype: torch.dtype = torch.float64) -> BNReLUCNN:
        """The recovered torch CNN (eval mode; train mode on the training batch gives the same outputs)."""
        return BNReLUCNN.from_params(self.params, self.patches, eps, dtype)

    def predict(self, X) -> np.ndarray:
        """(m, C) convex predictor on images X (m, c, H, W) with training-set BN statistics (population BN):
        ``A Σ_j σ_j (U'_new s_j)_+``, ``U'_new = [(M_new − mean) V Σ^{-1}, 1/sqrt(N)]``."""
        pt = self.patches
        new = conv_patches(X, pt.kernel_size, pt.stride, pt.padding)
        if new.in_channels != pt.in_channels or new.K != pt.K:
            raise ValueError(f"X must be images like the training ones ({pt.in_channels} channels, {pt.K} conv "
                             f"positions); got {new.in_channels} channels, {new.K} positions")
        Upn = self.whitening.transform(new.M)                                    # (N_new, q)
        W = self.solution.W                                                      # (C, 2P, q)
        P = W.shape[1] // 2
        sig = np.concatenate([np.ones(P), -np.ones(P)])
        Hn = np.maximum(np.einsum("cjq,nq->cjn", W, Upn), 0)
        out = np.einsum("cjn,j->cn", Hn, sig).reshape(W.shape[0], new.n, new.K).mean(-1)
        return out.T


def fit_convex_cnn(X, y, beta: float, kernel_size, stride=1, padding=0, patterns: str | np.ndarray = "sample",
                   n_patterns: int = 1000, seed: int = 0, loss: str = "squared", solver: str = "clarabel",
                   k: int | None = None, tol: float = 1e-8, prune_tol: float = 1e-9, **solver_kwargs) -> ConvexCNN:
    """Solve the §4.1 program for images X (n, c, H, W) and targets y (n,) or (n, C) (one-vs-all, §2.6 option 1).

    ``patterns``: "sample" (``n_patterns`` Gaussian gates in whitened space, seeded), "enumerate" (all
    arrangements, exact, tiny rank only) or a bool array (n·K, P). ``k``: truncated whitening (§5.3 E1).
    ``solver``: "clarabel"/"cvxpy"/"scs" (CVXPY, default) or "al" (torch augmented Lagrangian);
    ADMM does not support pooling. ``prune_tol``: blocks with ``||s|| <= prune_tol·max(max||s||, ||y||)`` get no
    neuron (0: keep every nonzero block). Returns :class:`ConvexCNN`."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite float, got {beta!r}")
    if not isinstance(solver, str) or solver.lower() not in _CNN_SOLVERS:
        raise ValueError(f"solver must be one of {_CNN_SOLVERS} (pooled program), got {solver!r}")
    pt = conv_patches(X, kernel_size, stride, padding)
    Y = np.asarray(y, dtype=np.float64)
    if Y.ndim not in (1, 2) or Y.shape[0] != pt.n:
        raise ValueError(f"y must have shape (n,) or (n, C) with n={pt.n} images, got shape {Y.shape}")
    check_finite("y", Y)
    if pt.M.shape[0] < 2:
        raise ValueError(f"BN needs at least 2 conv outputs per channel (n·K >= 2), got n·K={pt.M.shape[0]}")
    wh = whiten(pt.M, k)
    if isinstance(patterns, str):
        if patterns == "sample":
            D = sample_patterns(wh.Up, n_patterns, seed)
        elif patterns == "enumerate":
            D = enumerate_patterns(wh.Up)
        else:
            raise ValueError(f"patterns must be 'sample', 'enumerate' or a bool array, got {patterns!r}")
    else:
        D = np.asarray(patterns)
        if D.ndim != 2 or D.shape[0] != pt.M.shape[0] or D.dtype != bool:
            raise ValueError(f"patterns array must be bool of shape (n·K={pt.M.shape[0]}, P), got "
                             f"{D.dtype} {D.shape}")
    Yc = Y.T if Y.ndim == 2 else Y[None]
    prob = ConvexBNProblem(torch.as_tensor(wh.Up), torch.as_tensor(D), torch.as_tensor(Yc), float(beta), loss,
                           None, pt.K)
    sol = solve(prob, solver.lower(), tol=tol, **solver_kwargs)
    Wp = sol.W.copy()                                    # prune relative to the block and target scales
    nrm = np.linalg.norm(Wp, axis=-1)
    Wp[nrm <= prune_tol * max(float(nrm.max(initial=0.0)), float(np.linalg.norm(Y)))] = 0.0
    params = recover(Wp, wh, tol=0.0)
    return ConvexCNN(patches=pt, whitening=wh, D=D, problem=prob, solution=sol, params=params)
