"""Planning an async recall batch on the device (``AsyncRecalls`` issues and lands it).

``plan_batch`` turns the Recall actions of M heads into three row lists for one gather
kernel (``recall_rows``): the fresh pool row of each recalled entry, and where it comes
from: a pool row when the head holds that position already, else its row in the host
store. All of it is device ops over every head at once; the host contributes only what
it knows (the heads, their resident counts, the fresh pages it booked) in one upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from hcpolicy._device import upload
from hcpolicy.actions import Recall
from hcpolicy.kernels._triton import have_triton

if TYPE_CHECKING:
    from hcpolicy.runtime.hostrows import HostRows

    from .kv import PagedKV

Key = tuple[int, int, int]  # (layer, sequence, KV head)
GATHER_CTAS = 16  # programs of the recall gather: enough for PCIe, few SMs taken from decode


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
    ``facts`` [3M + 1]."""
    dev = kv.device
    width = max(a.selection.indices.shape[-1] for a in actions)
    want = torch.cat([F.pad(a.selection.indices.to(dev).flatten(0, 1), (0, width - a.selection.indices.shape[-1]))
                      if a.selection.indices.shape[-1] < width else a.selection.indices.to(dev).flatten(0, 1)
                      for a in actions])  # [M, K]  # fmt: skip
    n = torch.cat([a.selection.lengths.to(dev).flatten() for a in actions])  # [M]
    k = torch.arange(width, device=dev)
    valid = k < n.unsqueeze(1)  # [M, K] (Selection.valid, all heads at once)
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
    facts, fresh = meta[: 6 * m].view(6, m), meta[6 * m :].view(m, p)
    held, cap = facts[3].unsqueeze(1), facts[4].unsqueeze(1)  # [M, 1]
    valid = valid & (k < cap)  # never past the pages booked on the host (a bad action is flagged)
    # where each wanted position sits in its head's host block (one gather)
    span = index.span
    at_pos = want.clamp(min=0, max=span)  # [M, K]; a position past every head reads as missing
    host_rows = index.row_of[facts[5].unsqueeze(1), at_pos]  # [M, K] int32, -1: never offloaded
    missing = ((host_rows < 0) | (want >= span)) & valid
    host_rows = host_rows.clamp(min=0).long()
    # which ones the head holds now (its first ``resident`` entries), and their pool rows:
    # entry of each position by one scatter and one gather
    r_max = max(max(resident[k] for k in keys), 1)
    entries = torch.arange(r_max, device=dev)
    table = kv._table[facts[0], facts[1], facts[2]]  # [M, max pages]
    e = torch.minimum(entries, (held - 1).clamp(min=0))  # [M, R]
    rows = table.gather(1, e // kv.page_size) * kv.page_size + e % kv.page_size
    now = torch.where(entries < held, kv.positions[rows].clamp(max=span), span)  # [M, R]; span: padding
    entry_of = torch.full((m, span + 1), -1, dtype=torch.int32, device=dev)
    entry_of.scatter_(1, now, entries.to(torch.int32).expand(m, -1))
    at = entry_of.gather(1, at_pos).long()  # [M, K] entry holding each wanted position, -1: none
    hit = (at >= 0) & (want < span) & valid
    pool_src = torch.where(hit, rows.gather(1, at.clamp(min=0)), -1)
    # the fresh rows, and the recalled positions written there now (nothing reads them yet)
    dst = fresh.gather(1, (k // kv.page_size).expand(m, -1)) * kv.page_size + k % kv.page_size
    dst = torch.where(valid, dst, -1)
    kv.positions.index_copy_(0, torch.where(valid, dst, kv.trash_row).flatten(), want.flatten())
    bad = missing.any() | _not_ascending(want, valid) | (n > cap[:, 0]).any()
    facts = torch.cat([n, (valid & ~hit).sum(1), hit.sum(1), bad.view(1)]).to(torch.int64)
    return {"dst": dst, "pool_src": pool_src, "host_rows": host_rows, "fresh": fresh, "facts": facts}



def recall_rows(pool: torch.Tensor, view: "HostRows", dst: torch.Tensor, pool_src: torch.Tensor,
                host_src: torch.Tensor) -> None:  # fmt: skip
    """pool rows dst <- pool rows pool_src (>= 0) or the host words at host_src; dst < 0
    skips an entry. pool: [R, 2, D]; dst, pool_src, host_src: [M, K] int64 (device)."""
    words = pool.view(-1).view(torch.uint8).view(view.word)  # [R * row_words]
    dst, pool_src, host_src = dst.flatten(), pool_src.flatten(), host_src.flatten()
    if pool.is_cuda and have_triton():
        from ._recall_triton import recall_rows_triton

        recall_rows_triton(words, view.flat, dst, pool_src, host_src, view.row_words, GATHER_CTAS)
        return
    rows = words.view(-1, view.row_words)  # boolean indexing below syncs: CPU, or CUDA without triton
    take = dst >= 0
    held, far = take & (pool_src >= 0), take & (pool_src < 0)
    rows[dst[held]] = rows[pool_src[held]]
    cols = torch.arange(view.row_words, device=view.flat.device)
    rows[dst[far]] = view.flat[host_src[far].to(view.flat.device).unsqueeze(1) + cols].to(rows.device)


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
