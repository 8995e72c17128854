"""scikit-learn estimators for exact convex training of two-layer BN-ReLU networks (ICLR 2022).

``ConvexBNRegressor`` / ``ConvexBNClassifier``: fit solves (C-BN) (convex_bn.md §2.3; one-vs-all for
several outputs, §2.6) or uses the §3 closed form when it applies, recovers the network (§2.4) and
predicts with it (training-set BN statistics). ``solver in {"gd", "sgd", "adam"}`` trains the
*non-convex* network on the same objective instead (comparison baseline, §5/§6).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .closed_form import closed_form, closed_form_applies
from .implicit import params_from_net, spectral_weights, train_nonconvex
from .patterns import sample_patterns, whiten
from .problem import ConvexBNProblem
from .recover import BNReLUNet, recover
from .solvers import ConvexSolution, solve

__all__ = ["ConvexBNRegressor", "ConvexBNClassifier"]

_NONCONVEX = ("gd", "sgd", "adam")
_SOLVERS = ("auto", "admm", "admm-network", "al", "fista", "cvxpy", "clarabel", "scs") + _NONCONVEX


class _ConvexBNBase(BaseEstimator):
    def __init__(self, beta=1e-3, loss="squared", n_patterns=200, pattern_space="whitened", solver="auto",
                 k=None, spectral_p=0.0, closed_form="auto", tol=1e-6, max_iter=20000, device="cpu",
                 random_state=0, verbose=False, gd_options=None):
        self.beta = beta
        self.loss = loss
        self.n_patterns = n_patterns
        self.pattern_space = pattern_space
        self.solver = solver
        self.k = k
        self.spectral_p = spectral_p
        self.closed_form = closed_form
        self.tol = tol
        self.max_iter = max_iter
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.gd_options = gd_options

    # -- validation ----------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite float, got {self.beta!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        if self.closed_form not in ("auto", "never"):
            raise ValueError(f"closed_form must be 'auto' or 'never', got {self.closed_form!r}")
        if not (isinstance(self.spectral_p, (int, float)) and self.spectral_p >= 0):
            raise ValueError(f"spectral_p must be a float >= 0, got {self.spectral_p!r}")

    # -- fitting ---------------------------------------------------------------------------------------
    def _fit_targets(self, X: np.ndarray, Y: np.ndarray):
        """X (n, d), Y (C, n) targets of the convex program."""
        self._check_params()
        wh = whiten(X, self.k)
        self.whitening_ = wh
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        if self.solver in _NONCONVEX:
            opts = {"width": 100, "epochs": 300, "lr": 1e-2, **(self.gd_options or {})}
            Xw = wh.transform(X)[:, :-1] if self.k is not None else X
            net, hist = train_nonconvex(Xw, Y.T, self.beta, self.loss, optimizer=self.solver, seed=seed, **opts)
            p, mu, nrm = params_from_net(net, torch.as_tensor(Xw, dtype=torch.float64))
            if self.k is not None:                              # first layer acts on the PCA-k coordinates
                p.W = (wh.V / wh.S) @ p.W                       # x -> (x - mean) V Σ^-1 W (mean cancels in BN)
                mu = mu + wh.mean @ p.W
            self.solution_ = ConvexSolution(W=np.zeros((Y.shape[0], 0, wh.q)), objective=hist[-1],
                                            dual_bound=float("nan"), gap=float("nan"), violation=0.0,
                                            converged=False, solver=self.solver, iterations=len(hist),
                                            time_s=0.0)
            self.patterns_ = np.zeros((X.shape[0], 0), bool)
            self.params_, self.bn_mean_, self.bn_norm_ = p, mu, nrm
            self.history_ = hist
            self.n_iter_ = len(hist)
            return
        use_cf = self.closed_form == "auto" and closed_form_applies(wh, self.loss, self.k, self.spectral_p)
        if use_cf:
            sol, D = closed_form(wh, Y, float(self.beta))
        else:
            D = sample_patterns(wh.Up, int(self.n_patterns), seed, self.pattern_space, X=X)
            wts = None if self.spectral_p == 0 else torch.as_tensor(spectral_weights(wh, self.spectral_p))
            prob = ConvexBNProblem(torch.as_tensor(wh.Up), torch.as_tensor(D), torch.as_tensor(Y),
                                   float(self.beta), self.loss, wts)
            solver = self.solver
            if solver == "auto":
                small = 2 * D.shape[1] * X.shape[0] * wh.q * Y.shape[0] <= 4e5
                solver = "cvxpy" if (small or self.loss == "hinge") else "admm-network"
            kw = {} if solver in ("cvxpy", "clarabel", "scs") else {
                "max_iter": self.max_iter, "device": self.device, "verbose": self.verbose}
            sol = solve(prob, solver, tol=self.tol, **kw)
        self.solution_, self.patterns_ = sol, D
        self.n_iter_ = max(1, sol.iterations)
        self.params_ = recover(sol.W, wh)
        H = X @ self.params_.W
        self.bn_mean_ = H.mean(0)
        self.bn_norm_ = np.linalg.norm(H - self.bn_mean_, axis=0)

    @property
    def certificate_(self) -> dict:
        check_is_fitted(self, "solution_")
        return self.solution_.certificate

    @property
    def objective_(self) -> float:
        check_is_fitted(self, "solution_")
        return self.solution_.objective

    def _forward(self, X) -> np.ndarray:
        """(m, C) network outputs with training-set BN statistics (population BN)."""
        check_is_fitted(self, "params_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        p = self.params_
        n = self.whitening_.n
        safe = np.where(self.bn_norm_ > 0, self.bn_norm_, 1.0)
        Hn = (X @ p.W - self.bn_mean_) / safe * p.gamma + p.alpha / math.sqrt(n)
        return np.maximum(Hn, 0) @ p.V

    def to_torch(self, eps: float = 1e-5, dtype: torch.dtype = torch.float64) -> BNReLUNet:
        """The recovered two-layer BN-ReLU network (eval mode predicts like ``decision_function``)."""
        check_is_fitted(self, "params_")
        return BNReLUNet.from_stats(self.params_, self.bn_mean_, self.bn_norm_, self.whitening_.n, eps, dtype)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class ConvexBNRegressor(RegressorMixin, _ConvexBNBase):
    """Squared-loss regression with a two-layer BN-ReLU network trained to global optimality.

    Parameters: ``beta`` (weight decay of (NC)), ``n_patterns`` (gates sampled), ``pattern_space``
    ("whitened"/"raw"), ``solver`` ("auto": closed form / Clarabel if small / "admm-network";
    "admm", "admm-network" (certifies the recovered network, solvers.admm_solve), "al", "fista" (gated
    relaxation), "cvxpy", "clarabel", "scs", or "gd"/"sgd"/"adam" for the
    non-convex baseline), ``k`` (E1 truncation), ``spectral_p`` (E2), ``closed_form`` ("auto"/"never").
    Multi-output y (n, C) is solved one-vs-all."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True,
                             ensure_min_samples=2)
        if self.loss != "squared":
            raise ValueError(f"ConvexBNRegressor supports loss='squared' only, got loss={self.loss!r}; "
                             "use ConvexBNClassifier for 'logistic'/'hinge'")
        self._y_1d = y.ndim == 1
        Y = np.atleast_2d(y.T) if y.ndim == 2 else y[None]
        self._fit_targets(X, Y)
        return self

    def predict(self, X):
        F = self._forward(X)
        return F[:, 0] if self._y_1d else F

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class ConvexBNClassifier(ClassifierMixin, _ConvexBNBase):
    """Classification: binary as one scalar program on ±1 labels (squared, logistic or hinge loss),
    multiclass one-vs-all (squared loss on one-hot 0/1 targets, logistic/hinge on ±1). Same parameters
    as :class:`ConvexBNRegressor`; ``predict_proba`` exists for ``loss='logistic'``."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2)
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        C = len(self.classes_)
        if C < 2:
            raise ValueError(f"ConvexBNClassifier needs samples of at least 2 classes; got 1 class "
                             f"({self.classes_[0]!r})")
        if C == 2:
            Y = (2.0 * yi - 1.0)[None]
        else:
            onehot = np.eye(C)[yi].T
            Y = onehot if self.loss == "squared" else 2 * onehot - 1
        self._fit_targets(X, Y)
        return self

    def decision_function(self, X):
        F = self._forward(X)
        return F[:, 0] if len(self.classes_) == 2 else F

    def predict(self, X):
        F = self.decision_function(X)
        idx = (F > 0).astype(int) if F.ndim == 1 else F.argmax(1)
        return self.classes_[idx]

    def _has_proba(self) -> bool:
        return self.loss == "logistic"

    @available_if(_has_proba)
    def predict_proba(self, X):
        F = self.decision_function(X)
        s = 1 / (1 + np.exp(-F))
        if F.ndim == 1:
            return np.stack([1 - s, s], 1)
        return s / s.sum(1, keepdims=True)
