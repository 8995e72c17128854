"""Whitening of the data and hyperplane-arrangement patterns (Ergen, Sahiner et al., ICLR 2022).

Spec: ``/work/shared/methods/convex_bn.md`` §2.1 (``P_n X = U Σ V^T``, ``U' = [U, 1/sqrt(n)]``,
``U'^T U' = I``) and §2.2 (affine patterns ``D = 1[U' g >= 0] = 1[X w + b >= 0]``, sampled, deduplicated,
zero pattern dropped). §5.3 (E1): optional truncation to the top-k singular directions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PatternWarning", "Whitening", "whiten", "sample_patterns", "pattern_bound", "check_finite"]


class PatternWarning(UserWarning):
    """Fewer sampled patterns than the arrangement bound: the program may not be exact."""


def check_finite(name: str, a: np.ndarray) -> None:
    """Raise ValueError if ``a`` has NaN/inf entries."""
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values; expected finite numbers")


@dataclass
class Whitening:
    """Centred SVD of the training data. Shapes: ``Up`` (n, k+1) = ``[U_k, 1/sqrt(n)]``, ``U`` (n, k),
    ``S`` (k,), ``V`` (d, k), ``mean`` (d,). ``rank`` = numerical rank r of ``P_n X``; ``k <= r`` kept."""

    Up: np.ndarray
    U: np.ndarray
    S: np.ndarray
    V: np.ndarray
    mean: np.ndarray
    rank: int
    n: int

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    @property
    def q(self) -> int:
        """Number of columns of ``U'`` (k + 1)."""
        return self.k + 1

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Whitened coordinates of new rows (m, d) -> (m, k+1), training statistics (population BN):
        ``[(x - mean) V Σ^{-1}, 1/sqrt(n)]``; on the training X this returns ``Up``."""
        Z = (np.asarray(X, dtype=np.float64) - self.mean) @ (self.V / self.S)
        return np.hstack([Z, np.full((Z.shape[0], 1), 1.0 / math.sqrt(self.n))])


def whiten(X: np.ndarray, k: int | None = None, rtol: float = 1e-10) -> Whitening:
    """§2.1: ``P_n X = U Σ V^T`` with rank threshold ``σ_j > rtol·σ_1``; ``k`` truncates (§5.3 E1).

    X: (n, d). Duplicate / collinear / constant features only lower the rank r; all-constant X
    (r = 0) is rejected because BN is undefined for every neuron."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"BN needs n_samples >= 2, got n_samples={n}")
    check_finite("X", X)
    mean = X.mean(0)
    U, S, Vt = np.linalg.svd(X - mean, full_matrices=False)
    r = int((S > rtol * S[0]).sum()) if S.size and S[0] > 0 else 0
    if r == 0:
        raise ValueError("X is constant (rank 0 after centring): batch normalisation is undefined; "
                         "expected at least one non-constant feature")
    if k is not None:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int (number of singular directions kept), got {k!r}")
        kk = min(int(k), r)
    else:
        kk = r
    U, S, V = U[:, :kk], S[:kk], Vt[:kk].T
    Up = np.hstack([U, np.full((n, 1), 1.0 / math.sqrt(n))])
    return Whitening(Up=Up, U=U, S=S, V=V, mean=mean, rank=r, n=n)


def pattern_bound(n: int, r: int) -> int:
    """§2.2 bound on the number of affine arrangement patterns: ``2 Σ_{j<=r} C(n-1, j)``."""
    return 2 * sum(math.comb(n - 1, j) for j in range(min(r, n - 1) + 1))


def sample_patterns(Up: np.ndarray | Tensor, n_gates: int, seed: int = 0, space: str = "whitened",
                    X: np.ndarray | None = None, warn: bool = True) -> np.ndarray:
    """Sample arrangement patterns, deduplicated, zero pattern dropped, in a canonical order.

    space="whitened": gates ``g ~ N(0, I_{q})`` and ``D = 1[U' g >= 0]``; space="raw": gates
    ``(w, b)`` with ``w ~ N(0, I_d)`` on the centred raw data and ``b`` = a random quantile of ``X_c w``
    (affine, biased towards the top principal directions, §2.2). Returns a bool array (n, P).
    Deterministic for a given ``seed``. Warns when P is below the §2.2 bound (exactness not guaranteed)."""
    if not isinstance(n_gates, (int, np.integer)) or n_gates < 1:
        raise ValueError(f"n_patterns must be a positive int, got {n_gates!r}")
    Up = np.asarray(Up, dtype=np.float64)
    n, q = Up.shape
    gen = torch.Generator().manual_seed(int(seed))
    if space == "whitened":
        G = torch.randn(q, int(n_gates), generator=gen, dtype=torch.float64).numpy()
        H = Up @ G
    elif space == "raw":
        if X is None:
            raise ValueError("space='raw' needs the raw data X")
        Xc = np.asarray(X, dtype=np.float64) - np.asarray(X, dtype=np.float64).mean(0)
        G = torch.randn(Xc.shape[1], int(n_gates), generator=gen, dtype=torch.float64).numpy()
        H = Xc @ G
        qs = torch.rand(int(n_gates), generator=gen, dtype=torch.float64).numpy()
        rows = np.minimum((qs * Xc.shape[0]).astype(int), Xc.shape[0] - 1)
        H = H - np.sort(H, axis=0)[rows, np.arange(H.shape[1])][None, :] + 1e-12
    else:
        raise ValueError(f"space must be 'whitened' or 'raw', got {space!r}")
    D = H >= 0
    D = np.unique(D.T, axis=0).T                     # dedupe (sorted, so order is canonical)
    D = D[:, D.any(0)]                               # drop the all-zero pattern
    if D.shape[1] == 0:
        raise ValueError("no non-zero activation pattern was sampled; increase n_patterns")
    bound = pattern_bound(n, q - 1)
    if warn and D.shape[1] < bound - 1:
        warnings.warn(f"{D.shape[1]} distinct patterns sampled, below the arrangement bound "
                      f"2*sum_{{j<={q - 1}}} C({n - 1}, j) = {bound} (convex_bn.md §2.2): the program is "
                      "exact only for networks restricted to the sampled patterns (an upper bound on p*)",
                      PatternWarning, stacklevel=2)
    return D
