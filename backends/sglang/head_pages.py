"""HeadPages: one compressed request's KV, head-major, in pages of SGLang's own KV pool.

SGLang's pool is token-major: slot s holds one token for every layer and KV head,
``k_buffer[layer][s] -> [H, D]``. Read as rows, ``k_buffer[layer].view(-1, D)``, an
SGLang page of P slots is, in each layer, a run of ``P * H`` rows. HeadPages uses each
(page, layer) pair as a page of one KV head: entry i of head (layer, h) is row
``table[layer, h, i // R] * R + i % R`` with ``R = P * H`` (the rows per page), in the
layer's K and V row views. Entries are packed; a head keeps as many as its policy left it.

The pages come from SGLang's allocator and are the request's own: in each layer every page
serves at most one head, and a page used by no layer goes back to the allocator. So SGLang's
scheduler sees the memory a policy saves (``available_size``) without a pool of its own:
one page holds H rows per layer, exactly one token's share, so a request holding n pages
uses what n tokens of uncompressed KV would.

Positions: entries hold ascending logical positions. Head (layer, h) holds the positions in
``explicit[layer][h]`` (a device tensor) followed by every position from
``tail[layer, h]`` to the sequence's end: decode appends need no bookkeeping per head.

Host state (numpy) plans every change; device copies of the tables are what attention
reads, and the rows of a head's entries are computed from them on the device. Host reads
of device memory: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class OutOfSlots(MemoryError):
    """SGLang's allocator has fewer free pages than a compressed request needs."""


class HeadPages:
    """Head-major pages of one request.

    pool: SGLang's KV pool (``get_key_buffer(layer)`` -> [slots, H, D], contiguous);
    allocator: SGLang's token allocator (``alloc(n)`` in whole pages, ``free(slots)``);
    page_size: the allocator's page size P (slots per page).
    """

    def __init__(self, *, num_layers: int, num_kv_heads: int, pool: Any, allocator: Any, page_size: int) -> None:
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.pool, self.allocator, self.page_size = pool, allocator, page_size
        self.rows_per_page = page_size * num_kv_heads
        self.device = pool.get_key_buffer(0).device
        self.pages = np.zeros(0, dtype=np.int64)  # SGLang page ids this request holds
        self.used = np.zeros((num_layers, 0), dtype=bool)  # [N, n_pages]: page serves a head of that layer
        self.table = np.zeros((num_layers, num_kv_heads, 0), dtype=np.int64)  # [N, H, M] page ids
        self.held = np.zeros((num_layers, num_kv_heads), dtype=np.int64)  # pages per head
        self.lengths = np.zeros((num_layers, num_kv_heads), dtype=np.int64)  # entries per head
        self.tail = np.zeros((num_layers, num_kv_heads), dtype=np.int64)  # first implicit position
        self.prompt_entries = np.zeros((num_layers, num_kv_heads), dtype=np.int64)  # entries below the prompt's end
        self.explicit: list[list[torch.Tensor]] = [[_EMPTY] * num_kv_heads for _ in range(num_layers)]
        self.device_table = torch.zeros(num_layers, num_kv_heads, 0, dtype=torch.int32, device=self.device)
        self._dirty: list[tuple[int, int, int, int]] = []  # (layer, h, index, page) not yet on the device

    # -- rows ----------------------------------------------------------------------------------
    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return row_views(self.pool, layer)

    def entry_rows(self, layer: int, h: int, entries: np.ndarray) -> np.ndarray:
        """Row numbers (host int64) of entries of head (layer, h)."""
        r = self.rows_per_page
        return self.table[layer, h, entries // r] * r + entries % r

    def positions(self, layer: int, h: int, length: int) -> torch.Tensor:
        """The positions head (layer, h) holds, ascending (device int64), for a sequence of
        ``length`` positions."""
        tail = int(self.tail[layer, h])
        rest = torch.arange(tail, length, device=self.device) if tail < length else _EMPTY.to(self.device)
        return torch.cat([self.explicit[layer][h], rest])

    # -- pages ---------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return int(self.pages.size)

    def adopt(self, pages: np.ndarray) -> None:
        """Take SGLang pages (already allocated for this request) as free pages of every layer."""
        pages = np.asarray(pages, dtype=np.int64)
        pages = pages[~np.isin(pages, self.pages)]
        if pages.size == 0:
            return
        self.pages = np.concatenate([self.pages, pages])
        self.used = np.concatenate([self.used, np.zeros((self.num_layers, pages.size), dtype=bool)], axis=1)

    def take(self, layer: int, n: int) -> np.ndarray:
        """``n`` pages free in ``layer`` (more from SGLang's allocator if needed), now used there."""
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        free = np.flatnonzero(~self.used[layer])
        if free.size < n:
            self.adopt(self._allocate(n - free.size))
            free = np.flatnonzero(~self.used[layer])
        # pages other layers use first: a page goes back to SGLang only once no layer uses it
        elsewhere = self.used[:, free].any(axis=0)
        index = np.concatenate([free[elsewhere], free[~elsewhere]])[:n]
        self.used[layer, index] = True
        return self.pages[index]

    def give_back(self, layer: int, pages: np.ndarray) -> None:
        """``pages`` no longer serve a head of ``layer``."""
        if pages.size:
            self.used[layer, np.isin(self.pages, pages)] = False

    def return_unused(self) -> int:
        """Pages no layer uses go back to SGLang's allocator; returns how many."""
        idle = ~self.used.any(axis=0)
        if not idle.any():
            return 0
        self._free(self.pages[idle])
        self.pages, self.used = self.pages[~idle], self.used[:, ~idle]
        return int(idle.sum())

    def return_if_idle(self, page: int) -> int:
        """``page`` back to SGLang's allocator if no layer uses it (a decode step's adopted
        slot that no head needed yet; cheaper than ``return_unused``'s scan); returns 1 if so."""
        index = np.flatnonzero(self.pages == page)
        if index.size == 0 or self.used[:, index[0]].any():
            return 0
        self._free(self.pages[index])
        self.pages, self.used = np.delete(self.pages, index), np.delete(self.used, index, axis=1)
        return 1

    def release(self) -> None:
        """Every page back to SGLang's allocator."""
        self._free(self.pages)
        self.pages = np.zeros(0, dtype=np.int64)
        self.used = np.zeros((self.num_layers, 0), dtype=bool)
        self.held[:] = 0
        self.lengths[:] = 0

    def _allocate(self, pages: int) -> np.ndarray:
        slots = self.allocator.alloc(pages * self.page_size)
        if slots is None:
            raise OutOfSlots(
                f"hcpolicy: SGLang's KV pool has no {pages} free pages for a compressed request "
                f"({self.allocator.available_size()} slots free); lower --mem-fraction-static's load "
                "(fewer running requests) or the policy's compression"
            )
        return np.unique(slots.cpu().numpy().astype(np.int64) // self.page_size)

    def _free(self, pages: np.ndarray) -> None:
        if pages.size:
            p = self.page_size
            slots = (pages[:, None] * p + np.arange(p)).reshape(-1)
            self.allocator.free(torch.from_numpy(slots).to(self.device))

    # -- tables --------------------------------------------------------------------------------
    def _set_pages(self, layer: int, h: int, pages: np.ndarray) -> None:
        n = pages.size
        if n > self.table.shape[2]:
            width = max(n, 2 * self.table.shape[2], 16)
            grown = np.zeros((self.num_layers, self.num_kv_heads, width), dtype=np.int64)
            grown[:, :, : self.table.shape[2]] = self.table
            self.table = grown
        self.table[layer, h, :n] = pages
        self.table[layer, h, n:] = 0
        self.held[layer, h] = n
        self._dirty.append((layer, h, -1, -1))  # the whole head row

    def push(self) -> torch.Tensor:
        """The device page tables [N, H, M] (int32), updated from the host ones."""
        if self.device_table.shape[2] < self.table.shape[2]:
            self.device_table = torch.from_numpy(self.table.astype(np.int32)).to(self.device)
        elif self._dirty:
            heads = sorted({(layer, h) for layer, h, _, _ in self._dirty})
            index = torch.tensor(heads, dtype=torch.int64)
            rows = torch.from_numpy(self.table[index[:, 0].numpy(), index[:, 1].numpy()].astype(np.int32))
            self.device_table[index[:, 0].to(self.device), index[:, 1].to(self.device)] = rows.to(self.device)
        self._dirty.clear()
        return self.device_table

    # -- writing -------------------------------------------------------------------------------
    def rebuild(self, layer: int, h: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                length: int, prompt_entries: int) -> None:  # fmt: skip
        """Head (layer, h) now holds exactly ``positions`` (ascending device int64), the first
        ``prompt_entries`` of them in the prompt, with keys and values k, v [n, D] (already
        gathered: its old pages are given back first)."""
        n = positions.numel()
        self.prompt_entries[layer, h] = prompt_entries
        self.give_back(layer, self.table[layer, h, : self.held[layer, h]])
        pages = self.take(layer, -(-n // self.rows_per_page))
        self._set_pages(layer, h, pages)
        if n:
            rows = self._entry_rows(layer, h, n)
            k_rows, v_rows = self.rows(layer)
            k_rows.index_copy_(0, rows, k.to(k_rows.dtype))
            v_rows.index_copy_(0, rows, v.to(v_rows.dtype))
        self.lengths[layer, h] = n
        self.explicit[layer][h] = positions
        self.tail[layer, h] = length

    def read(self, layer: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, D] of every entry of head (layer, h) (a gathered copy)."""
        rows = self._entry_rows(layer, h, int(self.lengths[layer, h]))
        k_rows, v_rows = self.rows(layer)
        return k_rows[rows], v_rows[rows]

    def _entry_rows(self, layer: int, h: int, n: int, start: int = 0) -> torch.Tensor:
        """Rows of entries [start, n) of head (layer, h), computed on the device from its table."""
        r = self.rows_per_page
        entries = torch.arange(start, n, device=self.device)
        return self.push()[layer, h][entries // r].long() * r + entries % r

    def pages_needed_next(self) -> int:
        """New pages the next ``plan_append`` takes beyond those the request already holds
        (host only): in each layer, the heads with a full last page less the layer's free pages."""
        full = (self.lengths >= self.held * self.rows_per_page).sum(axis=1)  # [N]
        free = (~self.used).sum(axis=1)
        return int(max(0, (full - free).max())) if full.size else 0

    def plan_append(self) -> np.ndarray:
        """Room for one more entry in every head (pages taken where a head is full); returns
        the rows [N, H] (host int64) the new token's K and V go to, and counts the entry."""
        r = self.rows_per_page
        full = self.lengths >= self.held * r
        for layer in np.flatnonzero(full.any(axis=1)):
            heads = np.flatnonzero(full[layer])
            pages = self.take(int(layer), heads.size)
            for h, page in zip(heads, pages):
                n = int(self.held[layer, h])
                if n + 1 > self.table.shape[2]:
                    self._set_pages(int(layer), int(h), np.append(self.table[layer, h, :n], page))
                else:
                    self.table[layer, h, n] = page
                    self.held[layer, h] = n + 1
                    self._dirty.append((int(layer), int(h), n, int(page)))
        entries = self.lengths
        rows = np.take_along_axis(self.table, (entries // r)[..., None], axis=2)[..., 0] * r + entries % r
        self.lengths = self.lengths + 1
        return rows

    def replace_prompt(self, layer: int, heads: list[int], prompt_kv: list[torch.Tensor], prompt: list[torch.Tensor],
                       length: int) -> None:  # fmt: skip
        """Each head's prompt entries become ``prompt[i]`` (ascending device positions) with
        K/V ``prompt_kv[i]`` [n_i, 2, D]; its entries past the prompt (decode tokens) stay, in
        order. One gather of those, one write of everything (a recall of whole heads)."""
        k_rows, v_rows = self.rows(layer)
        kept = [(int(self.prompt_entries[layer, h]), int(self.lengths[layer, h])) for h in heads]
        tails = [self._entry_rows(layer, h, n, start) for h, (start, n) in zip(heads, kept)]
        tail_positions = [self.positions(layer, h, length)[start:] for h, (start, _) in zip(heads, kept)]
        rows = torch.cat(tails)
        tail_k, tail_v = k_rows[rows].split([len(t) for t in tails]), v_rows[rows].split([len(t) for t in tails])
        dest, keys, values = [], [], []
        for i, h in enumerate(heads):
            start, n = kept[i]
            count = prompt[i].numel() + n - start
            self.give_back(layer, self.table[layer, h, : self.held[layer, h]])
            self._set_pages(layer, h, self.take(layer, -(-count // self.rows_per_page)))
            dest.append(self.entry_rows(layer, h, np.arange(count)))
            keys += [prompt_kv[i][:, 0], tail_k[i]]
            values += [prompt_kv[i][:, 1], tail_v[i]]
            intact = n - start == length - self.tail[layer, h] and self.explicit[layer][h].numel() <= start
            if intact:  # every decode token is held and implicit: it stays so
                self.explicit[layer][h] = prompt[i]
            else:
                self.explicit[layer][h] = torch.cat([prompt[i], tail_positions[i]])
                self.tail[layer, h] = length
            self.lengths[layer, h] = count
            self.prompt_entries[layer, h] = prompt[i].numel()
        index = torch.from_numpy(np.concatenate(dest)).to(self.device)
        k_rows.index_copy_(0, index, torch.cat(keys).to(k_rows.dtype))
        v_rows.index_copy_(0, index, torch.cat(values).to(v_rows.dtype))

    def kept_entries(self) -> int:
        return int(self.lengths.sum())


_EMPTY = torch.zeros(0, dtype=torch.int64)


def row_views(pool: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's K and V of SGLang's pool as rows [slots * H, D] (views of its buffers)."""
    k, v = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
    return k.view(-1, k.shape[-1]), v.view(-1, v.shape[-1])


def stack_tables(requests: Sequence[HeadPages]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Page tables [N, B, H, M] (int32) and lengths [N, B, H] (int32) of ``requests`` for one
    decode step (after their ``plan_append``), and the longest head's entries (host)."""
    tables = [r.push() for r in requests]
    width = max(1, max(t.shape[2] for t in tables))
    tables = [torch.nn.functional.pad(t, (0, width - t.shape[2])) if t.shape[2] < width else t for t in tables]
    host = np.stack([r.lengths for r in requests], axis=1)
    lengths = torch.from_numpy(host.astype(np.int32))
    return torch.stack(tables, dim=1), lengths.to(tables[0].device), int(host.max())
