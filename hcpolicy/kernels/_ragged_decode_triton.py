"""Triton kernels of ``ragged_decode_attention``; imported only when that path runs (needs triton).

Split-K decode (flash-decoding) in two launches:
1. ``_chunk_kernel``, grid (n_chunks, H_kv, B): program (c, h, b) reads rows
   ``[c * chunk, min((c + 1) * chunk, length))`` of segment (b, h) once, in tiles of
   BLOCK_N rows, for all G query heads of the group at once (q is a [BLOCK_G, D] tile,
   G padded to the 16 rows a tensor-core dot needs), and keeps an online softmax in fp32.
   It writes the chunk's normalized output and its log2-sum-exp. Programs past the end of
   their segment exit at once: the grid is sized by ``max_length``, never by a read of
   ``lengths`` on the host.
2. ``_combine_kernel``, grid (H_q, B): merges the chunks a segment has with their
   log-sum-exp weights; a segment with no rows gives zeros.
Scores are taken in base 2 (``scale * log2(e)`` folded into one multiply after the dot).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from hcpolicy.kernels.ragged_decode import ChunkPlan, DecodeConfig, plan_chunks

SMEM_BUDGET = 160 * 1024  # bytes of K+V tiles in flight per program (sm_90: 227 KB per block)
# Elements of one K tile: the fp32 ("ieee") dot runs on FMA units and keeps its operands in
# registers (block_n 32 at D=128 already spills there); half-precision dots read shared memory.
MAX_TILE_ELEMENTS = {4: 2048, 2: 16384}


@triton.jit
def _chunk_kernel(
    q_ptr, kv_ptr, starts_ptr, lengths_ptr, o_part_ptr, lse_part_ptr,
    qk_scale, chunk,
    stride_qb, stride_qh, stride_kvs, stride_kvt, stride_sb, stride_sh, stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pc, stride_eb, stride_eh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh).to(tl.int32)  # segments stay < 2**31 rows
    lo = c * chunk
    if lo < length:
        hi = tl.minimum(lo + chunk, length)
        start = tl.load(starts_ptr + b * stride_sb + h * stride_sh)  # int64 first row of the segment
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_ok = offs_g < G
        d_ok = offs_d < D
        heads = h * G + offs_g  # [BLOCK_G] query heads of the group
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_G, BLOCK_D]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            rows = n0 + offs_n  # [BLOCK_N] position within the segment
            n_ok = rows < hi
            k_ptrs = kv_ptr + (start + rows)[:, None] * stride_kvs + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
            if D == BLOCK_D:  # mask constant along D: loads stay 16 bytes wide
                k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
                v = tl.load(k_ptrs + stride_kvt, mask=n_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(k_ptrs + stride_kvt, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N] fp32
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a row < hi
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        part = b * stride_pb + heads * stride_ph + c * stride_pc  # [BLOCK_G]
        tl.store(o_part_ptr + part[:, None] + offs_d[None, :], acc / l_i[:, None], mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_part_ptr + b * stride_eb + heads * stride_eh + c, m_i + tl.log2(l_i), mask=g_ok)


@triton.jit(do_not_specialize=["chunk", "n_chunks"])  # one compile for every max_length
def _combine_kernel(
    o_part_ptr, lse_part_ptr, lengths_ptr, out_ptr, chunk, n_chunks,
    stride_pb, stride_ph, stride_pc, stride_eb, stride_eh, stride_lb, stride_lh, stride_ob, stride_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    hq = tl.program_id(0)
    b = tl.program_id(1)
    length = tl.load(lengths_ptr + b * stride_lb + (hq // G) * stride_lh).to(tl.int32)
    n_valid = tl.minimum((length + chunk - 1) // chunk, n_chunks)  # chunks the chunk kernel wrote
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    o_base = b * stride_pb + hq * stride_ph
    lse_base = b * stride_eb + hq * stride_eh
    m = tl.max(tl.full([BLOCK_C], float("-inf"), tl.float32), 0)  # a scalar tensor: loop-carried
    den = tl.sum(tl.zeros([BLOCK_C], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, n_valid, BLOCK_C):
        cs = c0 + offs_c  # [BLOCK_C]
        c_ok = cs < n_valid
        lse = tl.load(lse_part_ptr + lse_base + cs, mask=c_ok, other=float("-inf"))  # [BLOCK_C]
        o_ptrs = o_part_ptr + o_base + cs[:, None] * stride_pc + offs_d[None, :]
        o = tl.load(o_ptrs, mask=c_ok[:, None], other=0.0)  # [BLOCK_C, BLOCK_D]
        m_new = tl.maximum(m, tl.max(lse, 0))  # finite: the tile's first chunk is valid
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # [BLOCK_C], 0 where invalid
        den = den * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m = m_new
    res = tl.where(den > 0, acc / tl.maximum(den, 1e-30), 0.0)  # no rows: zeros
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, res.to(out_ptr.dtype.element_ty), mask=offs_d < D)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def n_sm_of(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a fixed 132 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def block_d_of(dim: int) -> int:
    """Columns of a row tile: the head dim padded to a power of two >= 16."""
    return max(16, triton.next_power_of_2(dim))


def tiling(config: DecodeConfig, block_d: int, itemsize: int) -> tuple[int, int]:
    """(rows per tile, pipeline stages): config.block_n halved while a tile exceeds
    MAX_TILE_ELEMENTS (a halved block_n still divides every chunk); stages cut so that the
    stages - 1 K+V tiles Triton keeps in flight fit SMEM_BUDGET."""
    block_n = config.block_n
    while block_n > 16 and block_n * block_d > MAX_TILE_ELEMENTS[itemsize]:
        block_n //= 2
    tile_bytes = 2 * block_n * block_d * itemsize  # one K and one V tile
    return block_n, max(2, min(config.num_stages, SMEM_BUDGET // tile_bytes + 1))


def partials_shapes(batch: int, h_q: int, dim: int, plan: ChunkPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the fp32 scratch: per-chunk outputs [B, H_q, n_chunks, BLOCK_D] and lse [B, H_q, n_chunks]."""
    return (batch, h_q, plan.n_chunks, block_d_of(dim)), (batch, h_q, plan.n_chunks)


def ragged_decode_triton(
    q: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, scale: float,
    max_length: int, out: torch.Tensor | None, config: DecodeConfig,
    o_part: torch.Tensor | None = None, lse_part: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launch both kernels on validated inputs. o_part and lse_part (``partials_shapes``,
    fp32, contiguous) may be passed in: tests poison them, graphs may keep them."""
    batch, h_q, dim = q.shape
    h_kv = starts.shape[1]
    group = h_q // h_kv
    if kv.stride(2) != 1:
        raise ValueError(f"kv's last dim must be contiguous, got strides {kv.stride()}")
    q = q if q.stride(2) == 1 else q.contiguous()  # [B, H_q, D], a few KB
    result = out if out is not None and out.stride(2) == 1 else torch.empty_like(q)  # [B, H_q, D]
    if batch == 0 or h_q == 0:
        return result
    plan = plan_chunks(max_length, batch, h_kv, n_sm_of(q.device), config)
    block_d = block_d_of(dim)
    o_shape, lse_shape = partials_shapes(batch, h_q, dim, plan)
    if o_part is None:
        o_part = torch.empty(o_shape, dtype=torch.float32, device=q.device)
    if lse_part is None:
        lse_part = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    for name, t, shape in (("o_part", o_part, o_shape), ("lse_part", lse_part, lse_shape)):
        if tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous fp32 of shape {shape}, got {tuple(t.shape)} {t.dtype}")
    block_g = max(16, triton.next_power_of_2(group))  # a tensor-core dot needs >= 16 rows
    block_n, stages = tiling(config, block_d, kv.element_size())
    _chunk_kernel[(plan.n_chunks, h_kv, batch)](
        q, kv, starts, lengths, o_part, lse_part,
        scale * math.log2(math.e), plan.chunk,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), starts.stride(0), starts.stride(1),
        lengths.stride(0), lengths.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        G=group, D=dim, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if kv.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=stages,
    )  # fmt: skip
    block_c = max(1, 8192 // block_d)  # a [BLOCK_C, BLOCK_D] fp32 tile is 64 registers a thread
    _combine_kernel[(h_q, batch)](
        o_part, lse_part, lengths, result, plan.chunk, plan.n_chunks,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        lengths.stride(0), lengths.stride(1), result.stride(0), result.stride(1),
        G=group, D=dim, BLOCK_D=block_d, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result
