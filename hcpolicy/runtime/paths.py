"""Recall paths: how a validated batch of requests reaches the device.

Each path is one ``issue`` method. The runtime calls it with the copy stream current and
that stream already ordered after the compute stream and after the offloads of every
block involved, then records one event behind whatever the path enqueued.

- ``ZeroCopyPath`` (CUDA default): one GPU gather per row size that reads the pinned
  store directly over PCIe (no DMA, no staging); the measured fastest for scattered rows.
  Its triton kernel reads the row indices themselves (device rows as given, host rows
  after one DMA), so the host does O(requests) work per recall, none per row.
- ``StagedPath``: the host gathers rows into pinned staging, one DMA per chunk, two
  staging buffers alternating so host gathers overlap DMAs.
- ``DirectPath``: one DMA per run of consecutive rows; the baseline (fine for long runs).
- ``HostPath``: the CPU runtime; the same gathers as the other paths, synchronously.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch

from hcpolicy.runtime.counters import Tally
from hcpolicy.runtime.plan import (MAX_UNIT_BYTES, GatherGroup, RecallRequest, by_row_size, group_requests,
                                   request_table, runs)
from hcpolicy.runtime.staging import IndexRing, StagingRing
from hcpolicy.runtime.store import pending_offload
from hcpolicy.runtime.window import WindowCache, word_for


class RecallPath(ABC):
    """Moves a batch of requests (non-empty, validated) into their ``out`` tensors."""

    needs_host_rows: bool = False
    """Whether ``rows`` must be on the CPU (the runtime moves device rows there first)."""

    def __init__(self, device: torch.device, tally: Tally) -> None:
        self.device = device
        self.tally = tally

    @abstractmethod
    def issue(self, requests: Sequence[RecallRequest]) -> None:
        """Enqueue (CUDA) or perform (CPU) every request on the current stream."""

    def validate(self, requests: Sequence[RecallRequest]) -> None:
        """ValueError for requests this path cannot serve (called before anything is issued)."""


class HostPath(RecallPath):
    needs_host_rows = True

    def issue(self, requests: Sequence[RecallRequest]) -> None:
        for group in group_requests(requests):
            dst = group.destination(self.device)  # [U, unit_words]
            view = group.window.host_view(group.unit_bytes)  # [slots, unit_words]
            torch.index_select(view, 0, group.slot_index(), out=dst)
            group.scatter(dst)
            self.tally.add(gathers=1, h2d_bytes=group.nbytes)


class ZeroCopyPath(RecallPath):
    """kernel: 'triton' (one launch per row size, from the row indices straight into every
    ``out``: ``ctas`` programs of ``warps`` warps, each moving ``tile_words`` words a step)
    or 'torch' (coalesced ``index_select`` into scratch, then a scatter)."""

    def __init__(self, device: torch.device, tally: Tally, kernel: str, ctas: int, warps: int = 8,
                 tile_words: int = 4096, windows: Optional[WindowCache] = None,
                 indices: Optional[IndexRing] = None) -> None:
        super().__init__(device, tally)
        self.kernel = kernel
        self.ctas = ctas
        self.warps = warps
        self.tile_words = tile_words
        self.windows = windows or WindowCache()
        self.indices = indices or IndexRing()

    def issue(self, requests: Sequence[RecallRequest]) -> None:
        if self.kernel == "triton":
            for rowbytes, reqs in by_row_size(requests).items():
                self._issue_triton(reqs)
                self.tally.add(gathers=1, h2d_bytes=sum(r.n for r in reqs) * rowbytes)
            return
        for group in group_requests(requests):
            self._issue_torch(group)
            self.tally.add(gathers=1, h2d_bytes=group.nbytes)

    def _issue_torch(self, group: GatherGroup) -> None:
        dst = group.destination(self.device)  # [U, unit_words]
        view = group.window.device_view(self.device, group.unit_bytes)  # [slots, unit_words]
        if group.host_rows is None:
            slots = group.slot_index()  # [U], built on the device
        else:
            slots = self.indices.upload([group.slot_index()], self.device, self.tally)  # [U]
        torch.index_select(view, 0, slots, out=dst)
        group.scatter(dst)

    def _issue_triton(self, reqs: list[RecallRequest]) -> None:
        """One gather for requests of one row size; host work is O(requests), not O(rows)."""
        from hcpolicy.runtime._triton_gather import gather_rows

        blocks = list({id(r.block): r.block for r in reqs}.values())
        window = self.windows.get(blocks)
        out_ptrs = [r.out.data_ptr() for r in reqs]
        # Words go straight into the outs: the word must divide their addresses too.
        word_bytes, word, _ = word_for(window.word_bytes, *out_ptrs)
        row_words = window.rowbytes // word_bytes
        if len(reqs) == 1:
            r = reqs[0]
            if r.rows.device.type == "cpu":
                rows = self.indices.upload([r.rows], self.device, self.tally)
            else:
                rows = r.rows.contiguous()  # the kernel reads rows[i] at i words
            src = window.device_flat(self.device).view(word)[(r.block.ptr - window.base) // word_bytes:]
            gather_rows(src, r.out_words(word), rows, None, row_words, self.ctas, self.warps, self.tile_words)
            return
        lowest = min(range(len(reqs)), key=out_ptrs.__getitem__)
        table = torch.tensor(request_table(reqs, out_ptrs, window.base, out_ptrs[lowest], word_bytes))  # [3R]
        rows, table = self._rows_and_table(reqs, table)
        gather_rows(window.device_flat(self.device).view(word), reqs[lowest].out_words(word), rows, table,
                    row_words, self.ctas, self.warps, self.tile_words)

    def _rows_and_table(self, reqs: list[RecallRequest], table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] int64 rows of every request in order, [3R] table), both on the device: the
        host rows and the table go up in one DMA, device rows are concatenated there."""
        host = [r.rows for r in reqs if r.rows.device.type == "cpu"]
        up = self.indices.upload([*host, table], self.device, self.tally)  # [host rows | 3R]
        if len(host) == len(reqs):
            return up[: -table.numel()], up[-table.numel() :]
        pieces, at = [], 0
        for r in reqs:
            if r.rows.device.type == "cpu":
                pieces.append(up[at : at + r.n])
                at += r.n
            else:
                pieces.append(r.rows)
        return torch.cat(pieces), up[at:]  # cat: contiguous, as the kernel reads them


class StagedPath(RecallPath):
    needs_host_rows = True

    def __init__(self, device: torch.device, tally: Tally, staging: StagingRing) -> None:
        super().__init__(device, tally)
        self.staging = staging

    def validate(self, requests: Sequence[RecallRequest]) -> None:
        for r in requests:
            if r.block.rowbytes > self.staging.chunk_bytes:
                raise ValueError(f"a row of {r.block.rowbytes} bytes exceeds the staging chunk of "
                                 f"{self.staging.chunk_bytes} bytes; raise staging_bytes")

    def issue(self, requests: Sequence[RecallRequest]) -> None:
        for group in group_requests(requests, min(MAX_UNIT_BYTES, self.staging.chunk_bytes)):
            self._await_offloads(group)
            self._issue_group(group)

    def _await_offloads(self, group: GatherGroup) -> None:
        # Host wait on purpose: the host reads these blocks itself, so a stream-side
        # wait cannot order it after an offload that is still writing them.
        offload = pending_offload(group.window.blocks)
        if offload is not None:
            with self.tally.waiting():
                offload.synchronize()

    def _issue_group(self, group: GatherGroup) -> None:
        w, ub = group.window, group.unit_bytes
        per_chunk = self.staging.chunk_bytes // ub  # >= 1: units never exceed a chunk
        view, slots = w.host_view(ub), group.slot_index()  # [slots, unit_words], [U]
        dst = group.destination(self.device)  # [U, unit_words]
        dst_bytes = dst.view(-1).view(torch.uint8)  # [U * unit_bytes]
        stream = torch.cuda.current_stream(self.device)
        for start in range(0, group.units, per_chunk):
            n = min(per_chunk, group.units - start)
            slot, buf = self.staging.acquire(self.tally)
            chunk = buf[: n * ub]  # [n * unit_bytes] uint8, pinned
            torch.index_select(view, 0, slots[start : start + n], out=chunk.view(w.word).view(n, group.unit_words))
            dst_bytes[start * ub : (start + n) * ub].copy_(chunk, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            self.staging.release(slot, event)
            self.tally.add(gathers=1, h2d_copies=1)
        group.scatter(dst)
        self.tally.add(h2d_bytes=group.nbytes)


class DirectPath(RecallPath):
    needs_host_rows = True

    def issue(self, requests: Sequence[RecallRequest]) -> None:
        for r in requests:
            rb = r.block.rowbytes
            src, dst = r.block.data, r.out_words(torch.uint8)  # [rows * rb], [n * rb] uint8
            for out_at, row, n in runs(r.rows):
                dst[out_at * rb : (out_at + n) * rb].copy_(src[row * rb : (row + n) * rb], non_blocking=True)
                self.tally.add(h2d_copies=1)
            self.tally.add(h2d_bytes=r.nbytes)
