"""Triton kernels of ``compact.top_positions``; imported on CUDA (and by interpreter tests).

Two launches over [R, L] tiles: the first counts, per tile, the scores above each row's
threshold and those equal to it; after a cumsum of those counts over the tiles (torch), the
second knows where each tile's kept entries go and writes them, in index order, with the
padding zeros past each row's length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # scores per program


# sizes that change from call to call are not specialised on: a new value must not compile
# a kernel in the middle of a decode step
@triton.jit(do_not_specialize=["group", "L", "T"])
def _count(x, values, counts, group, L, T, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    j = t * BLOCK + tl.arange(0, BLOCK)
    ok = j < L
    s = tl.load(x + (r // group) * L + j, mask=ok, other=-1.0)
    v = tl.load(values + r)
    tl.store(counts + (r * T + t) * 2, tl.sum((ok & (s > v)).to(tl.int32), axis=0))
    tl.store(counts + (r * T + t) * 2 + 1, tl.sum((ok & (s == v)).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["group", "batch", "L", "W", "T", "pos_stride"])
def _place(x, values, ties, lengths, before, positions, out, group, batch, L, W, T, pos_stride,
           BLOCK: tl.constexpr):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    j = t * BLOCK + tl.arange(0, BLOCK)
    ok = j < L
    q = r // group  # the score row
    s = tl.load(x + q * L + j, mask=ok, other=-1.0)
    v, tie, n = tl.load(values + r), tl.load(ties + r), tl.load(lengths + r)
    gt_before = tl.load(before + (r * T + t) * 2)  # entries above v in earlier tiles
    eq_before = tl.load(before + (r * T + t) * 2 + 1)  # entries equal to v in earlier tiles
    gt = ok & (s > v)
    eq = ok & (s == v)
    eq_rank = eq_before + tl.cumsum(eq.to(tl.int32), axis=0) - 1  # among the row's copies of v
    keep = gt | (eq & (eq_rank < tie))
    slot = gt_before + tl.minimum(eq_before, tie) + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    pos = tl.load(positions + (q % batch) * pos_stride + j, mask=keep, other=0)
    row = out + r * W
    tl.store(row + slot, pos, mask=keep)
    tl.store(row + j, tl.zeros_like(pos), mask=(j >= n) & (j < W))  # padding past the length


def top_positions_triton(x: torch.Tensor, values: torch.Tensor, ties: torch.Tensor, lengths: torch.Tensor,
                         positions: torch.Tensor, group: int, width: int) -> torch.Tensor:  # fmt: skip
    """``compact.top_positions`` on CUDA (same arguments and result)."""
    rows, length = lengths.shape[0], x.shape[1]
    batch = positions.shape[0]
    tiles = triton.cdiv(length, BLOCK)
    counts = torch.empty(rows, tiles, 2, dtype=torch.int32, device=x.device)
    _count[(rows, tiles)](x, values, counts, group, length, tiles, BLOCK=BLOCK)
    before = (counts.cumsum(1, dtype=torch.int32) - counts).contiguous()  # exclusive, per row
    out = torch.empty(rows, width, dtype=positions.dtype, device=x.device)
    _place[(rows, tiles)](x, values, ties, lengths, before, positions, out, group, batch, length, width, tiles,
                          positions.stride(0), BLOCK=BLOCK)  # fmt: skip
    return out
