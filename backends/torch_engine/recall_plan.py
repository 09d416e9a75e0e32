"""Planning an async recall batch on the device (``AsyncRecalls`` issues and lands it).

``plan_batch`` turns the Recall actions of M heads into three row lists for one gather
kernel (``recall_rows``): the fresh pool row of each recalled entry, and where it comes
from: a pool row when the head holds that position already, else its row in the host
store. All of it is device ops over every head at once (on CUDA two Triton launches,
``_recall_triton.plan_rows_triton``; elsewhere the torch ops of ``plan_rows_torch``); the
host contributes only what it knows (the heads, their resident counts, the fresh pages it
booked) in one upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from hcpolicy._device import upload
from hcpolicy.actions import ActionError, Recall
from hcpolicy.kernels._triton import have_triton

if TYPE_CHECKING:
    from hcpolicy.runtime.hostrows import HostRows

    from .kv import PagedKV

Key = tuple[int, int, int]  # (layer, sequence, KV head)


class OffloadedIndex:
    """For every offloaded head, its host row of each logical position: ``row_of`` [heads,
    span + 1] int32, -1 where the head offloaded no such position (the last column takes
    padding). A lookup is one gather, not a binary search per wanted position. Made again
    only after an offload changed the executor's positions."""

    def __init__(self, span: int) -> None:
        self.span = span  # logical positions are below it
        self._of: dict | None = None  # the executor's host_positions it was made from
        self._tensors: list[torch.Tensor] = []
        self.row: dict[Key, int] = {}
        self.row_of = torch.empty(0, 0, dtype=torch.int32)

    def update(self, held: dict[Key, torch.Tensor]) -> "OffloadedIndex":
        if self._of is held and len(self.row) == len(held) and all(
            self._tensors[i] is held[key] for key, i in self.row.items()
        ):  # fmt: skip
            return self
        stacked = torch.nn.utils.rnn.pad_sequence(list(held.values()), batch_first=True, padding_value=self.span)
        rows = torch.arange(stacked.shape[1], dtype=torch.int32, device=stacked.device).expand(stacked.shape)
        self.row_of = torch.full((stacked.shape[0], self.span + 1), -1, dtype=torch.int32, device=stacked.device)
        self.row_of.scatter_(1, stacked.clamp(max=self.span), rows)
        self._of, self._tensors = held, list(held.values())
        self.row = {key: i for i, key in enumerate(held)}
        return self


def plan_batch(kv: "PagedKV", resident: dict[Key, int], index: OffloadedIndex, actions: list[Recall],
               keys: list[Key], pages: Sequence[torch.Tensor], room: list[int]) -> dict[str, torch.Tensor]:  # fmt: skip
    """Device ops for M heads wanting up to K positions each: fresh rows ``dst`` [M, K]
    (-1: no entry), the pool row of each wanted position the head holds (``pool_src``,
    else -1) or its host row (``host_rows``), the fresh pages ``fresh`` [M, P] and
    ``facts`` [3M + 1]. The recalled positions are written to the fresh rows' positions."""
    dev = kv.device
    width = max(a.selection.indices.shape[-1] for a in actions)
    want = torch.cat([F.pad(a.selection.indices.to(dev).flatten(0, 1), (0, width - a.selection.indices.shape[-1]))
                      if a.selection.indices.shape[-1] < width else a.selection.indices.to(dev).flatten(0, 1)
                      for a in actions])  # [M, K]  # fmt: skip
    n = torch.cat([a.selection.lengths.to(dev).flatten() for a in actions])  # [M]
    # per head, in one upload: layer, sequence, head, resident entries, room for entries,
    # its row in the offloaded index; then its fresh pages, padded
    m, p = len(keys), max(x.numel() for x in pages)
    meta = np.zeros(6 * m + m * p, dtype=np.int64)
    meta[: 6 * m].reshape(6, m)[:] = [[key[0] for key in keys], [key[1] for key in keys], [key[2] for key in keys],
                                      [resident[key] for key in keys], room,
                                      [index.row[key] for key in keys]]  # fmt: skip
    fresh_host = meta[6 * m :].reshape(m, p)
    for i, x in enumerate(pages):
        fresh_host[i, : x.numel()] = x.numpy()
    meta = upload(torch.from_numpy(meta), dev)
    heads, fresh = meta[: 6 * m].view(6, m), meta[6 * m :].view(m, p)
    table = kv._table[heads[0], heads[1], heads[2]]  # [M, max pages] the pages each head holds now
    r_max = max(max(resident[k] for k in keys), 1)
    plan = plan_rows_torch
    if dev.type == "cuda" and have_triton():
        from ._recall_triton import plan_rows_triton as plan
    out = plan(want, n, heads[3], heads[4], heads[5], index.row_of, table, fresh, kv.positions, kv.page_size, r_max)
    return {**out, "fresh": fresh}


def plan_rows_torch(want: torch.Tensor, n: torch.Tensor, held: torch.Tensor, cap: torch.Tensor,
                    index_row: torch.Tensor, row_of: torch.Tensor, table: torch.Tensor, fresh: torch.Tensor,
                    positions: torch.Tensor, page: int, r_max: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """The plan of M heads: want [M, K] positions, the first n [M] of them valid; held [M]
    entries each head holds now, at most cap [M] entries recalled, index_row [M] its row in
    ``row_of`` (``OffloadedIndex``), table [M, max pages] its pages now, fresh [M, P] its
    fresh pages; positions [R] of the pool (the fresh rows' are written), page size, r_max
    >= max(held). Returns dst, pool_src, host_rows [M, K] and facts [3M + 1]: n, rows from
    the host, rows held, then 1 when some head asked for more than cap, for a position
    never offloaded or for positions not strictly ascending. (``plan_rows_triton`` on CUDA.)"""
    dev = want.device
    m, width = want.shape
    span = row_of.shape[1] - 1
    k = torch.arange(width, device=dev)
    held, cap = held.unsqueeze(1), cap.unsqueeze(1)  # [M, 1]
    valid = (k < n.unsqueeze(1)) & (k < cap)  # never past the pages booked on the host (a bad action is flagged)
    # where each wanted position sits in its head's host block (one gather)
    at_pos = want.clamp(min=0, max=span)  # [M, K]; a position past every head reads as missing
    host_rows = row_of[index_row.unsqueeze(1), at_pos]  # [M, K] int32, -1: never offloaded
    missing = ((host_rows < 0) | (want >= span)) & valid
    host_rows = host_rows.clamp(min=0).long()
    # which ones the head holds now (its first ``held`` entries), and their pool rows:
    # entry of each position by one scatter and one gather
    entries = torch.arange(r_max, device=dev)
    e = torch.minimum(entries, (held - 1).clamp(min=0))  # [M, R]
    rows = table.gather(1, e // page) * page + e % page
    now = torch.where(entries < held, positions[rows].clamp(max=span), span)  # [M, R]; span: padding
    entry_of = torch.full((m, span + 1), -1, dtype=torch.int32, device=dev)
    entry_of.scatter_(1, now, entries.to(torch.int32).expand(m, -1))
    at = entry_of.gather(1, at_pos).long()  # [M, K] entry holding each wanted position, -1: none
    hit = (at >= 0) & (want < span) & valid
    pool_src = torch.where(hit, rows.gather(1, at.clamp(min=0)), -1)
    # the fresh rows, and the recalled positions written there now (nothing reads them yet)
    dst = fresh.gather(1, (k // page).expand(m, -1)) * page + k % page
    dst = torch.where(valid, dst, -1)
    trash = positions.shape[0] - 1
    positions.index_copy_(0, torch.where(valid, dst, trash).flatten(), want.flatten())
    bad = missing.any() | _not_ascending(want, valid) | (n > cap[:, 0]).any()
    facts = torch.cat([n, (valid & ~hit).sum(1), hit.sum(1), bad.view(1)]).to(torch.int64)
    return {"dst": dst, "pool_src": pool_src, "host_rows": host_rows, "facts": facts}


def recall_rows(pool: torch.Tensor, view: "HostRows", dst: torch.Tensor, pool_src: torch.Tensor,
                host_rows: torch.Tensor, shape: tuple[int, int, int], lo: int = 0,
                hi: int | None = None) -> None:  # fmt: skip
    """pool rows dst <- pool rows pool_src (>= 0) or host row host_rows of the head (row m
    of the [M, K] arguments is ``view``'s key m); dst < 0 skips an entry. pool: [R, 2, D];
    dst, pool_src, host_rows: [M, K] int64 (device). Only the flat entries [lo, hi) move
    (hi None: all), so a batch's gather can go out in chunks. ``shape``: the Triton
    launch's (programs, warps, words per pass), ``TransferRuntime.gather_shape``."""
    words = pool.view(-1).view(torch.uint8).view(view.word)  # [R * row_words]
    per_head = dst.shape[1]
    hi = dst.numel() if hi is None else hi
    starts = upload(view.starts, dst.device)  # [M] word of each head's host row 0
    dst, pool_src, host_rows = dst.flatten(), pool_src.flatten(), host_rows.flatten()
    if pool.is_cuda and have_triton():
        from ._recall_triton import recall_rows_triton

        ctas, warps, tile_words = shape
        recall_rows_triton(words, view.flat, dst, pool_src, host_rows, starts, per_head, view.row_words, ctas,
                           tile_words=tile_words, warps=warps, lo=lo, hi=hi)  # fmt: skip
        return
    rows = words.view(-1, view.row_words)  # boolean indexing below syncs: CPU, or CUDA without triton
    dst, pool_src = dst[lo:hi], pool_src[lo:hi]
    take = dst >= 0
    held, far = take & (pool_src >= 0), take & (pool_src < 0)
    rows[dst[held]] = rows[pool_src[held]]
    host_src = starts.repeat_interleave(per_head)[lo:hi] + host_rows[lo:hi] * view.row_words
    cols = torch.arange(view.row_words, device=view.flat.device)
    rows[dst[far]] = view.flat[host_src[far].to(view.flat.device).unsqueeze(1) + cols].to(rows.device)


def recall_keys(action: Recall, batch: int, offloaded: dict) -> list[Key]:
    """The (layer, sequence, KV head) keys ``action`` recalls, sequences outer; ActionError
    for a head with nothing offloaded (``offloaded``: the executor's host positions)."""
    keys = [(action.layer, b, h) for b in range(batch) for h in action.heads]
    for key in keys:
        if key not in offloaded:
            raise ActionError(f"layer {key[0]} head {key[2]}: Recall without an earlier Offload")
    return keys


def sizes(actions: Sequence[Recall], batch: int) -> list[int]:
    """Entries each head of the actions may recall, known on the host: the selection's
    host lengths when it carries them, else its width."""
    sizes = []
    for a in actions:
        host = a.selection.host_lengths
        if host is not None:
            sizes += host.flatten().tolist()
        else:
            sizes += [a.selection.indices.shape[-1]] * (batch * len(a.heads))
    return sizes


def _not_ascending(want: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[] bool: some head's valid positions are not strictly ascending. want/valid [..., K]."""
    if want.shape[-1] < 2:
        return torch.zeros((), dtype=torch.bool, device=want.device)
    step_ok = (want[..., 1:] > want[..., :-1]) | ~valid[..., 1:]
    return ~step_ok.all()
