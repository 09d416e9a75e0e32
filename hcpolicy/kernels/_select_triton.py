"""Triton kernels of ``kth_largest``; imported only when that path runs (needs triton).

A radix select over the float bits: for x >= 0 the float32 bit pattern, read as int32, is
monotone in the value (the sign bit is cleared first, so -0.0 counts as +0.0). Four passes
find the k-th largest pattern one byte at a time, from the top byte. Pass p (the byte at
bits [SHIFT, SHIFT + 8), SHIFT = 24 - 8p) is two launches:
1. ``_histogram_kernel``, grid (cdiv(L, BLOCK), R): program (b, r) takes the elements of
   row r's block b whose bits above the byte equal the prefix found so far, histograms
   their byte into 256 bins (``tl.histogram``: warp ballots, then shared memory) and adds
   the nonzero bins into the row's global [256] int32 histogram with atomics. In the last
   two passes a row with few elements under its prefix (counted by the previous scan)
   adds one atomic per element instead.
2. ``_scan_kernel``, grid (R,): from the top bin down, the digit d where the count of
   matching elements with byte >= d first reaches the remaining k; appends d to the
   prefix, subtracts the count above d from k and zeroes the histogram for the next pass.
   The last pass writes the prefix (now the k-th largest value's bits) and the remaining
   k (the copies of that value the top-k takes).
Every launch has a grid fixed by x's shape: no host sync, CUDA-graph capturable. Each pass
reads x once (R = 160, L = 224K: ~147 MB a pass).
"""

from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl

from hcpolicy.kernels.select import KthLargest

BLOCK = 4096  # elements per histogram program: 16 per thread at 8 warps
NUM_WARPS = 8
# sparse passes: a row with more elements than this under its 16-bit prefix takes block
# histograms (one atomic per element on a few addresses serialises: rows of ties, zeros)
SPARSE_LIMIT = 8192
BINS = 256
PASSES = 4


@triton.jit
def _histogram_kernel(
    bits_ptr, prefix_ptr, share_ptr, hist_ptr, length,
    SHIFT: tl.constexpr, HIGH_MASK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr, SPARSE: tl.constexpr,
    SPARSE_LIMIT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    row = tl.program_id(1)
    offs = b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = offs < length
    bits = tl.load(bits_ptr + row.to(tl.int64) * length + offs, mask=ok, other=0)  # [BLOCK] int32
    bits = bits & 0x7FFFFFFF  # -0.0 -> +0.0; a no-op on every other x >= 0
    if HIGH_MASK != 0:  # later passes: only the elements under the prefix found so far
        ok = ok & ((bits & HIGH_MASK) == tl.load(prefix_ptr + row))
    digit = (bits >> SHIFT) & (BINS - 1)  # [BLOCK] in [0, BINS)
    # few elements share the prefix (the scan counted them): one atomic each beats a block histogram
    if SPARSE and tl.load(share_ptr + row) <= SPARSE_LIMIT:
        tl.atomic_add(hist_ptr + row * BINS + digit, tl.full([BLOCK], 1, tl.int32), mask=ok, sem="relaxed")
    else:
        counts = tl.histogram(digit, BINS, mask=ok)  # [BINS] int32
        bins = tl.arange(0, BINS)
        tl.atomic_add(hist_ptr + row * BINS + bins, counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _scan_kernel(
    hist_ptr, prefix_ptr, share_ptr, krem_ptr, value_bits_ptr, ties_ptr,
    SHIFT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, BINS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    bins = tl.arange(0, BINS)
    counts = tl.load(hist_ptr + row * BINS + bins)  # [BINS] matching elements per byte value
    k = tl.load(krem_ptr + row)  # 1 <= k <= tl.sum(counts): the k-th largest is under the prefix
    at_least = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts  # [BINS] elements with byte >= bin
    digit = tl.max(tl.where(at_least >= k, bins, 0), 0)  # at_least falls with the bin: the last one >= k
    above = tl.sum(tl.where(bins > digit, counts, 0), 0)  # elements above the k-th, in this byte
    prefix = digit << SHIFT
    if not FIRST:
        prefix = prefix | tl.load(prefix_ptr + row)
    k = k - above
    if LAST:
        tl.store(value_bits_ptr + row, prefix)
        tl.store(ties_ptr + row, k.to(tl.int64))
    else:
        tl.store(prefix_ptr + row, prefix)
        tl.store(share_ptr + row, tl.sum(tl.where(bins == digit, counts, 0), 0))  # elements under it
        tl.store(krem_ptr + row, k)
        tl.store(hist_ptr + row * BINS + bins, tl.zeros([BINS], tl.int32))  # clean for the next pass


def _high_mask(shift: int) -> int:
    """The bits above byte [shift, shift + 8) as a signed int32 (0 for the top byte)."""
    mask = (0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF
    return mask - (1 << 32) if mask >= 1 << 31 else mask


def kth_largest_triton(x: torch.Tensor, k: Union[int, torch.Tensor], block: int = BLOCK,
                       num_warps: int = NUM_WARPS, top_histogram: torch.Tensor | None = None,
                       sparse: bool = True, sparse_limit: int = SPARSE_LIMIT) -> KthLargest:  # fmt: skip
    """Launch the passes on a validated x (``kth_largest``'s contract). block: elements per
    histogram program, a power of two >= 256 (tests shrink it to get several per row).
    sparse: the last two passes add one atomic per element under the 16-bit prefix instead
    of a block histogram (exact either way; faster when few elements share the prefix, as
    in probability rows), for rows with at most ``sparse_limit`` elements under that prefix;
    rows with more (ties, zeros), where such atomics serialise, take block histograms."""
    if block < BINS or block & (block - 1):
        raise ValueError(f"block must be a power of two >= {BINS}, got {block}")
    rows, length = x.shape
    values = torch.empty(rows, dtype=torch.float32, device=x.device)  # [R]
    ties = torch.empty(rows, dtype=torch.int64, device=x.device)  # [R]
    if rows == 0:
        return KthLargest(values, ties)
    if isinstance(k, torch.Tensor):
        krem = k.to(torch.int32).clamp(1, length).expand(rows).contiguous()  # [R], overwritten per pass
    else:
        krem = torch.full((rows,), k, dtype=torch.int32, device=x.device)  # [R]
    if top_histogram is not None:  # pass 0's counts came with x
        t = top_histogram
        if t.shape != (rows, BINS) or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"top_histogram must be a contiguous int32 [{rows}, {BINS}], got "
                             f"{tuple(top_histogram.shape)} {top_histogram.dtype}")  # fmt: skip
        hist = top_histogram
    else:
        hist = torch.zeros(rows, BINS, dtype=torch.int32, device=x.device)  # [R, BINS], zeroed by each scan
    prefix = torch.empty(rows, dtype=torch.int32, device=x.device)  # [R], first written by pass 0's scan
    share = torch.empty(rows, dtype=torch.int32, device=x.device)  # [R] elements under the prefix, likewise
    bits = x.view(torch.int32)  # [R, L]
    value_bits = values.view(torch.int32)  # [R]
    for p in range(PASSES):
        shift = 24 - 8 * p
        if p > 0 or top_histogram is None:
            _histogram_kernel[(triton.cdiv(length, block), rows)](
                bits, prefix, share, hist, length,
                SHIFT=shift, HIGH_MASK=_high_mask(shift), BLOCK=block, BINS=BINS, SPARSE=sparse and p >= 2,
                SPARSE_LIMIT=sparse_limit, num_warps=num_warps,
            )  # fmt: skip
        _scan_kernel[(rows,)](
            hist, prefix, share, krem, value_bits, ties,
            SHIFT=shift, FIRST=p == 0, LAST=p == PASSES - 1, BINS=BINS, num_warps=4,
        )  # fmt: skip
    return KthLargest(values, ties)
