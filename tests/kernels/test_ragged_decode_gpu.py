"""Ragged decode attention on CUDA: the Triton kernels against float64 dense attention at
realistic sizes, with poisoned outputs and scratch, zero-length segments, every benchmarked
config, and replay inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from ragged_cases import dense_attention_f64, random_layout, rel_err

from hcpolicy.bench.ragged_decode import SWEEP
from hcpolicy.kernels import DecodeConfig, plan_chunks, ragged_decode_attention

pytestmark = pytest.mark.gpu

# ||out - ref|| / ||ref|| against float64: bf16/fp16 K, V and P operands on the tensor cores
# (fp32 accumulation), then one rounding of the output; fp32 runs exact-fp32 ("ieee") dots.
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}
REALISTIC = [1, 100, 4097, 20000, 20001, 65537, 131071, 131072]  # B=1, H_kv=8: one segment each


def _case(lengths: list[list[int]], group: int, dim: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kv, starts, lens = random_layout(lengths, dim, dtype, gen, device="cuda", max_gap=300)
    q = (2 * torch.randn(len(lengths), len(lengths[0]) * group, dim, generator=gen, device="cuda")).to(dtype)
    return q, kv, starts, lens


def _poisoned_partials(q: torch.Tensor, starts: torch.Tensor, max_length: int, config: DecodeConfig):
    from hcpolicy.kernels._ragged_decode_triton import n_sm_of, partials_shapes

    plan = plan_chunks(max_length, starts.shape[0], starts.shape[1], n_sm_of(q.device), config)
    o_shape, lse_shape = partials_shapes(q.shape[0], q.shape[1], q.shape[2], plan)
    nan = dict(fill_value=float("nan"), dtype=torch.float32, device=q.device)
    return torch.full(o_shape, **nan), torch.full(lse_shape, **nan)


def _run_poisoned(q, kv, starts, lens, scale, max_length, config=DecodeConfig()) -> torch.Tensor:
    from hcpolicy.kernels._ragged_decode_triton import ragged_decode_triton

    o_part, lse_part = _poisoned_partials(q, starts, max_length, config)
    out = torch.full_like(q, float("nan"))
    ragged_decode_triton(q, kv, starts, lens, scale, max_length, out, config, o_part=o_part, lse_part=lse_part)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_realistic_bf16_matches_dense_f64(seed: int) -> None:
    """B=1, H_kv=8, G=4, D=128, bf16, lengths 1..131072 (shuffled), capacity gaps."""
    order = torch.randperm(len(REALISTIC), generator=torch.Generator().manual_seed(seed)).tolist()
    q, kv, starts, lens = _case([[REALISTIC[i] for i in order]], 4, 128, torch.bfloat16, seed)
    ref = dense_attention_f64(q, kv, starts, lens, 128**-0.5)
    out = _run_poisoned(q, kv, starts, lens, 128**-0.5, 131072)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for h in range(8):  # each head on its own: a short segment cannot hide behind a long one
        assert rel_err(out[0, 4 * h : 4 * h + 4], ref[0, 4 * h : 4 * h + 4]) < TOL[torch.bfloat16], h
    public = ragged_decode_attention(q, kv, starts, lens, 128**-0.5)  # max_length read from lengths
    assert rel_err(public, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("config", list(SWEEP.values()), ids=list(SWEEP))
def test_every_bench_config(config: DecodeConfig) -> None:
    """Every config hcpolicy.bench.ragged_decode sweeps compiles and agrees."""
    q, kv, starts, lens = _case([[30000, 7, 0, 11000, 30000, 513, 1, 29999]], 4, 128, torch.bfloat16, 5)
    out = _run_poisoned(q, kv, starts, lens, 0.09, 32768, config)
    assert rel_err(out, dense_attention_f64(q, kv, starts, lens, 0.09)) < TOL[torch.bfloat16]
    assert torch.equal(out[0, 8:12], torch.zeros_like(out[0, 8:12]))  # the zero-length head


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group, dim", [(1, 64), (4, 128), (8, 128), (5, 80), (2, 256)])
def test_dtypes_groups_dims(dtype: torch.dtype, group: int, dim: int) -> None:
    lengths = [[3000, 0, 1, 2500], [64, 65, 4096, 777]]  # B=2
    q, kv, starts, lens = _case(lengths, group, dim, dtype, group * dim)
    out = _run_poisoned(q, kv, starts, lens, dim**-0.5, 5000)  # max_length above every length
    ref = dense_attention_f64(q, kv, starts, lens, dim**-0.5)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(out[0, group : 2 * group], torch.zeros_like(out[0, group : 2 * group]))


def test_all_segments_empty_give_zeros() -> None:
    q, kv, starts, lens = _case([[0, 0], [0, 0]], 4, 128, torch.bfloat16, 9)
    assert torch.equal(_run_poisoned(q, kv, starts, lens, 0.1, 0), torch.zeros_like(q))
    assert torch.equal(_run_poisoned(q, kv, starts, lens, 0.1, 4096), torch.zeros_like(q))


def test_cuda_graph_replay_follows_lengths() -> None:
    """Captured once with a fixed max_length; lengths then change in place between replays."""
    capacity = 8192
    q, kv, starts, lens = _case([[capacity] * 8], 4, 128, torch.bfloat16, 11)
    out = torch.empty_like(q)
    lens.copy_(torch.tensor([[100, 8192, 0, 5000, 1, 4096, 8000, 300]]))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compile outside the capture
        ragged_decode_attention(q, kv, starts, lens, 0.09, max_length=capacity, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ragged_decode_attention(q, kv, starts, lens, 0.09, max_length=capacity, out=out)
    for new in ([[8192, 1, 2, 3, 0, 7000, 8191, 4097]], [[1] * 8]):
        lens.copy_(torch.tensor(new))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, dense_attention_f64(q, kv, starts, lens, 0.09)) < TOL[torch.bfloat16]
