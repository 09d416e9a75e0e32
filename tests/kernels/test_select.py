"""kth_largest: the torch path against a descending sort (random rows, heavy ties, k = 1 and
k = L, per-row k), input validation, the Triton radix select run by Triton's interpreter on
tiny shapes (bit-equal to the torch path), and on CUDA the realistic R = 160, L = 224K
against torch.topk, and replay inside a CUDA graph."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from interpreted import run_interpreted

from hcpolicy.kernels.select import kth_largest, kth_largest_reference


def _sorted_truth(x: torch.Tensor, k_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ties) read off a descending sort: ties = copies of the k-th value among the first k."""
    ordered = x.sort(dim=1, descending=True).values  # [R, L]
    values = torch.stack([ordered[r, k - 1] for r, k in enumerate(k_rows)])  # [R]
    ties = torch.stack([(ordered[r, :k] == values[r]).sum() for r, k in enumerate(k_rows)])  # [R]
    return values, ties


def _check(x: torch.Tensor, k: int | torch.Tensor, got) -> None:
    k_rows = k.expand(x.shape[0]).tolist() if isinstance(k, torch.Tensor) else [k] * x.shape[0]
    values, ties = _sorted_truth(x, k_rows)
    assert got.values.dtype == torch.float32 and got.ties.dtype == torch.int64
    assert torch.equal(got.values, values), (got.values, values)
    assert torch.equal(got.ties, ties), (got.ties, ties)
    assert bool((got.ties >= 1).all())


def _rows(kind: str, gen: torch.Generator, rows: int = 4, length: int = 300) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(rows, length, generator=gen)
    if kind == "softmax":
        return torch.softmax(3 * torch.randn(rows, length, generator=gen), dim=1)
    if kind == "small_set":  # values from {0, 0.25, 0.5, 0.75}: every k lands in a long run
        return torch.randint(0, 4, (rows, length), generator=gen).float() / 4
    if kind == "zeros":
        x = torch.rand(rows, length, generator=gen)
        x[:, : length // 2] = 0.0  # half of each row is zero: k > L / 2 selects a zero
        x[0] = 0.0
        x[1, ::3] = -0.0  # -0.0 equals 0.0 (and ties with it)
        return x
    if kind == "constant":
        return torch.full((rows, length), 0.125)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["uniform", "softmax", "small_set", "zeros", "constant"])
@pytest.mark.parametrize("k", [1, 2, 150, 299, 300])
def test_reference_matches_sort(kind: str, k: int) -> None:
    x = _rows(kind, torch.Generator().manual_seed(k))
    got = kth_largest_reference(x, k)
    _check(x, k, got)
    public = kth_largest(x, k)  # off CUDA the public entry runs the reference
    assert torch.equal(public.values, got.values) and torch.equal(public.ties, got.ties)
    if kind == "constant":  # one value everywhere: the top-k takes k copies of it
        assert got.ties.tolist() == [k] * 4
    if kind == "zeros" and k > 150:
        assert got.values.view(torch.int32).tolist() == [0] * 4  # +0.0, never -0.0


def test_per_row_tensor_k() -> None:
    x = _rows("small_set", torch.Generator().manual_seed(5))
    k = torch.tensor([1, 77, 299, 300])
    _check(x, k, kth_largest(x, k))
    _check(x, torch.tensor(42, dtype=torch.int32), kth_largest(x, torch.tensor(42, dtype=torch.int32)))
    clamped = kth_largest(x, torch.tensor([0, -5, 301, 10**6]))  # not checked (a sync): clamped into [1, L]
    _check(x, torch.tensor([1, 1, 300, 300]), clamped)


def test_single_column_and_no_rows() -> None:
    x = torch.tensor([[0.5], [0.0]])
    got = kth_largest(x, 1)
    assert got.values.tolist() == [0.5, 0.0] and got.ties.tolist() == [1, 1]
    empty = kth_largest(torch.empty(0, 7), 3)
    assert empty.values.shape == (0,) and empty.ties.shape == (0,)


@pytest.mark.parametrize(
    "x, k, match",
    [
        (torch.rand(2, 5), 0, r"k must be in \[1, L\]"),
        (torch.rand(2, 5), 6, r"k must be in \[1, L\]"),
        (torch.rand(2, 5), True, "k must be an int"),
        (torch.rand(2, 5), 2.0, "k must be an int"),
        (torch.rand(2, 5), torch.tensor(2.0), "integer dtype"),
        (torch.rand(2, 5), torch.tensor(True), "integer dtype"),
        (torch.rand(2, 5), torch.tensor([1, 2, 3]), "scalar or"),
        (torch.rand(2, 5).double(), 1, "float32"),
        (torch.rand(2, 5).half(), 1, "float32"),
        (torch.rand(10), 1, r"\[R, L\]"),
        (torch.rand(2, 3, 4), 1, r"\[R, L\]"),
        (torch.rand(5, 2).T, 1, "contiguous"),
        (torch.rand(2, 0), 1, "at least one column"),
        ([[0.5, 0.25]], 1, "torch.Tensor"),
    ],
)  # fmt: skip
def test_validation(x, k, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kth_largest(x, k)
    with pytest.raises(ValueError, match=match):
        kth_largest_reference(x, k)


def test_backend_choice() -> None:
    x = torch.rand(2, 5)
    assert torch.equal(kth_largest(x, 2, backend="torch").values, kth_largest_reference(x, 2).values)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor"):
        kth_largest(x, 2, backend="triton")  # asked for explicitly: no silent fallback
    with pytest.raises(ValueError, match="backend must be one of"):
        kth_largest(x, 2, backend="cuda")


# Each case: R = 3 rows of L = 1000, with block 256 (four histogram programs a row, the
# last one partial, so the atomics add across programs; sparse last passes, block histograms,
# and sparse passes that fall back to block histograms for rows with many elements under the
# prefix: limit 0 for every row, 100 for some) and the default block (one masked
# program). Rows: ties from a small set with zeros, many exponents (subnormals, zeros,
# huge values, -0.0), uniform. Both results come back as int32 bits and must be equal.
INTERPRETER_SCRIPT = r"""
import json, torch
from hcpolicy.kernels.select import kth_largest_reference
from hcpolicy.kernels._select_triton import BLOCK, SPARSE_LIMIT, kth_largest_triton
gen = torch.Generator().manual_seed(0)
x = torch.empty(3, 1000)
x[0] = torch.randint(0, 5, (1000,), generator=gen).float() / 8  # {0, 1/8, ..., 1/2}
x[1] = torch.exp2(torch.empty(1000).uniform_(-155, 127, generator=gen)) * torch.rand(1000, generator=gen)
x[1, :40] = 0.0
x[1, 40:60] = -0.0
x[1, 60:70] = torch.finfo(torch.float32).tiny / 3  # subnormal ties
x[2] = torch.rand(1000, generator=gen)
x[2, 500:700] = x[2, 100]  # a long run of one value
ks = [1, 2, 3, 41, 333, 500, 640, 999, 1000, torch.tensor([7, 950, 300])]
results = []
for block, sparse, limit in ((256, True, SPARSE_LIMIT), (256, True, 0), (256, False, SPARSE_LIMIT), (BLOCK, True, 100)):
    for k in ks:
        got = kth_largest_triton(x, k, block=block, sparse=sparse, sparse_limit=limit)
        ref = kth_largest_reference(x, k)
        results.append(dict(block=block, k=k.tolist() if isinstance(k, torch.Tensor) else k,
                            got=got.values.view(torch.int32).tolist(), ref=ref.values.view(torch.int32).tolist(),
                            got_ties=got.ties.tolist(), ref_ties=ref.ties.tolist()))
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_triton_kernels_under_interpreter() -> None:
    # masked tl.histogram arrived in triton 3.4
    results = run_interpreted(INTERPRETER_SCRIPT, timeout=180, unsupported=(
        ("histogram() got an unexpected keyword argument 'mask'", "triton {triton} has no masked tl.histogram"),))
    assert len(results) == 40
    for r in results:
        assert r["got"] == r["ref"] and r["got_ties"] == r["ref_ties"], r
    assert {t for r in results for t in r["ref_ties"]} - {1}, "no case had ties"


def _realistic(seed: int) -> torch.Tensor:
    """R = 160 rows of L = 224K probabilities (softmax of scaled normals), on CUDA."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.softmax(4 * torch.randn(160, 224 * 1024, generator=gen, device="cuda"), dim=1)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2, 2048, 16384, 112 * 1024, 224 * 1024 - 1, 224 * 1024])
def test_realistic_matches_topk(k: int) -> None:
    x = _realistic(k)
    x[7] = torch.exp2(x[7].log2().round())  # powers of two only: long runs of ties over many exponents
    x[9, ::2] = 0.0
    x[9, 1::4] = -0.0  # ties with 0.0; the result is +0.0
    got = kth_largest(x, k, backend="triton")
    expected = torch.topk(x, k, dim=1).values[:, -1] + 0.0  # -0.0 + 0.0 = +0.0
    assert torch.equal(got.values.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(got.ties, k - (x > expected[:, None]).sum(dim=1))
    ref = kth_largest(x, k, backend="torch")
    assert torch.equal(got.values, ref.values) and torch.equal(got.ties, ref.ties)


@pytest.mark.gpu
def test_per_row_k_on_cuda() -> None:
    x = _realistic(3)
    k = torch.randint(1, 224 * 1024 + 1, (160,), device="cuda")
    got, ref = kth_largest(x, k), kth_largest_reference(x, k)
    assert torch.equal(got.values, ref.values) and torch.equal(got.ties, ref.ties)


@pytest.mark.gpu
def test_cuda_graph_replay() -> None:
    x = _realistic(11)
    k = 4096
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        kth_largest(x, k, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kth_largest(x, k, backend="triton")
    for seed in (12, 13):  # new scores in the same buffer, then replay
        x.copy_(_realistic(seed))
        graph.replay()
        torch.cuda.synchronize()
        ref = kth_largest(x, k, backend="torch")
        assert torch.equal(captured.values, ref.values) and torch.equal(captured.ties, ref.ties)
