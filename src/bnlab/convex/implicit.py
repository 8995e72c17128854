"""Implicit regularisation (convex_bn.md §5): spectral encodings and the non-convex GD baseline.

* (E1) truncated whitening: ``whiten(X, k)`` keeps the top-k singular directions (patterns.py).
* (E2) soft spectral weighting: group norm ``||[σ_1^p Σ^{-p} s[:k]; σ_1^p n^{-p/2} s[k]]||`` (p = 0: C-BN,
  p = 1: the no-BN ReLU program of §5.3); :func:`spectral_weights`.
* :func:`train_nonconvex`: GD / SGD / Adam on the same (NC) objective of the torch BN-ReLU net
  (weight decay on (γ, α, v) only, §1.1), for comparison from the same API.
* :func:`energy_profile`: the §5.3 diagnostic (energy of the neurons over whitened directions).
* :func:`top_energy`: the §5.3 top-j mass, normalised by each neuron's full centred response (so energy
  outside the kept directions counts as outside), for networks on the raw or a truncated input.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .patterns import Whitening
from .recover import BNReLUNet, NeuronParams, nc_objective, paper_params

__all__ = ["spectral_weights", "train_nonconvex", "energy_profile", "params_from_net", "top_energy"]


def spectral_weights(wh: Whitening, p: float) -> np.ndarray:
    """(q,) weights Λ of (E2): ``σ_1^p [Σ^{-p}, n^{-p/2}]``."""
    if p == 0:
        return np.ones(wh.q)
    s1 = wh.S[0]
    return np.concatenate([(wh.S / s1) ** (-p), [s1 ** p * wh.n ** (-p / 2)]])


def params_from_net(net: BNReLUNet, X: torch.Tensor) -> tuple[NeuronParams, np.ndarray, np.ndarray]:
    """Paper-convention parameters + BN training statistics (mean, centred norm of XW) of a torch net."""
    with torch.no_grad():
        g, a, V = paper_params(net, X)
        H = net.linear(X)
        mu = H.mean(0)
        nrm = (H - mu).norm(dim=0)
    W = net.linear.weight.detach().T.double().numpy()
    return (NeuronParams(W=W, gamma=g.double().numpy(), alpha=a.double().numpy(), V=V.detach().double().numpy()),
            mu.double().numpy(), nrm.double().numpy())


def train_nonconvex(X: np.ndarray, Y: np.ndarray, beta: float, loss: str = "squared", width: int = 100,
                    optimizer: str = "adam", lr: float = 1e-2, epochs: int = 500, batch_size: int | None = None,
                    seed: int = 0, momentum: float = 0.9, init_scale: float = 1.0,
                    dtype: torch.dtype = torch.float64) -> tuple[BNReLUNet, list[float]]:
    """Train ``BNReLUNet`` on (NC) (loss sum + (β/2)||(γ, α, v)||², paper convention via paper_params).
    X (n, d), Y (n, C). optimizer in {"gd" (full batch SGD), "sgd", "adam"}; minibatch BN when
    ``batch_size < n`` (scaled to the full-batch objective). Returns (net, full-batch (NC) per epoch)."""
    if optimizer not in ("gd", "sgd", "adam"):
        raise ValueError(f"optimizer must be 'gd', 'sgd' or 'adam', got {optimizer!r}")
    gen = torch.Generator().manual_seed(seed)
    Xt = torch.as_tensor(X, dtype=dtype)
    Yt = torch.as_tensor(Y, dtype=dtype).reshape(len(Xt), -1)
    n, d = Xt.shape
    net = BNReLUNet(d, width, Yt.shape[1]).to(dtype)
    with torch.no_grad():
        net.linear.weight.copy_(torch.randn(width, d, generator=gen, dtype=dtype) * init_scale / math.sqrt(d))
        net.out.weight.copy_(torch.randn(Yt.shape[1], width, generator=gen, dtype=dtype) / math.sqrt(width))
    params = list(net.parameters())
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.0 if optimizer == "gd" else momentum))
    bs = n if (optimizer == "gd" or batch_size is None) else int(batch_size)
    hist = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):              # drop the ragged last batch (BN needs > 1 sample)
            idx = perm[i:i + bs]
            opt.zero_grad()
            obj = nc_objective(net, Xt[idx], Yt[idx], beta, loss, n_total=n)   # minibatch estimate of (NC)
            obj.backward()
            opt.step()
        with torch.no_grad():
            hist.append(float(nc_objective(net, Xt, Yt, beta, loss)))
    with torch.no_grad():                               # population BN = full training set statistics
        H = net.linear(Xt)
        net.bn.running_mean.copy_(H.mean(0))
        net.bn.running_var.copy_(H.var(0, unbiased=False))
    return net.eval(), hist


def energy_profile(p: NeuronParams, wh: Whitening, X: np.ndarray) -> np.ndarray:
    """§5.3: E_k = Σ_j size_j q_jk² / Σ_j size_j, q_j = ΣV^T w_j normalised, size_j = ||v_j|| sqrt(γ²+α²)."""
    Xc = np.asarray(X, dtype=np.float64) - wh.mean
    Q = wh.U.T @ (Xc @ p.W)                             # (k, m) = Σ V^T w (coordinates of P_n X w in U)
    Q = Q / np.maximum(np.linalg.norm(Q, axis=0, keepdims=True), 1e-300)
    size = np.linalg.norm(p.V, axis=1) * np.sqrt(p.gamma ** 2 + p.alpha ** 2)
    E = (Q ** 2) @ size
    return E / max(E.sum(), 1e-300)


def top_energy(p: NeuronParams, wh: Whitening, X: np.ndarray, tops) -> np.ndarray:
    """§5.3 top-j mass for each j in ``tops``: ``Σ_i size_i ||U_j^T P_n X w_i||² / ||P_n X w_i||² / Σ_i size_i``
    with ``size_i = ||v_i|| sqrt(γ_i² + α_i²)``. X (n, d) is the training data of ``wh`` (which keeps at least
    max(tops) directions); W (d, m) in raw input space. Returns (len(tops),) values in [0, 1]."""
    H = (np.asarray(X, dtype=np.float64) - wh.mean) @ p.W                  # (n, m) = P_n X w_i
    tot = np.maximum((H ** 2).sum(0), 1e-300)
    cum = np.cumsum((wh.U.T @ H) ** 2, axis=0) / tot                        # (k, m) mass in top-1..k
    size = np.linalg.norm(p.V, axis=1) * np.sqrt(p.gamma ** 2 + p.alpha ** 2)
    w = size / max(size.sum(), 1e-300)
    return np.array([float(cum[min(int(j), wh.k) - 1] @ w) for j in tops])
