"""Ragged decode attention on the CPU: the torch reference against float64 dense attention
over the segments, input validation, the chunk plan, and (when triton is importable) the
Triton kernels run by Triton's interpreter on tiny shapes. GPU runs: test_ragged_decode_gpu."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from interpreted import run_interpreted
from ragged_cases import dense_attention_f64, random_layout, rel_err

from hcpolicy.kernels import DecodeConfig, plan_chunks, ragged_decode_attention, ragged_decode_reference

# ||out - ref|| / ||ref|| against float64: fp32 accumulation, then one rounding to the output dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


def _random_lengths(gen: torch.Generator, batch: int, heads: int, high: int) -> list[list[int]]:
    lengths = torch.randint(0, high + 1, (batch, heads), generator=gen)
    lengths[0, 0] = high  # one full-length segment
    lengths[-1, -1] = 1
    return lengths.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_dense_f64(dtype: torch.dtype, dim: int, group: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed * 1000 + dim + group)
    lengths = _random_lengths(gen, 2, 3, 300)
    kv, starts, lens = random_layout(lengths, dim, dtype, gen)
    q = (2 * torch.randn(2, 3 * group, dim, generator=gen)).to(dtype)  # scores of std ~2: peaked softmax
    scale = dim**-0.5
    out = ragged_decode_reference(q, kv, starts, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, dense_attention_f64(q, kv, starts, lens, scale)) < TOL[dtype]
    # the public entry point runs the reference off CUDA, and fills ``out`` when given
    poisoned = torch.full_like(q, float("nan"))
    assert ragged_decode_attention(q, kv, starts, lens, scale, max_length=300, out=poisoned) is poisoned
    assert torch.equal(poisoned, out)


def test_zero_and_single_row_segments() -> None:
    gen = torch.Generator().manual_seed(7)
    kv, starts, lens = random_layout([[0, 1], [5, 0]], 16, torch.float32, gen)
    q = torch.randn(2, 4, 16, generator=gen)
    out = ragged_decode_reference(q, kv, starts, lens, 0.25)
    assert torch.equal(out[0, :2], torch.zeros(2, 16)) and torch.equal(out[1, 2:], torch.zeros(2, 16))
    torch.testing.assert_close(out[0, 2:], kv[starts[0, 1], 1].expand(2, 16))  # one row: its V


def test_reference_rejects_bad_segments() -> None:
    gen = torch.Generator().manual_seed(3)
    kv, starts, lens = random_layout([[4, 6]], 16, torch.float32, gen)
    q = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="max_length"):
        ragged_decode_reference(q, kv, starts, lens, 1.0, max_length=5)
    with pytest.raises(ValueError, match="outside kv"):
        ragged_decode_reference(q, kv, starts + kv.shape[0], lens, 1.0)


def _inputs() -> dict:
    return dict(
        q=torch.randn(2, 8, 32), kv=torch.randn(50, 2, 32), starts=torch.zeros(2, 2, dtype=torch.int64),
        lengths=torch.ones(2, 2, dtype=torch.int64), scale=1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.randn(2, 8)), "q must be"),
        (dict(kv=torch.randn(50, 3, 32)), "kv must be"),
        (dict(kv=torch.randn(50, 2, 16)), "kv must be"),
        (dict(kv=torch.randn(50, 2, 32, dtype=torch.float64)), "one dtype"),
        (dict(q=torch.randn(2, 8, 32).half()), "one dtype"),
        (dict(starts=torch.zeros(2, 3, dtype=torch.int64)), "starts and lengths must both"),
        (dict(lengths=torch.ones(1, 2, dtype=torch.int64)), "starts and lengths must both"),
        (dict(starts=torch.zeros(2, 2, dtype=torch.int32)), "int64"),
        (dict(q=torch.randn(2, 7, 32)), "multiple of H_kv"),
        (dict(lengths=[[1, 1], [1, 1]]), "torch.Tensor"),
        (dict(max_length=-1), "max_length"),
        (dict(max_length=True), "max_length"),
        (dict(out=torch.empty(2, 8, 16)), "out must match"),
    ],
)  # fmt: skip
def test_validation(change: dict, match: str) -> None:
    args = {**_inputs(), **change}
    with pytest.raises(ValueError, match=match):
        ragged_decode_attention(**args)


@pytest.mark.parametrize("max_length", [0, 1, 1000, 32768, 131072, 229376])
@pytest.mark.parametrize("batch, heads", [(1, 8), (2, 8), (16, 8), (1, 2)])
def test_plan_covers_every_row(max_length: int, batch: int, heads: int) -> None:
    config = DecodeConfig()
    plan = plan_chunks(max_length, batch, heads, 132, config)
    assert plan.chunk % config.block_n == 0 and plan.chunk >= config.min_chunk
    assert plan.n_chunks * plan.chunk >= max_length and (plan.n_chunks - 1) * plan.chunk < max(1, max_length)


@pytest.mark.parametrize("max_length", [32768, 131072, 229376])
def test_plan_fills_the_chip_at_batch_one(max_length: int) -> None:
    """B=1, H_kv=8, 132 SMs: about programs_per_sm programs per SM, all chunks alike."""
    config = DecodeConfig()
    plan = plan_chunks(max_length, 1, 8, 132, config)
    assert 0.9 * config.programs_per_sm * 132 <= 8 * plan.n_chunks <= 1.1 * config.programs_per_sm * 132


def test_plan_by_work_fills_the_chip_with_uneven_heads() -> None:
    """HeteroCache-like layer at 224K: 2 full heads and 6 at 38%: sized by max length only
    the working programs fill 4.2 waves (a last wave 17% full); sized by the total rows
    they give about programs_per_sm per SM, and the chunks still cover the longest head."""
    config, n = DecodeConfig(), 229376
    lengths = [n, n] + [int(0.38 * n)] * 6
    target = config.programs_per_sm * 132
    working = lambda plan: sum(-(-length // plan.chunk) for length in lengths)  # noqa: E731
    by_length = plan_chunks(n, 1, 8, 132, config)
    by_work = plan_chunks(n, 1, 8, 132, config, work=sum(lengths))
    assert working(by_length) < 0.6 * target
    assert 0.9 * target <= working(by_work) <= 1.1 * target
    assert by_work.n_chunks * by_work.chunk >= n and by_work.chunk % config.block_n == 0
    assert plan_chunks(n, 1, 8, 132, config, work=8 * n) == by_length  # equal heads: the same plan


@pytest.mark.parametrize(
    "bad", [dict(block_n=48), dict(block_n=8), dict(num_warps=3), dict(min_chunk=100), dict(programs_per_sm=0)]
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        DecodeConfig(**bad)


# Triton's interpreter runs the kernels on CPU tensors; it computes a bf16 dot on the raw
# uint16 bits, so only fp32 and fp16 run here (bf16 runs in the GPU tests).
INTERPRETER_SCRIPT = r"""
import json, torch
from ragged_cases import dense_attention_f64, random_layout, rel_err
from hcpolicy.kernels import DecodeConfig, ragged_decode_reference
from hcpolicy.kernels._ragged_decode_triton import partials_shapes, ragged_decode_triton
from hcpolicy.kernels.ragged_decode import plan_chunks
cases = [  # dtype, G, D, lengths, max_length, config
    ("float32", 4, 64, [[70, 0], [1, 33]], 70, dict(block_n=16, min_chunk=16, programs_per_sm=1)),
    ("float16", 1, 48, [[17, 64], [0, 5]], 64, dict(block_n=16, min_chunk=32, programs_per_sm=1)),
    ("float32", 8, 32, [[1100, 3]], 1100, dict(block_n=16, min_chunk=16, programs_per_sm=4)),  # 69 chunks
    ("float32", 2, 16, [[0, 0]], 0, dict(block_n=16, min_chunk=16)),  # nothing to read: zeros
]
gen = torch.Generator().manual_seed(0)
results = []
for dtype, group, dim, lengths, max_length, cfg in cases:
    dtype = getattr(torch, dtype)
    kv, starts, lens = random_layout(lengths, dim, dtype, gen)
    batch, heads = lens.shape
    q = (2 * torch.randn(batch, heads * group, dim, generator=gen)).to(dtype)
    config = DecodeConfig(**cfg)
    plan = plan_chunks(max_length, batch, heads, 132, config)
    o_shape, lse_shape = partials_shapes(batch, heads * group, dim, plan)
    nan = lambda shape: torch.full(shape, float("nan"))
    out = ragged_decode_triton(q, kv, starts, lens, dim ** -0.5, max_length, nan(q.shape).to(dtype), config,
                               o_part=nan(o_shape), lse_part=nan(lse_shape))
    ref = dense_attention_f64(q, kv, starts, lens, dim ** -0.5)
    err = rel_err(out, ref) if ref.abs().sum() > 0 else float(out.abs().max())
    results.append(dict(dtype=str(dtype), group=group, dim=dim, n_chunks=plan.n_chunks, err=err,
                        ref_err=rel_err(ragged_decode_reference(q, kv, starts, lens, dim ** -0.5), ref)))
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_interpreter() -> None:
    results = run_interpreted(INTERPRETER_SCRIPT, timeout=120)
    assert len(results) == 4
    for r in results:
        # fp32: an exact-fp32 dot; fp16: P is rounded to fp16 before the P @ V dot.
        assert r["err"] < (1e-5 if r["dtype"] == "torch.float32" else 2e-3), r
