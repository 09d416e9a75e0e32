"""Triton kernel of ``window_scores`` (imported only on the triton path).

Grid (key blocks, rows): program (j, r) computes outputs [j * BLOCK, (j + 1) * BLOCK) of row
r. For each of the ``POOL`` window offsets it loads the G heads' logits at the shifted
keys (neighbouring programs' keys come from cache), turns them into probabilities with
each head's shift (max + log2 of the sum: one exp2, no division), reduces over G and adds
them where the key exists. Also the overlap counts of ``window_overlaps``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_probs(row, shifts, keys, ok, stride_lg, G: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr):
    """The G query heads' probabilities at ``keys`` of one row, reduced: [BLOCK].
    probability = exp2(logit - shift), shift = the row's max + log2(its sum)."""
    x = tl.zeros([BLOCK], tl.float32)
    for g in tl.static_range(G):
        s = tl.load(row + g * stride_lg + keys, mask=ok, other=float("-inf")) - tl.load(shifts + g)
        if REDUCE == 0:  # max of probabilities = exp2 of the max: one exp2 per key
            if g == 0:
                x = s
            else:
                x = tl.maximum(x, s)
        else:
            if g == 0:
                x = tl.exp2(s)
            else:
                x = x + tl.exp2(s)
    if REDUCE == 0:
        x = tl.exp2(x)
    if REDUCE == 1:
        x = x / G
    return x


@triton.jit
def _window_scores_kernel(
    logits_ptr, shift_ptr, out_ptr, hist_ptr, length, stride_lr, stride_lg,
    G: tl.constexpr, POOL: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr, HIST: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0)
    r = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.float32)
    row = logits_ptr + r.to(tl.int64) * stride_lr
    for i in tl.static_range(POOL):
        keys = offs + (i - POOL // 2)
        ok = (keys >= 0) & (keys < length)
        x = _group_probs(row, shift_ptr + r * G, keys, ok, stride_lg, G, REDUCE, BLOCK)
        acc += tl.where(ok, x, 0.0)
        count += ok.to(tl.float32)
    pooled = acc / count
    tl.store(out_ptr + r.to(tl.int64) * length + offs, pooled, mask=offs < length)
    if HIST:  # the first radix-select pass's counts (kernels.select), while the values are here
        top = (pooled.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >> 24
        counts = tl.histogram(top, 256, mask=offs < length)
        tl.atomic_add(hist_ptr + r * 256 + tl.arange(0, 256), counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _shift_kernel(stats_ptr, shift_ptr, tiles, BLOCK: tl.constexpr):
    """Program r: row r's tiles (reference max m_t, sum l_t) -> max + log2(sum), base 2."""
    r = tl.program_id(0)
    base = stats_ptr + r.to(tl.int64) * tiles * 2
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for t0 in range(0, tiles, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        ok = offs < tiles
        m_t = tl.load(base + 2 * offs, mask=ok, other=float("-inf"))
        l_t = tl.load(base + 2 * offs + 1, mask=ok, other=0.0)
        m_new = tl.maximum(m, m_t)
        live = m_new > float("-inf")  # lanes with no tile yet stay (-inf, 0)
        total = tl.where(live, total * tl.exp2(m - m_new) + l_t * tl.exp2(m_t - m_new), 0.0)
        m = m_new
    top = tl.max(m, 0)
    total = tl.sum(tl.where(m > float("-inf"), total * tl.exp2(m - top), 0.0), 0)
    tl.store(shift_ptr + r, top + tl.log2(total))


@triton.jit
def _reduce_kernel(logits_ptr, shift_ptr, out_ptr, length, stride_lr, stride_lg,
                   G: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Two-pass variant, pass 1: the G heads' probabilities reduced, unpooled: [R, L]."""
    j = tl.program_id(0)
    r = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    ok = offs < length
    row = logits_ptr + r.to(tl.int64) * stride_lr
    x = _group_probs(row, shift_ptr + r * G, offs, ok, stride_lg, G, REDUCE, BLOCK)
    tl.store(out_ptr + r.to(tl.int64) * length + offs, x, mask=ok)


@triton.jit
def _pool_kernel(x_ptr, out_ptr, length, POOL: tl.constexpr, BLOCK: tl.constexpr):
    """Two-pass variant, pass 2: the centred average over existing neighbours."""
    j = tl.program_id(0)
    r = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    row = r.to(tl.int64) * length
    acc = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(POOL):
        keys = offs + (i - POOL // 2)
        ok = (keys >= 0) & (keys < length)
        acc += tl.load(x_ptr + row + keys, mask=ok, other=0.0)
        count += ok.to(tl.float32)
    tl.store(out_ptr + row + offs, acc / count, mask=offs < length)


@triton.jit
def _overlap_kernel(
    scores_ptr, thresholds_ptr, masks_ptr, counts_ptr, length, mask_rows,
    BLOCK: tl.constexpr,
):  # fmt: skip
    j = tl.program_id(0)
    r = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    ok = offs < length
    x = tl.load(scores_ptr + r.to(tl.int64) * length + offs, mask=ok, other=0.0)
    member = tl.load(masks_ptr + (r % mask_rows).to(tl.int64) * length + offs, mask=ok, other=0) != 0
    t = tl.load(thresholds_ptr + r)
    tl.atomic_add(counts_ptr + 2 * r, tl.sum((member & (x > t)).to(tl.int32), 0), sem="relaxed")
    tl.atomic_add(counts_ptr + 2 * r + 1, tl.sum((member & (x == t)).to(tl.int32), 0), sem="relaxed")


def window_scores_triton(logits: torch.Tensor, shift: torch.Tensor, reduce: int, pool: int, out: torch.Tensor,
                         block: int = 512, num_warps: int = 8, two_pass: bool = False,
                         hist: torch.Tensor | None = None) -> None:  # fmt: skip
    """logits [R, G, L], shift [R, G] (contiguous float32) -> out [R, L]. ``two_pass``:
    reduce into a scratch row, then pool it (fewer exp2 and loads per key, one more pass).
    hist: [R, 256] int32 (zeroed) receives each row's top-byte counts of ``out``
    (``kernels.select``'s first pass). The defaults were the fastest of a sweep on the H200
    at 160 rows x 224K keys, G = 4:
    0.25 ms one-pass (block 512, 8 warps) vs 0.27-0.31 ms two-pass
    (``hcpolicy/bench/results/monitor_profile_h200.json``)."""
    r, g, length = logits.shape
    grid = (triton.cdiv(length, block), r)
    if two_pass and pool > 1 and hist is None:
        x = torch.empty_like(out)
        _reduce_kernel[grid](logits, shift, x, length, logits.stride(0), logits.stride(1), G=g, REDUCE=reduce,
                             BLOCK=block, num_warps=num_warps)  # fmt: skip
        _pool_kernel[grid](x, out, length, POOL=pool, BLOCK=block, num_warps=num_warps)
        return
    _window_scores_kernel[grid](
        logits, shift, out, out if hist is None else hist, length, logits.stride(0), logits.stride(1),
        G=g, POOL=pool, REDUCE=reduce, BLOCK=block, HIST=hist is not None, num_warps=num_warps,
    )  # fmt: skip


def overlap_counts_triton(scores: torch.Tensor, thresholds: torch.Tensor, masks: torch.Tensor,
                          block: int = 4096) -> torch.Tensor:  # fmt: skip
    """scores [R, L], thresholds [R], masks [M, L] bool (row r uses mask r % M) -> [R, 2]
    int32: members above the threshold, members equal to it."""
    r, length = scores.shape
    counts = torch.zeros(r, 2, dtype=torch.int32, device=scores.device)
    _overlap_kernel[(triton.cdiv(length, block), r)](
        scores, thresholds, masks.view(torch.uint8), counts, length, masks.shape[0], BLOCK=block, num_warps=8,
    )  # fmt: skip
    return counts


def softmax_shift_triton(stats: torch.Tensor) -> torch.Tensor:
    """stats [..., T, 2] (contiguous float32) -> [...]: each row's max + log2(sum), one launch."""
    rows, tiles = stats[..., 0, 0].numel(), stats.shape[-2]
    shift = torch.empty(stats.shape[:-2], dtype=torch.float32, device=stats.device)
    _shift_kernel[(rows,)](stats, shift, tiles, BLOCK=1024, num_warps=4)
    return shift
