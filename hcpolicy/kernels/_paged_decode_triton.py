"""Triton split-K decode over paged per-head KV (imported only on the triton path).

``_paged_chunk_kernel``, grid (n_chunks, H_kv, B): program (c, h, b) reads entries
``[c * chunk, min((c + 1) * chunk, length))`` of head (b, h) once, BLOCK_N at a time,
for all G query heads of the group (GQA: a [BLOCK_G, D] query tile, G padded to the 16
rows a tensor-core dot needs), with an online softmax in fp32, and writes the chunk's
normalised output and log2-sum-exp. Each tile looks its rows up in the head's page table
(a vector load: any page size, including 1 for row tables; int32 or int64 page ids) and
loads them from ``keys`` and ``values``, each at its own row stride (row offsets in
int64: pools can pass 2**31 elements). Programs past a head's length exit at once, so
the grid depends on the host bound ``max_length`` only (CUDA graphs).
The merge of the chunks is ``hcpolicy.kernels``' ragged-decode combine kernel, reused.

With a ``Tap`` (``TAP``), a monitored head's programs also store the prompt part of their
base-2 logits and, per BLOCK_N tile, a reference max and the sum of exp2(logit - it):
what a device-side window monitor needs (``monitor``), for the cost of a store, since
the keys are read here anyway: the online softmax's running max and its exp2 terms are
those numbers already (any max at or above the tile's gives the same normaliser), summed
over the prompt entries. Chunks are multiples of BLOCK_N, so tile n0 // BLOCK_N is aligned.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hcpolicy.kernels._ragged_decode_triton import _combine_kernel, block_d_of, n_sm_of, partials_shapes, tiling
from hcpolicy.kernels.paged_decode import Tap
from hcpolicy.kernels.ragged_decode import DecodeConfig, plan_chunks


@triton.jit
def _tile(q, k_ptr, v_ptr, table, n0, hi, offs_n, offs_d, d_ok, page_size, stride_ks, stride_vs, qk_scale, m_i, l_i,
          acc, D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One BLOCK_N tile of the online softmax: the updated (m, l, acc), and the tile's
    logits s, entries and exp2(s - m) (what a tap stores)."""
    entries = n0 + offs_n  # [BLOCK_N]
    n_ok = entries < hi
    page = tl.load(table + entries // page_size, mask=n_ok, other=0).to(tl.int64)  # int32 or int64 page ids
    rows = page * page_size + entries % page_size  # [BLOCK_N] int64 rows
    k_ptrs = k_ptr + rows[:, None] * stride_ks + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    v_ptrs = v_ptr + rows[:, None] * stride_vs + offs_d[None, :]
    if D == BLOCK_D:
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc, s, entries, n_ok, p


@triton.jit
def _paged_chunk_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, o_part_ptr, lse_part_ptr,
    qk_scale, chunk, page_size,
    stride_qb, stride_qh, stride_ks, stride_vs, stride_tb, stride_th, stride_lb, stride_lh,
    stride_pb, stride_ph, stride_pc, stride_eb, stride_eh,
    tap_heads_ptr, tap_logits_ptr, tap_stats_ptr, tap_slot_ptr, tap_prompt,
    stride_tw, stride_tp, stride_tb_, stride_tg, stride_sw, stride_sp, stride_sb, stride_sg, stride_st,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TAP: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh).to(tl.int32)  # int32 or int64 lengths
    lo = c * chunk
    if lo < length:
        hi = tl.minimum(lo + chunk, length)
        table = table_ptr + b * stride_tb + h * stride_th
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
        tapped = False
        if TAP:
            tapped = tl.load(tap_heads_ptr + h) >= 0
        if tapped:  # a monitored head also leaves its prompt logits and tile sums (Tap)
            mon = tl.load(tap_heads_ptr + h)
            slot = tl.load(tap_slot_ptr)
            tap_rows = slot * stride_tw + mon * stride_tp + b * stride_tb_ + offs_g * stride_tg  # [BLOCK_G]
            stat_rows = slot * stride_sw + mon * stride_sp + b * stride_sb + offs_g * stride_sg
            for n0 in range(lo, hi, BLOCK_N):
                m_i, l_i, acc, s, entries, n_ok, p = _tile(
                    q, k_ptr, v_ptr, table, n0, hi, offs_n, offs_d, d_ok, page_size, stride_ks, stride_vs, qk_scale,
                    m_i, l_i, acc, D, BLOCK_D, DOT_PRECISION,
                )  # fmt: skip
                # masked stores, no branches (they would stall the loop's pipelining): the
                # prompt's logits, and per tile the running max with the sum of the prompt
                # entries' exp2 under it (any max at or above theirs gives the same normaliser)
                in_prompt = n_ok & (entries < tap_prompt)
                tl.store(tap_logits_ptr + tap_rows[:, None] + entries[None, :], s,
                         mask=g_ok[:, None] & in_prompt[None, :])  # fmt: skip
                stat = tap_stats_ptr + stat_rows + (n0 // BLOCK_N) * stride_st
                stat_ok = g_ok & (n0 + offs_g * 0 < tap_prompt)  # [BLOCK_G]
                tl.store(stat, m_i, mask=stat_ok)
                tl.store(stat + 1, tl.sum(tl.where(in_prompt[None, :], p, 0.0), 1), mask=stat_ok)
        else:  # the hot loop, free of tap code
            for n0 in range(lo, hi, BLOCK_N):
                m_i, l_i, acc, s, entries, n_ok, p = _tile(
                    q, k_ptr, v_ptr, table, n0, hi, offs_n, offs_d, d_ok, page_size, stride_ks, stride_vs, qk_scale,
                    m_i, l_i, acc, D, BLOCK_D, DOT_PRECISION,
                )  # fmt: skip
        part = b * stride_pb + heads * stride_ph + c * stride_pc
        tl.store(o_part_ptr + part[:, None] + offs_d[None, :], acc / l_i[:, None], mask=g_ok[:, None] & d_ok[None, :])
        tl.store(lse_part_ptr + b * stride_eb + heads * stride_eh + c, m_i + tl.log2(l_i), mask=g_ok)


def paged_decode_triton(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
    page_size: int, scale: float, max_length: int, config: DecodeConfig, out: torch.Tensor | None = None,
    o_part: torch.Tensor | None = None, lse_part: torch.Tensor | None = None, tap: "Tap | None" = None,
    work: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launch both kernels on checked inputs (``check_inputs``); q: [B, H_q, D], keys and
    values: [R, D] -> [B, H_q, D]. o_part and lse_part (fp32 scratch, ``partials_shapes``)
    may be passed in (tests poison them); work: the heads' total entries if known
    (``plan_chunks``)."""
    batch, h_q, dim = q.shape
    h_kv = lengths.shape[1]
    if table.stride(2) != 1:
        raise ValueError(f"table's last dim must be contiguous, got strides {table.stride()}")
    q = q if q.stride(2) == 1 else q.contiguous()
    result = torch.empty_like(q) if out is None else out
    plan = plan_chunks(max(1, max_length), batch, h_kv, n_sm_of(q.device), config, work)
    block_d = block_d_of(dim)
    o_shape, lse_shape = partials_shapes(batch, h_q, dim, plan)
    o_part = torch.empty(o_shape, dtype=torch.float32, device=q.device) if o_part is None else o_part
    lse_part = torch.empty(lse_shape, dtype=torch.float32, device=q.device) if lse_part is None else lse_part
    block_g = max(16, triton.next_power_of_2(h_q // h_kv))
    block_n, stages = tiling(config, block_d, keys.element_size())
    if tap is not None:
        if tap.tile != block_n:
            raise ValueError(f"tap tiles of {tap.tile} entries, but this kernel's tiles are {block_n}")
        lg, st = tap.logits, tap.stats
        tap_args = (tap.heads, lg, st, tap.slot, tap.prompt, *lg.stride()[:4], *st.stride()[:5])
    else:
        tap_args = (lengths, q, q, lengths, 0, *(0,) * 9)  # never read
    _paged_chunk_kernel[(plan.n_chunks, h_kv, batch)](
        q, keys, values, table, lengths, o_part, lse_part,
        scale * math.log2(math.e), plan.chunk, page_size,
        q.stride(0), q.stride(1), keys.stride(0), values.stride(0), table.stride(0), table.stride(1),
        lengths.stride(0), lengths.stride(1), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), *tap_args,
        G=h_q // h_kv, D=dim, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if keys.dtype == torch.float32 else "tf32", TAP=tap is not None,
        num_warps=config.num_warps, num_stages=stages,
    )  # fmt: skip
    _combine_kernel[(h_q, batch)](
        o_part, lse_part, lengths, result, plan.chunk, plan.n_chunks,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        lengths.stride(0), lengths.stride(1), result.stride(0), result.stride(1),
        G=h_q // h_kv, D=dim, BLOCK_D=block_d, BLOCK_C=max(1, 8192 // block_d), num_warps=4,
    )  # fmt: skip
    return result
