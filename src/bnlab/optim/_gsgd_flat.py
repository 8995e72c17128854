"""The flat fast path of :class:`bnlab.optim.gsgd.GSGD`: blocks sharing hyper-parameters held in flat buffers.

When a batch of path-space blocks (same hyper-parameters, dtype and device) has contiguous weights and
gradients, no ``wnorm``/``maximize`` and complete momentum state, its layer-1 weights become views of one flat
vector ``W1`` and its layers >= 2 views of another, ``W2`` (``p.data`` set once, values copied), and so do the
momentum buffers (``B1``, ``B2``) and the skeleton buffers. A step is then a few dozen whole-batch ops (431
ATen calls on a ResNet-56 instead of 3,003, most of them the per-tensor copies of the gradient gather):

* the gradients are gathered into flat buffers ``G1``/``G2`` (one ``_foreach_copy_``) when the batch is small
  (<= ``GATHER_MAX`` elements: there the ~3 ops per tensor it saves cost more than the copy); in a large batch
  they are read where autograd left them (``torch._foreach_*`` and per-layer ops, no copy);
* ``v``, the layer-1 skeleton gradient and the skeleton entries kept constant in layers >= 2 come from one
  ``index_select`` each (global flat offsets); the check's sum of the layer-1 gradients is one ``sum``;
* ``sigma = sum_{o,taps} (N w g)[o, k]`` is one product ``W2 * G2`` into a scratch, one column sum per *run*
  (consecutive layers >= 2 of equal shape, viewed as one ``(n, C_out, H taps)`` tensor), one taps reduction and
  one gather of the skeleton terms;
* layer 1 is ``B1 <- m B1 + d``, ``W1 <- W1 - lr B1`` (three flat ops), then ``v R`` by one ``index_copy_``;
* layers >= 2 take their per-input-channel coefficients (``1/R``, ``-lr/(v R)``, ``1/v``, ...) from one
  ``index_select`` of the (n, sum H) coefficient vectors into a persistent buffer whose ``(n, 1, H taps)``
  views broadcast against each run: ``B2 <- m B2 + e G2``, ``W2 <- a W2 + c B2`` are a few ops per run.

Every element goes through the same floating-point operations, in the same order, as the per-block path of
``GSGD`` (``flat=False``): the two are bit-identical (tests/test_gsgd_flat.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..path.skeleton import skeleton_mask

__all__ = ["FlatBatch", "batch_key", "eligible", "skeleton_entries"]

GATHER_MAX = 1 << 21  # batches up to this many elements copy their gradients into flat buffers


def skeleton_entries(shape: torch.Size, role: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """The ``H`` skeleton entries of a weight of ``shape``, ordered by hidden channel ``k`` (rows of layer
    1, input channels of layers >= 2): their indices (H, dim) and row-major flat offsets (H,)."""
    nz = skeleton_mask(shape, role, device).nonzero()
    nz = nz[torch.argsort(nz[:, 0 if role == "first" else 1], stable=True)]
    strides = torch.tensor(torch.empty(shape, device="meta").stride(), device=device)
    return nz, (nz * strides).sum(1)


def batch_key(groups: list[dict[str, Any]]) -> tuple[Any, ...]:
    """Identity of a batch: its groups, their sizes and the storage addresses of their tensors (a replaced
    ``p.data``, a dtype or device change all allocate new storage)."""
    return (tuple(map(id, groups)), tuple(len(g["params"]) for g in groups),
            tuple(p.data_ptr() for g in groups for p in g["params"]))


def eligible(groups: list[dict[str, Any]], state: Any) -> bool:
    """True when a flat layout can be built for this batch: contiguous float weights of one dtype/device, no
    ``wnorm``/``maximize``, and (with momentum) every block's momentum and skeleton buffers present (the first
    step, which creates them, runs on the per-block path). The gradients are checked each step by
    :meth:`FlatBatch.load_grads`."""
    hp = groups[0]
    if hp["wnorm"] or hp["maximize"] or not isinstance(hp["lr"], (int, float)):
        return False
    p0 = groups[0]["params"][0]
    if p0.dtype not in (torch.float32, torch.float64):
        return False
    for g in groups:
        if not all(p.is_contiguous() and p.dtype == p0.dtype and p.device == p0.device for p in g["params"]):
            return False
        if hp["momentum"] != 0:
            st = state.get(g["params"][0], {})
            if st.get("skeleton_buffer") is None or \
                    any(state.get(p, {}).get("momentum_buffer") is None for p in g["params"]):
                return False
    return True


class FlatBatch:
    """Flat storage and cached indices of one batch of blocks (see the module docstring).

    Built from the batch's current weights and state; afterwards the parameters, ``state[p]
    ["momentum_buffer"]`` and ``state[first]["skeleton_buffer"]`` are views of the flat buffers. ``key``:
    :func:`batch_key` after the move; :meth:`valid` also checks that the state still holds the views
    (``load_state_dict`` replaces them: the batch is then rebuilt from the loaded values). ``gather``: the
    gradients are copied into flat buffers each step (default: batches of at most ``GATHER_MAX`` elements).
    """

    def __init__(self, groups: list[dict[str, Any]], state: Any, gather: bool | None = None) -> None:
        p0 = groups[0]["params"][0]
        dt, dev = p0.dtype, p0.device
        self.groups = groups
        self.firsts = [g["params"][0] for g in groups]
        self.rest = [p for g in groups for p in g["params"][1:]]
        self.params = self.firsts + self.rest
        self.sizes = [p.shape[0] for p in self.firsts]            # H per block
        n1 = [p.numel() for p in self.firsts]
        n2 = [p.numel() for p in self.rest]
        self.gather_mode = sum(n1) + sum(n2) <= GATHER_MAX if gather is None else gather
        new = lambda n: torch.empty(n, dtype=dt, device=dev)      # noqa: E731
        self.W1, self.W2 = new(sum(n1)), new(sum(n2))
        self.w1 = [v.view(p.shape) for v, p in zip(self.W1.split(n1), self.firsts)]
        self.w2 = [v.view(p.shape) for v, p in zip(self.W2.split(n2), self.rest)]
        self.w2r = [v.view(v.shape[0], -1) for v in self.w2]      # (C_out, H taps) rows
        torch._foreach_copy_(self.w1 + self.w2, [p.detach() for p in self.params])
        for p, v in zip(self.params, self.w1 + self.w2):
            p.data = v
        self.G1 = self.G2 = None
        self.gviews: list[Tensor] = []
        if self.gather_mode:
            self.G1, self.G2 = new(sum(n1)), new(sum(n2))
            self.gviews = [v.view(p.shape) for v, p in zip(self.G1.split(n1), self.firsts)] + \
                [v.view(p.shape) for v, p in zip(self.G2.split(n2), self.rest)]
        # skeleton offsets into W1 (ordered by block, then k) and into W2 (by layer, then k)
        self.local1 = [skeleton_entries(p.shape, "first", dev)[1] for p in self.firsts]
        self.local2: list[Tensor] = []
        off, parts1, parts2 = 0, [], []
        for loc, n in zip(self.local1, n1):
            parts1.append(loc + off)
            off += n
        off = 0
        starts = torch.tensor([0, *self.sizes]).cumsum(0)[:-1].tolist()
        layer_k, cidx, shapes = [], [], []
        for g, s in zip(groups, starts):
            for p, role in zip(g["params"][1:], g["roles"][1:]):
                self.local2.append(skeleton_entries(p.shape, role, dev)[1])
                parts2.append(self.local2[-1] + off)
                off += p.numel()
                h, taps = p.shape[1], p[0, 0].numel()
                layer_k.append(torch.arange(h, device=dev) + s)
                cidx.append(torch.arange(h, device=dev).repeat_interleave(taps) + s)
                shapes.append((p.shape[0], h * taps, taps))
        self.skel1, self.skel2 = torch.cat(parts1), torch.cat(parts2)
        self.layer_k, self.cidx = torch.cat(layer_k), torch.cat(cidx)   # k of each layer's H entries / columns
        self.two_layer = all(len(g["params"]) == 2 for g in groups)     # sigma of a layer is its block's
        # runs: consecutive layers >= 2 of one shape, (elem start, elem stop, column start, n, C_out, H taps)
        self.runs: list[tuple[int, int, int, int, int, int]] = []
        e = c = 0
        for (o, cols, _t), n in zip(shapes, n2):
            r = self.runs[-1] if self.runs else None
            if r is not None and r[4] == o and r[5] == cols:
                self.runs[-1] = (r[0], e + n, r[2], r[3] + 1, o, cols)
            else:
                self.runs.append((e, e + n, c, 1, o, cols))
            e, c = e + n, c + cols
        self.layer_taps = [t for _o, _c, t in shapes]
        self.layer_cols = [cols for _o, cols, _t in shapes]
        self.dense = new(c)                                      # column sums of every layer, in order
        self.dense_v = list(self.dense.split(self.layer_cols))
        if self.gather_mode:
            self.scratch = torch.empty_like(self.W2)
        else:  # one scratch as large as the largest layer, reused: the products stay in cache
            self.scratch = new(max(n2))
            self.sr = [self.scratch[:n].view(p.shape[0], -1) for n, p in zip(n2, self.rest)]
            self.skterm = new(sum(p.shape[1] for p in self.rest))
            self.skterm_v = list(self.skterm.split([p.shape[1] for p in self.rest]))
        self.coef: Tensor | None = None
        self.coef_runs: list[list[Tensor]] = []
        self.coef_layers: list[list[Tensor]] = []
        self.B1 = self.B2 = self.SB = None
        self.b1: list[Tensor] = []
        self.b2: list[Tensor] = []
        self.b2r: list[Tensor] = []
        self.sb: list[Tensor] = []
        if groups[0]["momentum"] != 0:
            self.B1, self.B2, self.SB = new(sum(n1)), new(sum(n2)), new(sum(self.sizes))
            self.b1 = [v.view(p.shape) for v, p in zip(self.B1.split(n1), self.firsts)]
            self.b2 = [v.view(p.shape) for v, p in zip(self.B2.split(n2), self.rest)]
            self.b2r = [v.view(v.shape[0], -1) for v in self.b2]
            self.sb = list(self.SB.split(self.sizes))
            torch._foreach_copy_(self.b1 + self.b2 + self.sb,
                                 [state[p]["momentum_buffer"] for p in self.params] +
                                 [state[p]["skeleton_buffer"] for p in self.firsts])
            for p, v in zip(self.params, self.b1 + self.b2):
                state[p]["momentum_buffer"] = v
            for p, v in zip(self.firsts, self.sb):
                state[p]["skeleton_buffer"] = v
        self.sdicts = [state[p] for p in self.params]  # per-parameter state dicts (no tensor hashing per step)
        self.key = batch_key(groups)
        self.g1: list[Tensor] = []
        self.g2: list[Tensor] = []

    def valid(self, groups: list[dict[str, Any]], state: Any) -> bool:
        """The cached layout still describes ``groups`` and ``state``: same groups and storages, and the
        state still holds the flat views (``GSGD.load_state_dict`` drops the layouts anyway)."""
        if batch_key(groups) != self.key or (self.B1 is None) != (groups[0]["momentum"] == 0):
            return False
        if self.B1 is None:
            return True
        if state.get(self.params[0]) is not self.sdicts[0]:     # a new state mapping
            return False
        return all(d.get("momentum_buffer") is v for d, v in zip(self.sdicts, self.b1 + self.b2)) and \
            all(d.get("skeleton_buffer") is v for d, v in zip(self.sdicts, self.sb))

    def _run(self, flat: Tensor, r: tuple[int, int, int, int, int, int]) -> Tensor:
        return flat[r[0]:r[1]].view(r[3], r[4], r[5])

    # -- read-only part --------------------------------------------------------------------------
    def load_grads(self) -> bool:
        """Take this step's gradients (gather mode: copied into ``G1``/``G2``, one dispatch). False (nothing
        done) when one is missing, sparse or not a dense contiguous tensor of the weights' dtype."""
        gs = [p.grad for p in self.params]
        for g in gs:
            if g is None or g.is_sparse or g.dtype != self.W1.dtype or g.device != self.W1.device or \
                    not (self.gather_mode or g.is_contiguous()):
                return False
        nf = len(self.firsts)
        if self.gather_mode:
            torch._foreach_copy_(self.gviews, gs)
            self.g1, self.g2 = self.gviews[:nf], self.gviews[nf:]
        else:
            self.g1, self.g2 = gs[:nf], gs[nf:]
        return True

    def layer1_sum(self) -> Tensor:
        """Sum of the layer-1 gradients: (1,) (gather mode) or (blocks,); non-finite iff one of them is."""
        if self.G1 is not None:
            return self.G1.sum().view(1)
        return torch.stack([g.sum() for g in self.g1])

    def skeleton_values(self) -> tuple[Tensor, Tensor]:
        """``v`` (sum H,) from the flat weights and the layer-1 skeleton gradient ``gs`` (sum H,)."""
        v = self.W1.index_select(0, self.skel1)
        if self.G1 is not None:
            return v, self.G1.index_select(0, self.skel1)
        parts = [g.view(-1).index_select(0, off) for g, off in zip(self.g1, self.local1)]
        return v, torch.cat(parts) if len(parts) > 1 else parts[0]

    def sigma(self) -> Tensor:
        """``sigma_k = sum_{l>=2} sum_{o, taps} (N^l U^l g^l)[o, k]`` (sum H,): dense column sums, taps
        reduction, minus the skeleton term (the per-block path's ``_sigma_term``), summed over layers in order."""
        if self.G2 is not None:
            torch.mul(self.W2, self.G2, out=self.scratch)
            for r in self.runs:
                torch.sum(self._run(self.scratch, r), 1, out=self.dense[r[2]:r[2] + r[3] * r[5]].view(r[3], r[5]))
            sk = self.scratch.index_select(0, self.skel2)
        else:
            for w, g, s, d, off, t in zip(self.w2r, self.g2, self.sr, self.dense_v, self.local2, self.skterm_v):
                torch.mul(w, g.view(w.shape), out=s)
                torch.sum(s, 0, out=d)
                torch.index_select(s.view(-1), 0, off, out=t)
            sk = self.skterm
        if len(set(self.layer_taps)) == 1:
            t = self.layer_taps[0]
            per = self.dense.view(-1, t).sum(1) if t > 1 else self.dense
        else:
            per = torch.cat([d.view(-1, t).sum(1) if t > 1 else d for d, t in zip(self.dense_v, self.layer_taps)])
        per = per - sk
        if self.two_layer:
            return per
        # blocks with mid layers: sigma = term_2 + term_3 + ... in layer order (index_add_ is sequential)
        return per.new_zeros(sum(self.sizes)).index_add_(0, self.layer_k, per)

    # -- in-place part ---------------------------------------------------------------------------
    def coefficients(self, vecs: Tensor) -> None:
        """``vecs`` (n, sum H) per-input-channel coefficients -> for each of the n, a ``(layers, 1, H taps)``
        view per run and a ``(1, H taps)`` one per layer (each k repeated ``taps`` times), views of a
        persistent buffer filled by one gather."""
        n = vecs.shape[0]
        if self.coef is None or self.coef.shape[0] != n or self.coef.dtype != vecs.dtype:
            self.coef = vecs.new_empty(n, self.cidx.numel())
            self.coef_runs = [[row[r[2]:r[2] + r[3] * r[5]].view(r[3], 1, r[5]) for r in self.runs]
                              for row in self.coef.unbind(0)]
            self.coef_layers = [[c.view(1, -1) for c in row.split(self.layer_cols)] for row in self.coef.unbind(0)]
        torch.index_select(vecs, 1, self.cidx, out=self.coef)

    def update_rest(self, mom: float, wd: float, nest: bool) -> None:
        """Layers >= 2 (``GSGD._apply``): ``buf <- mom buf + e g (+ f U)``, ``U <- a U [+ b g] [+ c buf]``
        off the skeleton, with the :meth:`coefficients` a [, b], c, e [, f] (momentum) or a, b (none)."""
        keep = self.W2.index_select(0, self.skel2)
        i = 1 if nest else 0
        if self.G2 is not None:
            rows = self.coef_runs
            if mom != 0:
                self.B2.mul_(mom)
                for k, r in enumerate(self.runs):
                    self._run(self.B2, r).addcmul_(self._run(self.G2, r), rows[i + 2][k])
                    if wd:
                        self._run(self.B2, r).addcmul_(self._run(self.W2, r), rows[i + 3][k])
                self.B2.index_fill_(0, self.skel2, 0)
            for k, r in enumerate(self.runs):
                w = self._run(self.W2, r)
                w.mul_(rows[0][k])
                if mom == 0 or nest:
                    w.addcmul_(self._run(self.G2, r), rows[1][k])
                if mom != 0:
                    w.addcmul_(self._run(self.B2, r), rows[i + 1][k])
        else:
            rows = self.coef_layers
            g2r = [g.view(w.shape) for g, w in zip(self.g2, self.w2r)]
            if mom != 0:
                self.B2.mul_(mom)
                torch._foreach_addcmul_(self.b2r, g2r, rows[i + 2])
                if wd:
                    torch._foreach_addcmul_(self.b2r, self.w2r, rows[i + 3])
                self.B2.index_fill_(0, self.skel2, 0)
            torch._foreach_mul_(self.w2r, rows[0])
            if mom == 0 or nest:
                torch._foreach_addcmul_(self.w2r, g2r, rows[1])
            if mom != 0:
                torch._foreach_addcmul_(self.w2r, self.b2r, rows[i + 1])
        self.W2.index_copy_(0, self.skel2, keep)

    def update_first(self, lr: float, mom: float, damp: float, wd: float, nest: bool, vR: Tensor) -> None:
        """Layer 1 (``GSGD._apply``): ``torch.optim.SGD``'s update off the skeleton, ``v_k R_k`` on it."""
        def add_grads(out: Tensor, outs: list[Tensor], alpha: float) -> None:
            if self.G1 is not None:
                out.add_(self.G1, alpha=alpha)
            else:
                torch._foreach_add_(outs, self.g1, alpha=alpha)

        if mom != 0:
            self.B1.mul_(mom)
            add_grads(self.B1, self.b1, 1 - damp)
            if wd:
                self.B1.add_(self.W1, alpha=wd * (1 - damp))
            self.B1.index_fill_(0, self.skel1, 0)
        if mom == 0 or nest:
            if wd:
                self.W1.mul_(1 - lr * wd)
            add_grads(self.W1, self.w1, -lr)
            if nest:
                self.W1.add_(self.B1, alpha=-lr * mom)
        else:
            self.W1.add_(self.B1, alpha=-lr)
        self.W1.index_copy_(0, self.skel1, vR)
