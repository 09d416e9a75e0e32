"""PagedKV: every layer's K/V in one static pool of pages, a page table per (layer, sequence,
KV head), and a length per (layer, sequence, KV head).

The pool is ``kv [num_pages * P, 2, D]`` (K and V of one token side by side, so a head's
rows are one contiguous run inside a page and a recalled row lands in one copy) plus the
logical position of every row, ``positions [num_pages * P]``. Entry ``i`` of head (l, b, h)
is row ``page_table[l, b, h, i // P] * P + i % P``. Entries are packed and ascending in
position: entry 0 is the oldest token a head keeps. Heads keep different numbers of
entries, and pages freed by evictions return to the allocator.

Device tensors (page_table, lengths) are what the decode step reads; host mirrors of both
are what the engine plans with, so appends and grid sizes never read the device.
"""

from __future__ import annotations

import numpy as np
import torch

from hcpolicy._device import copy_from_host, upload
from hcpolicy.actions import head_index
from hcpolicy.observe import LayerCache

from .pages import PageAllocator


class PagedKV:
    def __init__(
        self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, num_pages: int,
        page_size: int, max_pages_per_head: int, device: torch.device, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_pages_per_head < 1:
            raise ValueError(f"max_pages_per_head must be >= 1, got {max_pages_per_head}")
        self.num_layers, self.max_batch, self.num_kv_heads = num_layers, batch_size, num_kv_heads
        self.batch_size = batch_size  # active sequences (``start``); tables hold max_batch rows
        self.head_dim, self.page_size, self.max_pages = head_dim, page_size, max_pages_per_head
        self.device, self.dtype = device, dtype
        # the last page is a trash page: padded writes land there, no head ever holds it
        self.allocator = PageAllocator(num_pages)
        self.trash_row = num_pages * page_size
        self.kv = torch.zeros((num_pages + 1) * page_size, 2, head_dim, dtype=dtype, device=device)  # [R, 2, D]
        self.keys, self.values = self.kv[:, 0], self.kv[:, 1]  # [R, D] views, row stride 2D: what decode reads
        self.positions = torch.zeros((num_pages + 1) * page_size, dtype=torch.int64, device=device)  # [R]
        shape = (num_layers, batch_size, num_kv_heads)
        self._table = torch.zeros(*shape, max_pages_per_head, dtype=torch.int64, device=device)  # [N, B, H, M]
        self._lengths = torch.zeros(shape, dtype=torch.int64, device=device)  # [N, B, H]
        self._host_table = torch.zeros(*shape, max_pages_per_head, dtype=torch.int64)
        self._host_pages = torch.zeros(shape, dtype=torch.int64)  # pages each head holds
        self._host_lengths = torch.zeros(shape, dtype=torch.int64)
        self._head_indices: dict[tuple[int, ...], torch.Tensor] = {}

    def start(self, batch_size: int) -> None:
        """Serve ``batch_size`` sequences (<= max_batch); every page must be free."""
        if not 1 <= batch_size <= self.max_batch:
            raise ValueError(f"batch size must be in [1, {self.max_batch}], got {batch_size}")
        if self.allocator.used_pages:
            raise RuntimeError("release() the previous sequences first")
        self.batch_size = batch_size

    # views of the active rows: same storage, so CUDA graphs see later updates
    @property
    def page_table(self) -> torch.Tensor:
        return self._table[:, : self.batch_size]

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths[:, : self.batch_size]

    @property
    def host_table(self) -> torch.Tensor:
        return self._host_table[:, : self.batch_size]

    @property
    def host_pages(self) -> torch.Tensor:
        return self._host_pages[:, : self.batch_size]

    @property
    def host_lengths(self) -> torch.Tensor:
        return self._host_lengths[:, : self.batch_size]

    # -- sizes -------------------------------------------------------------------------------
    @property
    def capacity(self) -> torch.Tensor:
        """[N, B, H] entries each head can hold without new pages (host)."""
        return self.host_pages * self.page_size

    def pool_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def used_bytes(self) -> int:
        """Bytes of the pages heads hold now (what the policy leaves on the device)."""
        return self.allocator.used_pages * self.page_size * 2 * self.head_dim * self.kv.element_size()

    def kept_tokens(self) -> int:
        return int(self.host_lengths.sum())

    # -- pages ---------------------------------------------------------------------------------
    def pages_for(self, entries: int) -> int:
        return -(-entries // self.page_size)

    def set_pages(self, layer: int, b: int, h: int, pages: torch.Tensor) -> None:
        """Give head (layer, b, h) exactly ``pages`` (its old pages must have been freed)."""
        self.set_pages_many([(layer, b, h)], [pages])

    def set_pages_many(self, keys: list[tuple[int, int, int]], pages: list[torch.Tensor]) -> torch.Tensor:
        """``set_pages`` for many heads (layer, b, h) at once (numpy: a few microseconds a
        head). Returns their old pages, concatenated (host int64), for the caller to free."""
        table, held = self._host_table.numpy(), self._host_pages.numpy()
        old = []
        for (layer, b, h), p in zip(keys, pages):
            n, m = p.numel(), int(held[layer, b, h])
            if n > self.max_pages:
                raise ValueError(f"a head needs {n} pages but max_pages_per_head is {self.max_pages}")
            row = table[layer, b, h]
            old.append(row[:m].copy())
            row[:n] = p.numpy()
            row[n:m] = 0
            held[layer, b, h] = n
        return torch.from_numpy(np.concatenate(old)) if old else torch.empty(0, dtype=torch.int64)

    def head_pages(self, layer: int, b: int, h: int) -> torch.Tensor:
        return self.host_table[layer, b, h, : int(self.host_pages[layer, b, h])]

    def free_head(self, layer: int, b: int, h: int) -> None:
        self.allocator.free(self.head_pages(layer, b, h))
        self.set_pages(layer, b, h, torch.empty(0, dtype=torch.int64))
        self.host_lengths[layer, b, h] = 0

    def grow(self, layer: int, b: int, h: int, entries: int) -> None:
        """Make head (layer, b, h) able to hold ``entries`` entries (adds pages at its end)."""
        need = self.pages_for(entries) - int(self.host_pages[layer, b, h])
        if need > 0:
            self.set_pages(layer, b, h, torch.cat([self.head_pages(layer, b, h), self.allocator.allocate(need)]))

    def push_tables(self, layer: int | None = None) -> None:
        """Copy the host page tables and lengths (of one layer, or all) to the device, in
        stream order and without a host sync (``copy_from_host``)."""
        where = slice(None) if layer is None else layer
        copy_from_host(self.page_table[where], self.host_table[where])
        copy_from_host(self.lengths[where], self.host_lengths[where])

    def release(self) -> None:
        """Free every page (the pool itself stays allocated)."""
        held = self._host_pages > 0
        for layer, b, h in torch.nonzero(held).tolist():
            self.allocator.free(self._host_table[layer, b, h, : int(self._host_pages[layer, b, h])])
        self.allocator.drain()
        self._host_table.zero_()
        self._host_pages.zero_()
        self._host_lengths.zero_()
        self._table.zero_()
        self._lengths.zero_()

    # -- rows ----------------------------------------------------------------------------------
    def rows(self, layer: int, entries: torch.Tensor, heads: list[int] | None = None) -> torch.Tensor:
        """Pool rows of entries [B, H', K] (int64, device) of ``heads`` of ``layer``."""
        table = self.page_table[layer] if heads is None else self.page_table[layer][:, self.head_index(heads)]
        page = table.gather(-1, (entries // self.page_size).clamp(max=self.max_pages - 1))
        return page * self.page_size + entries % self.page_size

    def head_index(self, heads: list[int]) -> slice | torch.Tensor:
        """An index of KV heads for device tensors that costs no host sync (``actions.head_index``)."""
        return head_index(heads, self.device, self._head_indices)

    def contiguous_run(self, layer: int, b: int, h: int, entries: int) -> int | None:
        """First pool row of head (layer, b, h)'s first ``entries`` entries when they are one
        contiguous run of rows (host check), else None."""
        n = self.pages_for(entries)
        if n == 0:
            return None
        pages = self.host_table[layer, b, h, :n]
        if n > int(self.host_pages[layer, b, h]) or not torch.equal(pages, pages[0] + torch.arange(n)):
            return None
        return int(pages[0]) * self.page_size

    def _strided_base(self, layer: int, heads: list[int], entries: int) -> tuple[int, int, int] | None:
        """(first row, row stride between sequences, between heads) when every (b, h) of
        ``heads`` holds its first ``entries`` entries in one run and the runs sit at a
        uniform stride: then [B, H', entries] is a strided view of the pool."""
        bases = [[self.contiguous_run(layer, b, h, entries) for h in heads] for b in range(self.batch_size)]
        if any(x is None for row in bases for x in row):
            return None
        base = torch.tensor(bases)  # [B, H']
        sb = int(base[1, 0] - base[0, 0]) if self.batch_size > 1 else 0
        sh = int(base[0, 1] - base[0, 0]) if len(heads) > 1 else 0
        expect = base[0, 0] + sb * torch.arange(self.batch_size)[:, None] + sh * torch.arange(len(heads))
        if not torch.equal(base, expect) or sb < 0 or sh < 0:
            return None
        return int(base[0, 0]), sb, sh

    def entries_view(
        self, layer: int, heads: list[int] | None = None, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``width`` entries (default: the longest head) of ``heads``: keys and
        values [B, H', W, D] and positions [B, H', W]. A strided view of the pool when the
        heads' runs allow it (no copy), else a gathered copy; entries past a head's length
        are padding."""
        heads = list(range(self.num_kv_heads)) if heads is None else list(heads)
        if width is None:
            width = int(self.host_lengths[layer][:, heads].max()) if heads else 0
        width = max(width, 1)
        strided = self._strided_base(layer, heads, width)
        d = self.head_dim
        if strided is not None:
            base, sb, sh = strided
            shape, b, h = (self.batch_size, len(heads), width), self.batch_size, len(heads)
            kv = self.kv.as_strided((b, h, width, 2, d), (sb * 2 * d, sh * 2 * d, 2 * d, d, 1), base * 2 * d)
            pos = self.positions.as_strided(shape, (sb, sh, 1), base)
            return kv[..., 0, :], kv[..., 1, :], pos
        entries = torch.arange(width, device=self.device).expand(self.batch_size, len(heads), width)
        lengths = self.lengths[layer][:, self.head_index(heads)].unsqueeze(-1)
        entries = torch.minimum(entries, (lengths - 1).clamp(min=0))  # padding re-reads a real row
        rows = self.rows(layer, entries, heads)  # [B, H', W]
        kv = self.kv[rows]  # [B, H', W, 2, D]
        return kv[..., 0, :], kv[..., 1, :], self.positions[rows]

    def view(self, layer: int, heads: list[int] | None = None, starts: torch.Tensor | None = None) -> LayerCache:
        """The device KV of ``heads`` of ``layer`` as a padded LayerCache (see entries_view)."""
        idx = list(range(self.num_kv_heads)) if heads is None else list(heads)
        keys, values, positions = self.entries_view(layer, idx)
        lengths = self.lengths[layer][:, self.head_index(idx)]
        return LayerCache(keys=keys, values=values, positions=positions, lengths=lengths, starts=starts)

    def prefill_view(self, layer: int, starts: list[int], starts_tensor: torch.Tensor | None) -> LayerCache:
        """A just-prefilled layer as a dense LayerCache in logical layout: index j is
        position j of every sequence ([B, H, L_max, D]); a sequence's left padding
        (positions below starts[b], never stored) reads as invalid rows. This is the layout
        transformers' caches have at prefill, which policies' budget and pooling code expect."""
        if not any(starts):
            cache = self.view(layer)
            return LayerCache.dense(cache.keys, cache.values)
        length = int(self.host_lengths[layer].max())  # the longest prompt has no padding
        j = torch.arange(length, device=self.device)
        if starts_tensor is None:
            starts_tensor = upload(starts, self.device)
        shift = starts_tensor.view(-1, 1, 1)  # [B, 1, 1]
        entries = (j - shift).clamp(min=0).expand(self.batch_size, self.num_kv_heads, length)
        kv = self.kv[self.rows(layer, entries)]  # [B, H, L, 2, D]
        return LayerCache.dense(kv[..., 0, :], kv[..., 1, :], starts=starts_tensor, host_starts=starts)

    # -- writing -------------------------------------------------------------------------------
    def write(self, layer: int, b: int, first: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Entries [first, first + n) of every head of sequence b: k, v [H, n, D]; positions [n].
        The heads must hold pages for them (host lengths become first + n)."""
        n = k.shape[1]
        rows = self._rows_of_seq(layer, b, torch.arange(first, first + n, device=self.device).expand(self.num_kv_heads, n))
        self.kv.index_copy_(0, rows.reshape(-1), torch.stack([k, v], dim=2).reshape(-1, 2, self.head_dim))
        self.positions.index_copy_(0, rows.reshape(-1), positions.expand(self.num_kv_heads, n).reshape(-1))
        self.host_lengths[layer, b] = first + n
        self.lengths[layer, b] = first + n

    def sequence_view(self, layer: int, b: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries [0, width) of every head of sequence b: keys, values [1, H, W, D] (a strided
        view of the pool when the heads' runs allow it, else a gathered copy)."""
        runs = [self.contiguous_run(layer, b, h, width) for h in range(self.num_kv_heads)]
        d, h_kv = self.head_dim, self.num_kv_heads
        if all(r is not None for r in runs):
            stride = runs[1] - runs[0] if h_kv > 1 else 0
            if stride >= 0 and all(r == runs[0] + h * stride for h, r in enumerate(runs)):
                kv = self.kv.as_strided((1, h_kv, width, 2, d), (0, stride * 2 * d, 2 * d, d, 1), runs[0] * 2 * d)
                return kv[..., 0, :], kv[..., 1, :]
        entries = torch.arange(width, device=self.device).expand(h_kv, width)
        kv = self.kv[self._rows_of_seq(layer, b, entries)].unsqueeze(0)  # [1, H, W, 2, D]
        return kv[..., 0, :], kv[..., 1, :]

    def head_rows(self, layer: int, b: int, h: int, entries: torch.Tensor) -> torch.Tensor:
        """Pool rows of entries [K] (device int64) of head (layer, b, h)."""
        table = self.page_table[layer, b, h]  # [M]
        return table[(entries // self.page_size).clamp(max=self.max_pages - 1)] * self.page_size + entries % self.page_size

    def _rows_of_seq(self, layer: int, b: int, entries: torch.Tensor) -> torch.Tensor:
        table = self.page_table[layer, b]  # [H, M]
        return table.gather(-1, entries // self.page_size) * self.page_size + entries % self.page_size

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
               fused: bool = False) -> None:  # fmt: skip
        """One new token per sequence for every head: k, v [B, H, 1, D]; positions [B] logical.
        Device-only (no host sync, fixed shapes): the decode step and CUDA graphs call it. The
        host mirror is advanced by ``advance`` once per step. ``fused``: one Triton launch
        (CUDA) instead of the ~10 small torch ops below, which are its reference."""
        if fused:
            from ._fused_triton import append_kv

            append_kv(self.kv, self.positions, self.page_table[layer], self.lengths[layer], k, v, positions,
                      self.page_size)  # fmt: skip
            return
        lengths = self.lengths[layer]  # [B, H]
        rows = self.rows(layer, lengths.unsqueeze(-1)).squeeze(-1)  # [B, H]
        new = torch.stack([k[:, :, 0], v[:, :, 0]], dim=2)  # [B, H, 2, D]
        self.kv.index_copy_(0, rows.reshape(-1), new.reshape(-1, 2, self.head_dim))
        self.positions.index_copy_(0, rows.reshape(-1), positions.unsqueeze(1).expand_as(rows).reshape(-1))
        lengths += 1

    def advance(self, layer: int | None = None) -> None:
        """Host mirror of one append to every head (of one layer, or all)."""
        self.host_lengths[slice(None) if layer is None else layer] += 1
