"""Exact convex training of two-layer BN-ReLU networks (Ergen, Sahiner et al., ICLR 2022).

Spec: /work/shared/methods/convex_bn.md; implementation notes: docs/methods/convex_bn.md.
"""

from .closed_form import closed_form, closed_form_applies
from .cnn import (
    BNReLUCNN,
    ConvexCNN,
    cnn_nc_objective,
    conv_patches,
    enumerate_patterns,
    fit_convex_cnn,
    network_patterns,
)
from .estimator import ConvexBNClassifier, ConvexBNRegressor
from .implicit import energy_profile, spectral_weights, train_nonconvex
from .patterns import PatternWarning, Whitening, pattern_bound, sample_patterns, whiten
from .problem import ConvexBNProblem
from .recover import BNReLUNet, NeuronParams, nc_objective, recover
from .solvers import ConvergenceWarning, ConvexSolution, solve

__all__ = ["ConvexBNClassifier", "ConvexBNRegressor", "ConvexBNProblem", "ConvexSolution", "BNReLUNet",
           "NeuronParams", "Whitening", "PatternWarning", "ConvergenceWarning", "whiten", "sample_patterns",
           "pattern_bound", "solve", "recover", "nc_objective", "closed_form", "closed_form_applies",
           "spectral_weights", "train_nonconvex", "energy_profile", "BNReLUCNN", "ConvexCNN", "cnn_nc_objective",
           "conv_patches", "enumerate_patterns", "fit_convex_cnn", "network_patterns"]
