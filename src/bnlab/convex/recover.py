"""Recovery (convex_bn.md §2.4): convex blocks -> a two-layer BN-ReLU ``torch.nn.Module``.

Paper convention (§1.1): ``BN_{γ,α}(h) = γ P_n h/||P_n h|| + α/sqrt(n)``; per nonzero block ``s`` with sign
``σ`` and output ``c``: ``w = V Σ^{-1} s[:k]``, ``γ = ||s[:k]||/sqrt(||s||)``, ``α = s[k]/sqrt(||s||)``,
``v = σ sqrt(||s||) e_c``, so ``(β/2)(γ² + α² + ||v||²) = β||s||``.
Torch mapping (§8.1): ``w`` rescaled to unit biased batch variance; ``BatchNorm1d.weight = γ sqrt(1+eps)/sqrt(n)``
(cancels eps exactly), ``.bias = α/sqrt(n)``, ``running_mean = mean(Xw)``, ``running_var = 1`` (biased), so
train mode on the training batch and eval mode anywhere both reproduce the convex predictor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .patterns import Whitening

__all__ = ["NeuronParams", "recover", "BNReLUNet", "nc_objective", "paper_params"]


@dataclass
class NeuronParams:
    """Paper-convention weights: ``W`` (d, m), ``gamma`` (m,), ``alpha`` (m,), ``V`` (m, C)."""

    W: np.ndarray
    gamma: np.ndarray
    alpha: np.ndarray
    V: np.ndarray

    @property
    def width(self) -> int:
        return int(self.gamma.shape[0])


def recover(W: np.ndarray, wh: Whitening, tol: float = 1e-9) -> NeuronParams:
    """Blocks ``W`` (C, 2P, q) -> one neuron per block with ``||s|| > tol·max||s||`` (vectorised)."""
    C, twoP, q = W.shape
    k = q - 1
    P = twoP // 2
    nrm = np.linalg.norm(W, axis=-1)                                  # (C, 2P)
    keep = nrm > tol * max(nrm.max(), 1e-300)
    c_idx, j_idx = np.nonzero(keep)
    S = W[c_idx, j_idx]                                               # (m, q)
    ns = nrm[c_idx, j_idx]
    sgn = np.where(j_idx < P, 1.0, -1.0)
    top = S[:, :k]
    tn = np.linalg.norm(top, axis=1)
    Wd = wh.V @ (top / wh.S).T                                        # (d, m)
    zero = tn <= 1e-300                                               # γ = 0: any direction with P_n X w != 0
    if zero.any():
        Wd[:, zero] = (wh.V[:, 0] / wh.S[0])[:, None]
    root = np.sqrt(ns)
    V = np.zeros((len(ns), C))
    V[np.arange(len(ns)), c_idx] = sgn * root
    return NeuronParams(W=Wd, gamma=tn / root, alpha=S[:, k] / root, V=V)


class BNReLUNet(nn.Module):
    """``Linear(d, m, bias=False) -> BatchNorm1d(m) -> ReLU -> Linear(m, C, bias=False)``.
    Input (N, d) -> output (N, C) (squeeze for C = 1 is left to the caller)."""

    def __init__(self, d: int, m: int, C: int = 1, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(d, m, bias=False)
        self.bn = nn.BatchNorm1d(m, eps=eps)
        self.act = nn.ReLU()
        self.out = nn.Linear(m, C, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.bn(self.linear(x))))

    @classmethod
    def from_params(cls, p: NeuronParams, X: np.ndarray, eps: float = 1e-5,
                    dtype: torch.dtype = torch.float64) -> BNReLUNet:
        """Load paper-convention weights; ``X`` (n, d) is the training data (BN statistics)."""
        X = np.asarray(X, dtype=np.float64)
        H = X @ p.W
        mu = H.mean(0)
        return cls.from_stats(p, mu, np.linalg.norm(H - mu, axis=0), X.shape[0], eps, dtype)

    @classmethod
    def from_stats(cls, p: NeuronParams, mu: np.ndarray, nrm: np.ndarray, n: int, eps: float = 1e-5,
                   dtype: torch.dtype = torch.float64) -> BNReLUNet:
        """As :meth:`from_params`, from the training statistics of ``X W``: mean ``mu`` (m,) and
        centred norm ``nrm`` (m,) over ``n`` samples."""
        scale = math.sqrt(n) / nrm                                     # unit biased batch variance
        net = cls(p.W.shape[0], p.width, p.V.shape[1], eps=eps).to(dtype)
        load_recovered(net.linear.weight, net.bn, net.out.weight, p, mu, scale, n, eps)
        return net.eval()


def load_recovered(first_weight: torch.Tensor, bn: nn.Module, out_weight: torch.Tensor, p: NeuronParams,
                   mu: np.ndarray, scale: np.ndarray, n: int, eps: float) -> None:
    """Write the §2.4 recovery map into torch parameters (in place): first layer ``(W·scale)^T``
    reshaped to ``first_weight``'s shape, ``BatchNorm`` weight ``γ sqrt(1+eps)/sqrt(n)``, bias
    ``α/sqrt(n)``, running mean ``mu·scale``, running var 1, output ``V^T``. ``n`` is the number of
    entries BN normalises over per channel (samples; samples x positions for a CNN)."""
    with torch.no_grad():
        t = lambda a: torch.as_tensor(a, dtype=first_weight.dtype)  # noqa: E731
        first_weight.copy_(t((p.W * scale).T).reshape(first_weight.shape))
        bn.weight.copy_(t(p.gamma * math.sqrt(1 + eps) / math.sqrt(n)))
        bn.bias.copy_(t(p.alpha / math.sqrt(n)))
        bn.running_mean.copy_(t(mu * scale))
        bn.running_var.fill_(1.0)
        out_weight.copy_(t(p.V.T))


def paper_params(net: BNReLUNet, X: Tensor, n: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Paper-convention ``(γ, α, V)`` of a torch net on training batch ``X`` (n, d), differentiable:
    ``γ = sqrt(n) γ_pt sqrt(var/(var+eps))`` (biased batch var), ``α = sqrt(n) β_pt``."""
    n = X.shape[0] if n is None else n
    var = net.linear(X).var(0, unbiased=False)
    g = math.sqrt(n) * net.bn.weight * torch.sqrt(var / (var + net.bn.eps))
    return g, math.sqrt(n) * net.bn.bias, net.out.weight.T


def nc_objective(net: BNReLUNet, X: Tensor, Y: Tensor, beta: float, loss: str = "squared",
                 n_total: int | None = None) -> Tensor:
    """(NC), §1.1: ``ℓ(f(X), Y) + (β/2) Σ_j (γ_j² + α_j² + ||v_j||²)`` with full-batch BN statistics
    (train-mode forward, running stats untouched). X (n, d); Y (n,) or (n, C).
    ``n_total``: X is a minibatch of a set of that size; the loss is scaled by ``n_total/n`` (unbiased)
    and the penalty uses the ``sqrt(n_total)`` convention."""
    was = net.training
    mom = net.bn.momentum
    net.bn.momentum = 0.0                                              # do not disturb running stats
    net.train()
    F = net(X)
    net.train(was)
    net.bn.momentum = mom
    Y = Y.reshape(F.shape).to(F.dtype)
    if loss == "squared":
        lv = 0.5 * ((F - Y) ** 2).sum()
    elif loss == "logistic":
        lv = torch.nn.functional.softplus(-Y * F).sum()
    elif loss == "hinge":
        lv = (1 - Y * F).clamp_min(0).sum()
    else:
        raise ValueError(f"loss must be 'squared', 'logistic' or 'hinge', got {loss!r}")
    if n_total is not None:
        lv = lv * (n_total / X.shape[0])
    g, a, V = paper_params(net, X, n_total)
    return lv + 0.5 * beta * ((g ** 2).sum() + (a ** 2).sum() + (V ** 2).sum())
