"""Triton kernels of the batched recall (``recall_plan``); imported on CUDA (and by the
interpreter tests).

``plan_rows_triton`` plans M heads wanting up to K positions each in two launches: the
entry each held position sits at (one scatter per head), then, per wanted position, its
fresh pool row, the pool row holding it already or its row in the host store, the counts
and the validity flag (what ``recall_plan.plan_rows_torch`` computes in some thirty torch
ops, each a pass over [M, K]).

``recall_rows_triton`` moves the rows: entry i writes pool row ``dst[i]`` (skipped when
negative) from pool row ``pool_src[i]`` when that is >= 0 (a row the head already holds),
else from host row ``host_rows[i]`` of its head (a zero-copy view of pinned memory: the
loads cross PCIe). Both kinds of entry go through one small fixed grid, so the
device-to-device moves are spread over the time the PCIe reads take instead of competing
with the decode steps in one burst.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAN_BLOCK = 1024  # wanted positions per planning program


# sizes that change from batch to batch are not specialised on: a new value must not
# compile a kernel in the middle of a decode step
@triton.jit(do_not_specialize=["span", "max_pages"])
def _entry_of(table, positions, held, entry_of, span, page, max_pages, BLOCK: tl.constexpr):
    """entry_of[m, position] = the entry of head m holding it (positions past span: column span)."""
    m = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < tl.load(held + m)
    page_id = tl.load(table + m * max_pages + e // page, mask=ok, other=0)
    pos = tl.minimum(tl.load(positions + page_id * page + e % page, mask=ok, other=0), span)
    tl.store(entry_of + m * (span + 1) + pos, e.to(tl.int32), mask=ok)


@triton.jit(do_not_specialize=["M", "K", "span", "max_pages", "P"])
def _plan(want, n_of, cap_of, index_row, row_of, entry_of, table, fresh, positions, dst_out, pool_out, host_out,
          facts, M, K, span, page, max_pages, P, BLOCK: tl.constexpr):  # fmt: skip
    m = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n, cap, irow = tl.load(n_of + m), tl.load(cap_of + m), tl.load(index_row + m)
    inside = k < K
    valid = inside & (k < n) & (k < cap)
    w = tl.load(want + m * K + k, mask=inside, other=0)
    at_pos = tl.minimum(tl.maximum(w, 0), span)
    host_row = tl.load(row_of + irow * (span + 1) + at_pos, mask=valid, other=-1)
    missing = valid & ((host_row < 0) | (w >= span))
    at = tl.load(entry_of + m * (span + 1) + at_pos, mask=valid, other=-1)
    hit = valid & (at >= 0) & (w < span)
    pool_row = tl.load(table + m * max_pages + at // page, mask=hit, other=0) * page + at % page
    dst = tl.load(fresh + m * P + k // page, mask=valid, other=0) * page + k % page
    tl.store(dst_out + m * K + k, tl.where(valid, dst, -1), mask=inside)
    tl.store(pool_out + m * K + k, tl.where(hit, pool_row, -1), mask=inside)
    tl.store(host_out + m * K + k, tl.maximum(host_row, 0), mask=inside)
    tl.store(positions + dst, w, mask=valid)  # the recalled positions (nothing reads them yet)
    prev = tl.load(want + m * K + k - 1, mask=valid & (k > 0), other=-1)
    bad = tl.max((missing | (valid & (k > 0) & (w <= prev))).to(tl.int64), axis=0)
    bad = tl.maximum(bad, ((tl.program_id(1) == 0) & (n > cap)).to(tl.int64))
    tl.atomic_add(facts + M + m, tl.sum((valid & ~hit).to(tl.int64), axis=0))
    tl.atomic_add(facts + 2 * M + m, tl.sum(hit.to(tl.int64), axis=0))
    tl.atomic_max(facts + 3 * M, bad)


def plan_rows_triton(want: torch.Tensor, n: torch.Tensor, held: torch.Tensor, cap: torch.Tensor,
                     index_row: torch.Tensor, row_of: torch.Tensor, table: torch.Tensor, fresh: torch.Tensor,
                     positions: torch.Tensor, page: int, r_max: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """``recall_plan.plan_rows_torch`` in two launches (same arguments and results)."""
    m, k = want.shape
    span = row_of.shape[1] - 1
    entry_of = torch.full((m, span + 1), -1, dtype=torch.int32, device=want.device)
    _entry_of[(m, triton.cdiv(r_max, PLAN_BLOCK))](table, positions, held, entry_of, span, page, table.shape[1],
                                                   BLOCK=PLAN_BLOCK)  # fmt: skip
    dst, pool_src, host_rows = (torch.empty(m, k, dtype=torch.int64, device=want.device) for _ in range(3))
    facts = torch.zeros(3 * m + 1, dtype=torch.int64, device=want.device)
    facts[:m] = n
    _plan[(m, triton.cdiv(k, PLAN_BLOCK))](want, n, cap, index_row, row_of, entry_of, table, fresh, positions, dst,
                                           pool_src, host_rows, facts, m, k, span, page, table.shape[1],
                                           fresh.shape[1], BLOCK=PLAN_BLOCK)  # fmt: skip
    return {"dst": dst, "pool_src": pool_src, "host_rows": host_rows, "facts": facts}


@triton.jit(do_not_specialize=["lo", "n", "row_words", "per_head"])
def _recall_rows(pool, host, dst, pool_src, host_rows, head_start, lo, n, row_words, per_head, BLOCK_W: tl.constexpr,
                 TILE: tl.constexpr):  # fmt: skip
    lane = tl.arange(0, TILE)  # [TILE] entry within a tile
    cols = tl.arange(0, BLOCK_W)  # [BLOCK_W] word within a row chunk
    for first in range(lo + tl.program_id(0) * TILE, n, tl.num_programs(0) * TILE):
        i = first + lane
        ok = i < n
        d = tl.load(dst + i, mask=ok, other=-1)  # [TILE] int64 destination row
        p = tl.load(pool_src + i, mask=ok, other=-1)
        ok = ok & (d >= 0)
        from_pool = ok & (p >= 0)
        from_host = ok & (p < 0)
        h = tl.load(head_start + i // per_head, mask=from_host, other=0)  # word offset of the head's row 0
        h += tl.load(host_rows + i, mask=from_host, other=0) * row_words
        for c in range(0, row_words, BLOCK_W):
            cc = c + cols
            cm = (cc < row_words)[None, :]
            a = tl.load(pool + p[:, None] * row_words + cc[None, :], mask=from_pool[:, None] & cm)
            b = tl.load(host + h[:, None] + cc[None, :], mask=from_host[:, None] & cm)
            tl.store(pool + d[:, None] * row_words + cc[None, :], tl.where(from_pool[:, None], a, b),
                     mask=ok[:, None] & cm)  # fmt: skip


def recall_rows_triton(pool: torch.Tensor, host: torch.Tensor, dst: torch.Tensor, pool_src: torch.Tensor,
                       host_rows: torch.Tensor, head_start: torch.Tensor, per_head: int, row_words: int, ctas: int,
                       tile_words: int = 4096, warps: int = 8, lo: int = 0, hi: int | None = None) -> None:  # fmt: skip
    """pool: [R * row_words] words (CUDA); host: [W] words of the same dtype (a CUDA view of
    pinned memory); dst, pool_src, host_rows: [E] int64 on the device, entry i of head
    i // per_head, whose host row 0 starts at word head_start[i // per_head]; entries [lo,
    hi) move (hi None: E). ``ctas`` programs each move ``tile_words`` words per pass with
    ``warps`` warps."""
    n = dst.numel() if hi is None else hi
    block_w = min(triton.next_power_of_2(row_words), tile_words // 2)
    tile = tile_words // block_w
    grid = (max(1, min(ctas, triton.cdiv(n - lo, tile))),)
    _recall_rows[grid](pool, host, dst, pool_src, host_rows, head_start, lo, n, row_words, per_head, BLOCK_W=block_w,
                       TILE=tile, num_warps=warps)  # fmt: skip
