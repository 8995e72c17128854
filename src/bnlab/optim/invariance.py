"""Which weights are positively scale-invariant per output unit (the PSI parameters).

Yi, UAI 2022, Sec. 3.1/4.1: a neuron's weight vector ``w_j`` is a PSI parameter when the loss is
unchanged under ``w_j -> a_j w_j`` for every ``a_j > 0``; true when the neuron's output reaches a
training-mode BN only through ops that keep channels apart and are positively homogeneous.

:func:`find_scale_invariant` decides this by a torch.fx analysis (spec Sec. 8.2), generalising the
conv-BN fusion pattern to "every path from the producer is absorbed by a per-channel normaliser":

* producers: ``nn.Conv1/2/3d``, ``nn.Linear`` (unit = dim 0 of the weight), ``nn.ConvTranspose*d``
  with ``groups=1`` (unit = dim 1), and functional ``F.conv*d`` / ``F.linear`` on a parameter;
* absorbers: any ``torch.nn.modules.batchnorm._BatchNorm`` (``nn.BatchNorm*``, ``SyncBatchNorm``,
  bnlab's ``BatchStats`` / ``BatchNormAct``) in training mode or without running stats, and not
  ``center_only``; ``F.batch_norm(training=True)``; ``nn.InstanceNorm*d`` likewise;
* transparent: positively homogeneous, channel-separating ops (ReLU/LeakyReLU/PReLU, pooling,
  dropout, identity, zero padding, interpolation, flatten, slicing, ``cat`` along the channel
  dim, multiplication by a Python number, transpose/permute);
* anything else breaks invariance (residual ``add``, GELU/SiLU/sigmoid/tanh, eval/frozen BN,
  Group/LayerNorm, the graph output).

bnlab's models check input shapes in ``forward``; tracing therefore runs *concretely*: every node is
evaluated on an example input while it is recorded (on a deep copy of the model), so shape checks
and other data-independent control flow resolve to their actual values. When tracing still fails,
a runtime probe is used instead (rescale each layer's units by random positive factors and compare
train-mode outputs in float64 with BN eps 1e-12); ``verify=True`` runs the same probe on the units
the analysis accepted.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils._pytree import tree_leaves

__all__ = ["PSIUnit", "LayerReport", "analyse_scale_invariance", "find_scale_invariant", "probe_invariance",
           "default_example_input"]


@dataclass(frozen=True)
class PSIUnit:
    """One scale-invariant weight: parameter names, the unit dim of the weight, the BN module that
    absorbs it when that mapping is channel-identical (its running stats rescale with the unit)."""

    weight: str
    bias: str | None
    out_dim: int
    module: str
    norm: str | None = None


@dataclass(frozen=True)
class LayerReport:
    """The verdict on one weight layer: ``invariant`` and, if not, the first ``reason`` found."""

    module: str
    weight: str
    bias: str | None
    out_dim: int
    invariant: bool
    reason: str
    norm: str | None = None


# -- concrete tracing --------------------------------------------------------------------------
_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_META_CALLS = {"dim", "size", "numel", "ndimension", "nelement", "get_device", "is_floating_point",
               "is_contiguous"}


class _ConcreteProxy(fx.Proxy):
    """A proxy whose shape metadata (``.shape``, ``.dim()``, ``len``, ...) is the concrete value, so
    shape arithmetic (``[1] * x.dim()``, ``range(x.shape[1])``) runs as ordinary Python."""

    def __getattr__(self, k: str) -> Any:
        val = self.node.meta.get("val")
        if isinstance(val, Tensor) and (k in _META_ATTRS or k in _META_CALLS):
            return getattr(val, k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        return len(self.node.meta["val"])

    def __index__(self) -> int:
        return operator.index(self.node.meta["val"])


class _ConcreteTracer(fx.Tracer):
    """An fx tracer that evaluates each node on real inputs while recording it, so ``bool``/``iter``
    of a proxy (shape checks, loops over sizes) resolve to the concrete value."""

    def __init__(self, inputs: tuple[Any, ...]) -> None:
        super().__init__()
        self._inputs = list(inputs)
        self._next = 0
        self._evaluating = False

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _BatchNorm) and _known_bn(m):
            return True
        return super().is_leaf_module(m, qualname)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *a, **k):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *a, **k)
        self._evaluating = True
        try:
            proxy.node.meta["val"] = self._evaluate(kind, target, args, kwargs)
        finally:
            self._evaluating = False
        return proxy

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        def val(x: Any) -> Any:
            if isinstance(x, fx.Proxy):
                return x.node.meta["val"]
            if isinstance(x, fx.Node):
                return x.meta["val"]
            return x

        args = fx.node.map_aggregate(args, val)
        kwargs = fx.node.map_aggregate(kwargs, val)
        if kind == "placeholder":
            i = self._next
            self._next += 1
            if i < len(self._inputs):
                return self._inputs[i]
            return args[0] if args else None
        if kind == "get_attr":
            obj: Any = self.root
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.root.get_submodule(target).forward(*args, **kwargs)
        return None

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if self._evaluating:  # a nested call while evaluating a leaf: just run it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[override]
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(obj.node.meta["val"])

    def iter(self, obj: fx.Proxy):  # type: ignore[override]
        return (obj[i] for i in range(len(obj.node.meta["val"])))


def _known_bn(m: nn.Module) -> bool:
    """BN modules whose forward is known to be ``[act](standardize(x))``."""
    from ..nn.norm_act import BatchNormAct
    from ..nn.stats import BatchStats

    fwd = type(m).forward
    return fwd in (_BatchNorm.forward, BatchStats.forward, BatchNormAct.forward) or type(m) in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def default_example_input(model: nn.Module, batch: int = 4) -> Tensor:
    """A random input for ``model``: ``(batch, C, 32, 32)`` for a first Conv2d with C input channels
    (``(batch, C, 64)`` / ``(batch, C, 8, 16, 16)`` for Conv1d/3d), ``(batch, F)`` for a first
    Linear. bnlab's MLP flattens its input, so ``(batch, in_features)`` works for it."""
    for m in model.modules():
        p = next(m.parameters(recurse=False), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        device = p.device if p is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(0)
        if isinstance(m, nn.Conv2d):
            return torch.randn(batch, m.in_channels, 32, 32, generator=gen).to(device, dtype)
        if isinstance(m, nn.Conv1d):
            return torch.randn(batch, m.in_channels, 64, generator=gen).to(device, dtype)
        if isinstance(m, nn.Conv3d):
            return torch.randn(batch, m.in_channels, 8, 16, 16, generator=gen).to(device, dtype)
        if isinstance(m, nn.Linear):
            return torch.randn(batch, m.in_features, generator=gen).to(device, dtype)
    raise ValueError(f"example_input: cannot guess an input for {type(model).__name__} (no Conv/Linear "
                     f"layer found); pass example_input=")


def _as_tuple(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _trace(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    """Concrete fx trace of a deep copy of ``model`` (node values in ``node.meta['val']``)."""
    work = copy.deepcopy(model)
    tracer = _ConcreteTracer(inputs)
    with torch.no_grad():
        graph = tracer.trace(work)
    return fx.GraphModule(tracer.root, graph)


# -- the analysis ------------------------------------------------------------------------------
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                        nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
                        nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.prelu, F.dropout, F.dropout1d, F.dropout2d,
                          F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                          F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                          F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
                          torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d, operator.neg,
                          torch.neg}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "contiguous", "clone", "float", "double", "half", "bfloat16", "to",
                        "detach", "neg"}
_META_METHODS = {"size", "dim", "numel", "ndimension", "type", "is_contiguous", "get_device"}
_FLAT = (("start_dim", 0), ("end_dim", -1))
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FCONV = {F.conv1d, F.conv2d, F.conv3d, F.linear}


def _ndim(node: fx.Node) -> int | None:
    v = node.meta.get("val")
    return v.dim() if isinstance(v, Tensor) else None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Analysis:
    """DFS from each producer over its users, tracking the set of dims that determine the channel."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())

    # The state of an edge: ``dims`` (the dims whose indices determine the producer channel) and
    # ``identity`` (channel index = producer unit index, so BN running stats can be rescaled).
    def explore(self, start: fx.Node, cdim: int) -> tuple[bool, str, set[str], bool]:
        ok, reason, norms, ident = True, "", set(), True
        stack: list[tuple[fx.Node, frozenset[int], bool]] = [(start, frozenset({cdim}), True)]
        visited: set[tuple[str, frozenset[int], bool]] = set()
        while stack:
            node, dims, identity = stack.pop()
            key = (node.name, dims, identity)
            if key in visited:
                continue
            visited.add(key)
            if not node.users:
                continue
            for user in node.users:
                verdict = self._through(node, user, dims, identity)
                if verdict[0] == "break":
                    return False, verdict[1], norms, False
                if verdict[0] == "absorb":
                    norms.add(verdict[1])
                    ident = ident and identity
                elif verdict[0] == "skip":
                    continue
                else:
                    stack.append((user, verdict[1], verdict[2]))
        return ok, reason, norms, ident

    def _through(self, src: fx.Node, user: fx.Node, dims: frozenset[int], identity: bool) -> tuple:
        """('pass', dims', identity') | ('absorb', norm_name) | ('skip',) | ('break', reason)."""
        nd = _ndim(src)
        if user.op == "output":
            return ("break", "reaches the model output without a BN")
        first = user.args[0] if user.args else None
        if user.op == "call_module":
            m = self.modules[user.target]
            if first is not src or any(a is src for a in list(user.args[1:]) + list(user.kwargs.values())):
                return ("break", f"used as a secondary input of {user.target}")
            if isinstance(m, (_BatchNorm, _InstanceNorm)):
                if dims != {1}:
                    return ("break", f"{user.target} normalises dim 1, the unit lives in dims {sorted(dims)}")
                if getattr(m, "center_only", False):
                    return ("break", f"{user.target} only centres (center_only=True)")
                if m.training or not m.track_running_stats:
                    return ("absorb", user.target)
                return ("break", f"{user.target} is in eval mode (a fixed affine map)")
            if isinstance(m, _HOMOGENEOUS_MODULES):
                return ("pass", dims, identity)
            if isinstance(m, nn.Flatten):
                return self._flatten(dims, identity, nd, m.start_dim, m.end_dim)
            return ("break", f"{type(m).__name__} ({user.target}) is not positively homogeneous per channel")
        if user.op == "call_function":
            t = user.target
            if t is getattr or t in (torch.Tensor.size, torch.Tensor.dim):
                return ("skip",)
            if t is F.batch_norm or t is F.instance_norm:
                training = user.kwargs.get("training", user.kwargs.get("use_input_stats"))
                if training is None:
                    training = user.args[5] if len(user.args) > 5 else False
                if first is not src:
                    return ("break", "secondary input of batch_norm")
                if dims != {1}:
                    return ("break", f"batch_norm normalises dim 1, the unit lives in dims {sorted(dims)}")
                return ("absorb", None) if training else ("break", "F.batch_norm in eval mode")
            if t in _HOMOGENEOUS_FUNCTIONS:
                if first is not src:
                    return ("break", f"secondary input of {getattr(t, '__name__', t)}")
                return ("pass", dims, identity)
            if t is F.pad:
                return self._pad(user, src, dims, identity, nd)
            if t in (torch.flatten,):
                if first is not src:
                    return ("break", "secondary input of flatten")
                return self._flatten(dims, identity, nd, *self._args(user, 1, *_FLAT))
            if t in (operator.mul, torch.mul, operator.truediv, torch.div):
                other = user.args[1] if first is src else first
                if t in (operator.truediv, torch.div) and first is not src:
                    return ("break", "divides by the unit's output")
                if _is_number(other) and other != 0:
                    return ("pass", dims, identity)
                return ("break", "multiplied by a tensor (not a constant)")
            if t is operator.getitem:
                return self._getitem(user, src, dims, identity, nd)
            if t is torch.cat:
                return self._cat(user, src, dims, nd)
            if t in (torch.transpose, torch.permute):
                return self._permute(user, dims, identity, nd, t)
            name = getattr(t, "__name__", str(t))
            return ("break", f"{name} mixes channels or is not positively homogeneous")
        if user.op == "call_method":
            t = user.target
            if t in _META_METHODS:
                return ("skip",)
            if first is not src:
                return ("break", f"secondary input of .{t}()")
            if t in _HOMOGENEOUS_METHODS:
                return ("pass", dims, identity)
            if t == "flatten":
                return self._flatten(dims, identity, nd, *self._args(user, 1, *_FLAT))
            if t in ("mul", "div", "__mul__", "__truediv__"):
                other = user.args[1] if len(user.args) > 1 else None
                if _is_number(other) and other != 0:
                    return ("pass", dims, identity)
                return ("break", f".{t}() by a tensor")
            if t in ("transpose", "permute"):
                return self._permute(user, dims, identity, nd, t)
            return ("break", f".{t}() mixes channels or is not positively homogeneous")
        return ("break", f"unsupported use ({user.op} {user.target})")

    @staticmethod
    def _args(user: fx.Node, start: int, *spec: tuple[str, Any]) -> list[Any]:
        out = []
        for i, (k, default) in enumerate(spec):
            pos = start + i
            out.append(user.args[pos] if len(user.args) > pos else user.kwargs.get(k, default))
        return out

    @staticmethod
    def _flatten(dims: frozenset[int], identity: bool, nd: int | None, start: int, end: int) -> tuple:
        if nd is None:
            return ("break", "flatten of a tensor of unknown rank")
        start, end = start % nd, end % nd
        out = set()
        for d in dims:
            out.add(d if d < start else start if d <= end else d - (end - start))
        merged = any(start <= d <= end for d in dims) and end > start
        return ("pass", frozenset(out), identity and not merged)

    @staticmethod
    def _pad(user: fx.Node, src: fx.Node, dims: frozenset[int], identity: bool, nd: int | None) -> tuple:
        if user.args[0] is not src:
            return ("break", "secondary input of pad")
        mode = user.args[2] if len(user.args) > 2 else user.kwargs.get("mode", "constant")
        value = user.args[3] if len(user.args) > 3 else user.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            return ("break", f"pad with mode={mode!r}, value={value!r} (only zero padding is homogeneous)")
        pad = user.args[1] if len(user.args) > 1 else user.kwargs["pad"]
        touched = {nd - 1 - i // 2 for i, v in enumerate(pad) if v} if nd is not None else set(dims)
        return ("pass", dims, identity and not (touched & set(dims)))

    @staticmethod
    def _getitem(user: fx.Node, src: fx.Node, dims: frozenset[int], identity: bool, nd: int | None) -> tuple:
        if user.args[0] is not src:
            return ("break", "used as an index")
        idx = user.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if nd is None or any(not (isinstance(i, (slice, int)) or i is None or i is Ellipsis) for i in idx):
            return ("break", "advanced indexing")
        n_ell = sum(i is Ellipsis for i in idx)
        if n_ell > 1:
            return ("break", "indexing with two ellipses")
        n_real = sum(isinstance(i, (slice, int)) for i in idx)
        full: list[Any] = []
        for i in idx:
            full.extend([slice(None)] * (nd - n_real) if i is Ellipsis else [i])
        full.extend([slice(None)] * (nd - sum(isinstance(i, (slice, int)) for i in full)))
        out, d_in, d_out, ident = set(), 0, 0, identity
        for i in full:
            if i is None:
                d_out += 1
                continue
            if isinstance(i, int):
                d_in += 1  # a fixed index: the dim is gone, the channel stays a function of the rest
                continue
            if d_in in dims:
                out.add(d_out)
                if i != slice(None):
                    ident = False
            d_in += 1
            d_out += 1
        if not out:
            return ("break", "indexing removed the channel dims")
        return ("pass", frozenset(out), ident)

    @staticmethod
    def _cat(user: fx.Node, src: fx.Node, dims: frozenset[int], nd: int | None) -> tuple:
        tensors = user.args[0]
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or src not in tensors or nd is None:
            return ("break", "secondary input of cat")
        if dims == {dim % nd}:
            first = tensors[0] is src
            return ("pass", dims, first)
        return ("break", "cat along a non-channel dim mixes units of different tensors")

    @staticmethod
    def _permute(user: fx.Node, dims: frozenset[int], identity: bool, nd: int | None, t: Any) -> tuple:
        if nd is None:
            return ("break", "permute of a tensor of unknown rank")
        if t in (torch.transpose, "transpose"):
            a, b = (user.args[1] % nd, user.args[2] % nd)
            perm = list(range(nd))
            perm[a], perm[b] = perm[b], perm[a]
        else:
            rest = user.args[1:]
            perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            perm = [p % nd for p in perm]
        inv = {src_d: out_d for out_d, src_d in enumerate(perm)}
        return ("pass", frozenset(inv[d] for d in dims), identity)


def _param_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names


def analyse_scale_invariance(model: nn.Module, example_input: Any = None, mode: str = "auto",
                             verify: bool = False) -> list[LayerReport]:
    """Verdict for every weight layer of ``model`` (see the module docstring).

    ``mode``: ``"fx"`` (concrete fx trace; raises if tracing fails), ``"runtime"`` (probe every layer
    numerically), ``"auto"`` (fx, falling back to the probe with a warning). ``verify`` probes the
    layers the fx analysis accepted and demotes (with a warning) any that fail.
    """
    if mode not in ("auto", "fx", "runtime"):
        raise ValueError(f"mode must be 'auto', 'fx' or 'runtime', got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_input if example_input is not None else default_example_input(model))
    reports: list[LayerReport] | None = None
    if mode in ("auto", "fx"):
        try:
            reports = _fx_reports(model, inputs)
        except Exception as e:  # tracing failures come in many types
            if mode == "fx":
                raise RuntimeError(f"find_scale_invariant: fx tracing of {type(model).__name__} failed "
                                   f"({type(e).__name__}: {e}); use mode='runtime'") from e
            warnings.warn(f"find_scale_invariant: fx tracing failed ({type(e).__name__}: {e}); using the "
                          f"runtime probe", stacklevel=2)
    if reports is None:
        return _runtime_reports(model, inputs)
    if verify:
        reports = _verify(model, inputs, reports)
    return reports


def find_scale_invariant(model: nn.Module, example_input: Any = None, *, mode: str = "auto",
                         verify: bool = False) -> list[PSIUnit]:
    """The PSI units of ``model``: weights whose every output path reaches a training-mode BN through
    channel-preserving, positively homogeneous ops (with their bias). ``example_input`` (a tensor or
    tuple) defaults to :func:`default_example_input`. See :func:`analyse_scale_invariance`."""
    return [PSIUnit(r.weight, r.bias, r.out_dim, r.module, r.norm)
            for r in analyse_scale_invariance(model, example_input, mode, verify) if r.invariant]


def _fx_reports(model: nn.Module, inputs: tuple[Any, ...]) -> list[LayerReport]:
    gm = _trace(model, inputs)
    names = _param_names(model)
    orig = dict(model.named_parameters(remove_duplicate=False))
    work_names = {id(p): n for n, p in gm.named_parameters(remove_duplicate=False)}
    analysis = _Analysis(gm)
    # every use of every parameter: ("producer", node, out_dim, role) or ("other", node)
    uses: dict[str, list[tuple]] = {}
    producers: list[tuple[fx.Node, str, str | None, int, str]] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = analysis.modules[node.target]
            w_role = None
            if isinstance(m, (*_CONV, nn.Linear)) or (isinstance(m, _CONVT) and m.groups == 1):
                w_role = 0 if not isinstance(m, _CONVT) else 1
            for pn, p in m.named_parameters(remove_duplicate=False):
                full = names.get(id(orig.get(f"{node.target}.{pn}", p)), f"{node.target}.{pn}")
                if w_role is not None and pn in ("weight", "bias"):
                    uses.setdefault(full, []).append(("producer", node, pn))
                else:
                    uses.setdefault(full, []).append(("other", node))
            if w_role is not None:
                wname = names.get(id(orig.get(f"{node.target}.weight")), f"{node.target}.weight")
                bname = None
                if getattr(m, "bias", None) is not None:
                    bname = names.get(id(orig.get(f"{node.target}.bias")), f"{node.target}.bias")
                producers.append((node, wname, bname, w_role, node.target))
        elif node.op == "get_attr":
            tgt = str(node.target)
            if tgt not in orig:
                continue
            full = names[id(orig[tgt])]
            for user in node.users:
                if user.op == "call_function" and user.target in _FCONV and len(user.args) > 1 \
                        and user.args[1] is node:
                    uses.setdefault(full, []).append(("producer", user, "weight"))
                    b = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
                    bname = None
                    if isinstance(b, fx.Node) and b.op == "get_attr" and str(b.target) in orig:
                        bname = names[id(orig[str(b.target)])]
                    producers.append((user, full, bname, 0, user.name))
                elif user.op == "call_function" and user.target in _FCONV and len(user.args) > 2 \
                        and user.args[2] is node:
                    uses.setdefault(full, []).append(("producer", user, "bias"))
                else:
                    uses.setdefault(full, []).append(("other", user))
    del work_names
    # verdict per producer node, then per weight (all its uses must be invariant producers)
    node_ok: dict[str, tuple[bool, str, set[str], bool]] = {}
    for node, _, _, _, _ in producers:
        v = node.meta.get("val")
        if not isinstance(v, Tensor):
            node_ok[node.name] = (False, "output is not a tensor", set(), False)
            continue
        is_linear = node.op == "call_module" and isinstance(analysis.modules[node.target], nn.Linear) \
            or node.op == "call_function" and node.target is F.linear
        cdim = v.dim() - 1 if is_linear else 1
        node_ok[node.name] = analysis.explore(node, cdim)
    reports: dict[str, LayerReport] = {}
    for _, wname, bname, out_dim, module in producers:
        if wname in reports:
            continue
        ok, reason = True, ""
        norms: set[str] = set()
        ident = True
        for use in uses.get(wname, []):
            if use[0] != "producer" or use[2] != "weight":
                where = use[1].target if use[0] == "other" else "a bias slot"
                ok, reason = False, f"weight also used by {where}"
                break
            nok, nreason, nnorms, nident = node_ok[use[1].name]
            if not nok:
                ok, reason = False, nreason
                break
            norms |= nnorms
            ident = ident and nident
        if ok and bname is not None:
            wnodes = {u[1].name for u in uses.get(wname, [])}
            bnodes = {u[1].name for u in uses.get(bname, []) if u[0] == "producer" and u[2] == "bias"}
            if len(uses.get(bname, [])) != len(bnodes) or bnodes != wnodes:
                ok, reason = False, "bias shared with another layer"
        if ok and not uses.get(wname):
            ok, reason = False, "never used in the traced forward"
        norm = None
        if ok and ident and len(norms) == 1 and None not in norms:
            norm = next(iter(norms))
        reports[wname] = LayerReport(module, wname, bname, out_dim, ok,
                                     reason if not ok else "absorbed by BN", norm)
    return list(reports.values())


# -- the runtime probe -------------------------------------------------------------------------
def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (*_CONV, nn.Linear)):
            out.append((name, m, 0))
        elif isinstance(m, _CONVT) and m.groups == 1:
            out.append((name, m, 1))
    return out


def probe_invariance(model: nn.Module, example_input: Any, modules: list[str], seed: int = 0,
                     rtol: float = 1e-6) -> bool:
    """Rescale every unit of the weight layers ``modules`` (with bias) by random factors in
    [0.5, 2] on a float64 copy with BN eps 1e-12 and compare train-mode outputs (same RNG for
    dropout). True when the relative output change is below ``rtol``."""
    work = copy.deepcopy(model).double()
    for m in work.modules():
        if isinstance(m, (_BatchNorm, _InstanceNorm)):
            m.eps = 1e-12
    inputs = tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
                   for x in _as_tuple(example_input))
    state = copy.deepcopy(work.state_dict())
    gen = torch.Generator().manual_seed(seed)

    def run() -> list[Tensor]:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return [t for t in tree_leaves(work(*inputs)) if isinstance(t, Tensor)]

    before = run()
    work.load_state_dict(state)
    with torch.no_grad():
        for name in modules:
            m = work.get_submodule(name)
            od = 1 if isinstance(m, _CONVT) else 0
            n_out = m.weight.shape[od]
            a = 0.5 + 1.5 * torch.rand(n_out, generator=gen, dtype=torch.float64)
            shape = [1] * m.weight.dim()
            shape[od] = -1
            m.weight.mul_(a.view(shape))
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(a)
    after = run()
    for x, y in zip(before, after):
        scale = x.abs().max().clamp_min(1e-30)
        if not bool(((x - y).abs().max() / scale) < rtol):
            return False
    return True


def _runtime_reports(model: nn.Module, inputs: tuple[Any, ...]) -> list[LayerReport]:
    names = _param_names(model)
    out = []
    for name, m, od in _candidates(model):
        ok = probe_invariance(model, inputs, [name])
        bias = names[id(m.bias)] if getattr(m, "bias", None) is not None else None
        out.append(LayerReport(name, names[id(m.weight)], bias, od, ok,
                               "probe: output unchanged" if ok else "probe: output changed", None))
    return out


def _verify(model: nn.Module, inputs: tuple[Any, ...], reports: list[LayerReport]) -> list[LayerReport]:
    mods = dict(model.named_modules())
    accepted = [r for r in reports if r.invariant and r.module in mods]
    if not accepted or probe_invariance(model, inputs, [r.module for r in accepted]):
        return reports
    out = []
    for r in reports:
        if r.invariant and r.module in mods and not probe_invariance(model, inputs, [r.module]):
            warnings.warn(f"find_scale_invariant: {r.weight} passed the graph analysis but fails the numeric "
                          f"probe; treating it as Euclidean", stacklevel=3)
            r = LayerReport(r.module, r.weight, r.bias, r.out_dim, False, "numeric probe failed", None)
        out.append(r)
    return out
