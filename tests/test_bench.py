"""Smoke tests of ``bnlab bench`` (never assert a timing) and unit tests of the timing helper."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bnlab.benchmarks import FAMILIES, run_benchmarks
from bnlab.benchmarks.data import naive_batches
from bnlab.benchmarks.timing import Result, Settings, compare, format_row, machine_info


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    rc = run_benchmarks(quick=True, device="cpu", json_out=str(out), only=None, threads=1)
    return rc, json.loads(out.read_text())


def test_quick_run_every_benchmark_finite(quick_run):
    rc, doc = quick_run
    assert rc == 0
    rows = doc["results"]
    names = {r["name"] for r in rows}
    # every family produced rows, or was skipped with a reason
    for prefix in ("norm/", "optim/", "train/", "data/"):
        assert any(n.startswith(prefix) for n in names), (prefix, sorted(names))
    assert any(n.startswith("convex/") for n in names) or doc["skipped"].get("convex")
    expected = {"norm/BatchNormAct", "train/bn+sgd", "train/e2e bnlab train", "data/DeviceLoader augment"}
    assert expected <= names
    for r in rows:
        for key in ("ours_ms", "baseline_ms", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, r
        assert r["device"] == "cpu" and r["shape"] and r["dtype"]
        assert r["ratio"] == pytest.approx(r["ours_ms"] / r["baseline_ms"])


def test_json_machine_info(quick_run):
    _, doc = quick_run
    for key in ("cpu", "cores", "torch", "date", "torch_threads"):
        assert key in doc["machine"], key
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["quick"] is True


def test_threads_restored():
    before = torch.get_num_threads()
    run_benchmarks(quick=True, device="cpu", json_out=None, only=["data"], threads=1)
    assert torch.get_num_threads() == before


def test_compare_interleaves_and_warms_up():
    calls: list[str] = []
    ours_ms, base_ms = compare(lambda: calls.append("o"), lambda: calls.append("b"),
                               Settings(warmup=2, reps=4, min_sample_s=0.0))
    assert calls[:4] == ["o", "b", "o", "b"]  # warm-up
    assert calls[4:] == ["o", "b", "b", "o", "o", "b", "b", "o"]  # order flips every round
    assert math.isfinite(ours_ms) and math.isfinite(base_ms)


def test_compare_inner_calibration_counts_calls():
    n = {"o": 0, "b": 0}

    def ours():
        n["o"] += 1

    def base():
        n["b"] += 1
        sum(range(2000))

    compare(ours, base, Settings(warmup=1, reps=3, min_sample_s=1e-3))
    assert n["o"] == n["b"] > 4  # same number of calls on both sides, several per sample


def test_result_ratio_and_target():
    r = Result("x", 3.0, 2.0, "4x4", "float32", "cpu", target=1.3)
    assert r.ratio == 1.5 and r.met is False
    assert Result("y", 1.0, 2.0, "s", "float32", "cpu", target=1.3).met is True
    assert Result("z", 1.0, 2.0, "s", "float32", "cpu").met is None
    assert "MISS" in format_row(r) and r.to_dict()["ratio"] == 1.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(only=["bogus"]), "bogus"),
    (dict(device="tpu"), "tpu"),
    (dict(threads=0), "threads"),
])
def test_errors_name_the_value(kwargs, match):
    args = dict(quick=True, device="cpu", json_out=None, only=["data"])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_benchmarks(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_unavailable_error():
    with pytest.raises(ValueError, match="cuda"):
        run_benchmarks(quick=True, device="cuda", json_out=None, only=["data"])


def test_naive_baseline_is_a_crop_flip_of_the_source():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    mean, std = torch.zeros(3), torch.ones(3)
    (batch,) = list(naive_batches(x, mean, std, 6, 0, torch.Generator().manual_seed(1)))
    assert batch.shape == (6, 3, 8, 8) and batch.dtype == torch.float32
    src = x.float() / 255
    # with padding 0 each output is a source image, possibly flipped; together a permutation
    matched = []
    for img in batch:
        hits = [i for i in range(6) if torch.equal(img, src[i]) or torch.equal(img, src[i].flip(2))]
        assert len(hits) >= 1
        matched.append(hits[0])
    assert sorted(matched) == list(range(6))


def test_machine_info_cpu():
    info = machine_info("cpu")
    assert info["cores"] >= 1 and "gpu" not in info


def test_families_listed():
    assert set(FAMILIES) == {"norms", "optim", "train", "convex", "data"}


# -- speed edits in bnlab.nn.stats / bnlab.nn.norm_act: same numbers as the plain formulas --------
def test_channel_affine_matches_formula_and_gradcheck():
    from bnlab.nn.stats import channel_affine

    torch.manual_seed(0)
    for shape in [(4, 3), (4, 3, 5), (2, 3, 4, 5)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        view = [1, 3] + [1] * (len(shape) - 2)
        ref = x * w.view(view) + b.view(view)
        out = channel_affine(x, w, b)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(channel_affine(x, None, b), x + b.view(view))
        torch.testing.assert_close(channel_affine(x, w, None), x * w.view(view))
    xs = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_affine, (xs, w, b))
    xh = torch.randn(2, 3, 4, 4).bfloat16()  # CPU half input, fp32 parameters: plain path
    w32 = torch.randn(3)
    out = channel_affine(xh, w32, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, xh * w32.bfloat16().view(1, 3, 1, 1))
    xc = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert channel_affine(xc, w32, None).is_contiguous(memory_format=torch.channels_last)


def test_standardize_affine_override_equals_affine_bn():
    from bnlab.nn.stats import BatchStats

    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for center_only in (False, True):
        ours = BatchStats(4, affine=False, center_only=center_only).double()
        ref_norm = BatchStats(4, affine=False, center_only=center_only).double()
        out = ours.standardize(x, w, b)
        ref = ref_norm(x) * w.view(1, 4, 1, 1) + b.view(1, 4, 1, 1)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.running_mean, ref_norm.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(ours.running_var, ref_norm.running_var, rtol=0, atol=0)
    bn = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    torch.testing.assert_close(BatchStats(4, affine=False).double().standardize(x, w, b), bn(x),
                               rtol=0, atol=0)


def test_batchnormact_inplace_relu_matches_bn_relu_exactly():
    from bnlab.nn.norm_act import Affine, BatchNormAct

    torch.manual_seed(0)
    x = torch.randn(8, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    ours = BatchNormAct(5, "relu").double()
    ref = torch.nn.Sequential(torch.nn.BatchNorm2d(5), torch.nn.ReLU()).double()
    with torch.no_grad():
        for m in (ours, ref[0]):
            m.weight.copy_(torch.linspace(-1, 2, 5))
            m.bias.copy_(torch.linspace(-0.5, 0.5, 5))
    out, r = ours(x), ref(x)
    assert torch.equal(out, r)
    g = torch.randn_like(r)
    for a, b in zip(torch.autograd.grad(out, [x, ours.weight, ours.bias], g),
                    torch.autograd.grad(r, [x, ref[0].weight, ref[0].bias], g)):
        assert torch.equal(a, b)
    assert torch.equal(ours.running_var, ref[0].running_var)
    aff = Affine(5).double()
    with torch.no_grad():
        aff.weight.copy_(torch.linspace(-1, 2, 5))
        aff.bias.uniform_()
    torch.testing.assert_close(aff(x), x * aff.weight.view(1, 5, 1, 1) + aff.bias.view(1, 5, 1, 1),
                               rtol=1e-12, atol=1e-12)




def test_markdown_table(quick_run):
    from bnlab.benchmarks.timing import markdown_table

    _, doc = quick_run
    table = markdown_table(doc["results"]).splitlines()
    assert len(table) == len(doc["results"]) + 2
    assert all(line.count("|") >= 8 for line in table)


def test_convex_table_parsing():
    from bnlab.benchmarks.convex import parse_table

    text = ("n, k, P | Clarabel | SCS (rel, ratio) | bnlab AL (rel, viol) | pyscnn AL (rel, viol, ratio)\n"
            "60, 5, 30 | 1.25 | 0.50 (+6.3e-06, x0.00) | 257.21 (-2.0e-05, 2e-05) | not installed | x0.00\n"
            "100, 10, 50 | 2.00 | 1.00 (+1e-06, x0.5) | 4.00 (1e-05, 1e-06) | 8.00 (1e-5, 1e-6, x2.0) | x0.5\n")
    rows = parse_table(text)
    assert [r.name for r in rows] == ["convex/AL vs Clarabel", "convex/AL vs SCS", "convex/AL vs Clarabel",
                                      "convex/AL vs SCS", "convex/AL vs pyscnn"]
    assert rows[0].ours_ms == pytest.approx(257210) and rows[0].baseline_ms == pytest.approx(1250)
    assert rows[4].ratio == pytest.approx(0.5) and rows[2].shape == "n=100 k=10 P=50"
