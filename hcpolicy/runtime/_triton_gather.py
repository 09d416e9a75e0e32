"""Triton kernel of the zero-copy recall; imported only when that path runs (needs triton).

One launch moves a whole batch: unit ``i`` is ``unit_words`` words read at word offset
``offsets[i]`` of ``src`` (a CUDA view of pinned host memory, so the loads cross PCIe) and
written at word offset ``offsets[n_units + i]`` of ``dst`` (the lowest ``out``). A small
fixed grid loops over the units: PCIe needs only ~100 KB in flight to run at full speed,
and every SM the gather leaves alone stays available to the compute it overlaps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_units", "unit_words"])
def _gather_units(src, dst, offsets, n_units, unit_words, BLOCK_W: tl.constexpr, UNITS: tl.constexpr):
    cols = tl.arange(0, BLOCK_W)  # [BLOCK_W] word within a unit
    col_ok = cols < unit_words
    for first in range(tl.program_id(0) * UNITS, n_units, tl.num_programs(0) * UNITS):
        u = first + tl.arange(0, UNITS)  # [UNITS]
        u_ok = u < n_units
        s = tl.load(offsets + u, mask=u_ok, other=0)  # [UNITS] int64
        d = tl.load(offsets + n_units + u, mask=u_ok, other=0)
        ok = u_ok[:, None] & col_ok[None, :]
        words = tl.load(src + s[:, None] + cols[None, :], mask=ok)  # [UNITS, BLOCK_W]
        tl.store(dst + d[:, None] + cols[None, :], words, mask=ok)


def gather_units(src: torch.Tensor, dst: torch.Tensor, offsets: torch.Tensor, unit_words: int, ctas: int) -> None:
    """src, dst: CUDA tensors of one word dtype (only their addresses matter);
    offsets: [2 * U] int64 on the device, source word offsets then destination ones."""
    n_units = offsets.numel() // 2
    block_w = triton.next_power_of_2(unit_words)
    units = max(1, 4096 // block_w)  # ~4096 words (32 KiB of int64) in flight per iteration
    grid = (max(1, min(ctas, triton.cdiv(n_units, units))),)
    _gather_units[grid](src, dst, offsets, n_units, unit_words, BLOCK_W=block_w, UNITS=units, num_warps=8)
