"""Triton kernel of the batched recall (``recall.recall_rows``); imported only on CUDA.

Entry i of a batch writes pool row ``dst[i]`` (skipped when negative) from pool row
``pool_src[i]`` when that is >= 0 (a row the head already holds), else from the host word
offset ``host_src[i]`` (a zero-copy view of pinned memory: the loads cross PCIe). Both
kinds of entry go through one small fixed grid, so the device-to-device moves are spread
over the time the PCIe reads take instead of competing with the decode steps in one burst.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n", "row_words"])
def _recall_rows(pool, host, dst, pool_src, host_src, n, row_words, BLOCK_W: tl.constexpr, TILE: tl.constexpr):
    lane = tl.arange(0, TILE)  # [TILE] entry within a tile
    cols = tl.arange(0, BLOCK_W)  # [BLOCK_W] word within a row chunk
    for first in range(tl.program_id(0) * TILE, n, tl.num_programs(0) * TILE):
        i = first + lane
        ok = i < n
        d = tl.load(dst + i, mask=ok, other=-1)  # [TILE] int64 destination row
        p = tl.load(pool_src + i, mask=ok, other=-1)
        h = tl.load(host_src + i, mask=ok, other=0)  # word offset in host
        ok = ok & (d >= 0)
        from_pool = ok & (p >= 0)
        from_host = ok & (p < 0)
        for c in range(0, row_words, BLOCK_W):
            cc = c + cols
            cm = (cc < row_words)[None, :]
            a = tl.load(pool + p[:, None] * row_words + cc[None, :], mask=from_pool[:, None] & cm)
            b = tl.load(host + h[:, None] + cc[None, :], mask=from_host[:, None] & cm)
            tl.store(pool + d[:, None] * row_words + cc[None, :], tl.where(from_pool[:, None], a, b),
                     mask=ok[:, None] & cm)  # fmt: skip


def recall_rows_triton(pool: torch.Tensor, host: torch.Tensor, dst: torch.Tensor, pool_src: torch.Tensor,
                       host_src: torch.Tensor, row_words: int, ctas: int, tile_words: int = 4096) -> None:  # fmt: skip
    """pool: [R * row_words] words (CUDA); host: [W] words of the same dtype (a CUDA view of
    pinned memory); dst, pool_src, host_src: [E] int64 on the device."""
    n = dst.numel()
    block_w = min(triton.next_power_of_2(row_words), tile_words // 2)
    tile = tile_words // block_w
    grid = (max(1, min(ctas, triton.cdiv(n, tile))),)
    _recall_rows[grid](pool, host, dst, pool_src, host_src, n, row_words, BLOCK_W=block_w, TILE=tile, num_warps=8)
