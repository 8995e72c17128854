"""The device-resident loader (``DeviceLoader``, ``augment_batch``, ``normalize_batch``) and
``ImageDataset.subset``: determinism, real crops/flips against a naive per-sample reference, DDP
sharding, stratification."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bnlab.data import (
    DeviceLoader,
    ImageDataset,
    augment_batch,
    from_numpy,
    normalize_batch,
    stratified_subset,
)


def _images(n: int = 24, c: int = 3, h: int = 6, w: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.uint8)  # 1..255: padding is distinct


def _loader(x, y, **kw) -> DeviceLoader:
    kw.setdefault("batch_size", 5)
    return DeviceLoader(x, y, mean=[0.5] * x.shape[1], std=[0.25] * x.shape[1], **kw)


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


# ------------------------------------------------------------------------------------------ augment
def _naive_candidates(img: torch.Tensor, p: int, flip: bool) -> list[torch.Tensor]:
    """Every crop of the zero-padded image at every offset, with and without flip (per-sample loops)."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=img.dtype)
    padded[:, p : p + h, p : p + w] = img
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out.append(crop)
            if flip:
                out.append(crop.flip(2))
    return out


@pytest.mark.parametrize("p", [1, 2, 4])
def test_crops_are_real_shifts_of_padded_image(p):
    x = _images(40)
    out = augment_batch(x, p, True, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(len(x)):
        assert any(torch.equal(out[i], cand) for cand in _naive_candidates(x[i], p, True)), i


def test_augment_matches_naive_loop_with_same_draws():
    # same draws as the batched code (dx, dy, then flip), applied by a per-sample loop
    x, p = _images(30), 3
    out = augment_batch(x, p, True, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    dx = torch.randint(0, 2 * p + 1, (30,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (30,), generator=g)
    fl = torch.rand(30, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(30):
        ref = padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 7]
        ref = ref.flip(2) if fl[i] else ref
        assert torch.equal(out[i], ref)


def test_offsets_and_flips_cover_all_cases():
    x, p = _images(1).expand(2000, -1, -1, -1).contiguous(), 2
    out = augment_batch(x, p, True, torch.Generator().manual_seed(0))
    cands = _naive_candidates(x[0], p, True)
    hits = torch.zeros(len(cands), dtype=torch.long)
    for o in out:
        hits[[k for k, cnd in enumerate(cands) if torch.equal(o, cnd)][0]] += 1
    assert (hits > 0).all()  # every (dy, dx, flip) occurs
    flipped = hits[1::2].sum().item()
    assert 850 < flipped < 1150  # p = 1/2


def test_flip_only_and_identity():
    x = _images(50)
    out = augment_batch(x, 0, True, torch.Generator().manual_seed(1))
    is_id = (out == x).flatten(1).all(1)
    is_fl = (out == x.flip(3)).flatten(1).all(1)
    assert (is_id | is_fl).all() and is_fl.any() and is_id.any()
    assert torch.equal(augment_batch(x, 0, False, torch.Generator()), x)
    xf = x.float()  # any dtype
    assert torch.equal(
        augment_batch(xf, 2, True, torch.Generator().manual_seed(4)),
        augment_batch(x, 2, True, torch.Generator().manual_seed(4)).float(),
    )


def test_normalize_batch_float64_reference():
    x = _images(4)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    out = normalize_batch(x, mean, std, torch.float64)
    ref = (x.double() / 255 - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ loader
def test_determinism_per_seed_and_epoch():
    x, y = _images(23), torch.arange(23)
    a = _batches(_loader(x, y, augment=True, seed=7))
    b = _batches(_loader(x, y, augment=True, seed=7))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    ld = _loader(x, y, augment=True, seed=7)
    ld.set_epoch(1)
    c = _batches(ld)
    assert not torch.equal(torch.cat([t[1] for t in a]), torch.cat([t[1] for t in c]))  # new order
    d = _batches(_loader(x, y, augment=True, seed=8))
    assert not torch.equal(torch.cat([t[1] for t in a]), torch.cat([t[1] for t in d]))
    ld.set_epoch(0)  # going back to epoch 0 reproduces epoch 0
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, _batches(ld)))


def test_epoch_covers_dataset_and_normalises():
    x, y = _images(23), torch.arange(23)
    ld = _loader(x, y, shuffle=True, seed=1)
    bs = _batches(ld)
    assert len(bs) == len(ld) == 5 and [len(t[1]) for t in bs] == [5, 5, 5, 5, 3]
    ys = torch.cat([t[1] for t in bs])
    assert sorted(ys.tolist()) == list(range(23))
    xs = torch.cat([t[0] for t in bs])
    torch.testing.assert_close(xs, (x[ys].float() / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
    assert len(_loader(x, y, drop_last=True)) == 4 and len(_loader(x, y, max_batches=2)) == 2


def test_resume_mid_epoch():
    if not hasattr(DeviceLoader, "iter_from"):
        pytest.skip("DeviceLoader.iter_from not available")
    x, y = _images(23), torch.arange(23)
    ld = _loader(x, y, augment=True, seed=2)
    ld.set_epoch(3)
    full = _batches(ld)
    tail = [(a.clone(), b.clone()) for a, b in ld.iter_from(2)]
    assert len(tail) == len(full) - 2
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(full[2:], tail))


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_shards_disjoint_and_covering(world, drop_last):
    n = 23
    x, y = _images(n), torch.arange(n)
    shards = []
    for r in range(world):
        ld = _loader(x, y, seed=5, rank=r, world_size=world, drop_last=drop_last, batch_size=2, augment=True)
        ld.set_epoch(4)
        shards.append(torch.cat([t[1] for t in _batches(ld)]).tolist())
    seen = list(itertools.chain(*shards))
    assert len(seen) == len(set(seen))  # disjoint
    if drop_last:
        per = n // world
        assert all(len(s) == (per // 2) * 2 for s in shards)  # equal step counts on every rank
        g = torch.Generator().manual_seed(5 * 1_000_003 + 4)
        assert set(seen) <= set(torch.randperm(n, generator=g)[: per * world].tolist())
    else:
        assert sorted(seen) == list(range(n))  # every sample exactly once (evaluation)


def test_rank_validation():
    with pytest.raises(ValueError, match="rank"):
        _loader(_images(4), torch.arange(4), rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        _loader(_images(4), torch.arange(4), batch_size=0)


# ------------------------------------------------------------------------------------------ subset
def _dataset(counts=(50, 30, 15, 5)) -> ImageDataset:
    y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)]).astype(np.int64)
    rng = np.random.default_rng(0)
    rng.shuffle(y)
    x = rng.integers(0, 256, (len(y), 4, 4, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(len(y)) % 256  # makes rows identifiable
    return from_numpy("toy", x, y, x[:40], y[:40], [f"k{i}" for i in range(len(counts))])


def test_subset_stratified_and_seeded():
    ds = _dataset()
    sub = ds.subset(20, 10, seed=3)
    assert torch.bincount(sub.y_train, minlength=4).tolist() == [10, 6, 3, 1]  # 50:30:15:5 of 20
    assert len(sub.y_test) == 10
    again = ds.subset(20, 10, seed=3)
    assert torch.equal(sub.x_train, again.x_train) and torch.equal(sub.y_test, again.y_test)
    assert not torch.equal(ds.subset(20, seed=4).x_train, sub.x_train)
    # rows are real rows of the original, with their labels
    idx = stratified_subset(ds.y_train, 20, 3)
    assert torch.equal(sub.x_train, ds.x_train[idx]) and torch.equal(sub.y_train, ds.y_train[idx])
    assert len(set(idx.tolist())) == 20
    # statistics recomputed on the subset; metadata kept
    ref = sub.x_train.double().div(255).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(sub.mean, ref.numpy(), atol=1e-12)
    assert sub.crop_padding == ds.crop_padding and sub.classes == ds.classes


def test_subset_rounding_and_edges():
    ds = _dataset((7, 7, 7))
    counts = torch.bincount(ds.subset(10).y_train).tolist()
    assert sum(counts) == 10 and max(counts) - min(counts) <= 1
    assert torch.equal(ds.subset(10_000).x_train, ds.x_train)  # n >= len keeps everything
    whole = ds.subset(None, 5)
    assert torch.equal(whole.x_train, ds.x_train) and len(whole.y_test) == 5
    with pytest.raises(ValueError, match="subset size"):
        ds.subset(0)
