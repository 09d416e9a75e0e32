"""Triton kernel of the zero-copy recall; imported only when that path runs (needs triton).

One launch moves a whole batch of one row size, straight from the row indices: row ``i``
of the batch is ``row_words`` words read at word offset ``src_base + rows[i] * row_words``
of ``src`` (a CUDA view of pinned host memory, so the loads cross PCIe) and written at
``dst_base + (i - first_i) * row_words`` of ``dst``. With one request the bases are 0
(``src`` is its block, ``dst`` its ``out``); with several, ``table`` holds each request's
first batch row, source base and destination base, and each row finds its request by a
binary search over the first rows (a small table: the search stays in L1).

No index is built per row on the host and nothing is coalesced: consecutive rows of a page
sit next to each other in a tile, so the loads a tile issues are the same bytes a per-page
index would give, and the row indices come from device memory, which costs nothing next
to the PCIe round trip. A small fixed grid loops over tiles: PCIe needs only ~100 KB in
flight to run at full speed, and every SM the gather leaves alone stays with the compute
it overlaps. A grid as large as the tile count gives short-lived programs instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows", "n_reqs", "search", "row_words"])
def _gather_rows(src, dst, rows, table, n_rows, n_reqs, search, row_words,
                 BLOCK_W: tl.constexpr, TILE: tl.constexpr, MULTI: tl.constexpr):
    lane = tl.arange(0, TILE)  # [TILE] row within a tile
    cols = tl.arange(0, BLOCK_W)  # [BLOCK_W] word within a column chunk of a row
    for first in range(tl.program_id(0) * TILE, n_rows, tl.num_programs(0) * TILE):
        i = first + lane  # [TILE] batch row
        ok = i < n_rows
        row = tl.load(rows + i, mask=ok, other=0).to(tl.int64)  # [TILE] row of its block
        if MULTI:
            # Largest r with table[r] <= i: table[lo] <= i < table[hi] (table[n_reqs] = inf).
            lo = tl.zeros([TILE], dtype=tl.int32)
            hi = lo + n_reqs
            for _ in range(search):  # ceil(log2(n_reqs)) halvings
                mid = (lo + hi) // 2  # < hi <= n_reqs: always a valid entry
                go = tl.load(table + mid) <= i
                lo = tl.where(go, mid, lo)
                hi = tl.where(go, hi, mid)
            s0 = tl.load(table + n_reqs + lo)  # [TILE] int64 source base of the row's request
            d0 = tl.load(table + 2 * n_reqs + lo) - tl.load(table + lo) * row_words
        else:
            s0 = 0
            d0 = 0
        s = s0 + row * row_words  # [TILE] int64 word offsets
        d = d0 + i.to(tl.int64) * row_words
        for c in range(0, row_words, BLOCK_W):  # one pass unless rows exceed a tile
            cc = c + cols
            m = ok[:, None] & (cc < row_words)[None, :]
            words = tl.load(src + s[:, None] + cc[None, :], mask=m)  # [TILE, BLOCK_W]
            tl.store(dst + d[:, None] + cc[None, :], words, mask=m)


def gather_rows(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor, table: torch.Tensor | None,
                row_words: int, ctas: int, warps: int, tile_words: int) -> None:
    """src, dst: CUDA tensors of one word dtype (only their addresses matter); rows: [N]
    int64 on the device; table: None for one request (src at its block, dst at its out),
    else [3 * R] int64 on the device: first batch rows (increasing, table[0] = 0), source
    word bases, destination word bases. tile_words: words one program moves per step (a
    power of two >= 2)."""
    n_rows = rows.numel()
    block_w = min(triton.next_power_of_2(row_words), tile_words // 2)  # rows of >= 2 lanes
    tile = tile_words // block_w
    grid = (max(1, min(ctas, triton.cdiv(n_rows, tile))),)
    n_reqs = 1 if table is None else table.numel() // 3
    search = (n_reqs - 1).bit_length()
    _gather_rows[grid](src, dst, rows, rows if table is None else table, n_rows, n_reqs, search, row_words,
                       BLOCK_W=block_w, TILE=tile, MULTI=table is not None, num_warps=warps)
