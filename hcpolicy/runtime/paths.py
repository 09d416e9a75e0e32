"""Recall paths: how a validated batch of requests reaches the device.

Each path is one ``issue`` method. The runtime calls it with the copy stream current and
that stream already ordered after the compute stream and after the offloads of every
block involved, then records one event behind whatever the path enqueued.

- ``ZeroCopyPath`` (CUDA default): one GPU gather per row size that reads the pinned
  store directly over PCIe (no DMA, no staging); the measured fastest for scattered rows.
- ``StagedPath``: the host gathers rows into pinned staging, one DMA per chunk, two
  staging buffers alternating so host gathers overlap DMAs.
- ``DirectPath``: one DMA per run of consecutive rows; the baseline (fine for long runs).
- ``HostPath``: the CPU runtime; the same gathers as the other paths, synchronously.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence

import torch

from hcpolicy.runtime.counters import Tally
from hcpolicy.runtime.plan import MAX_UNIT_BYTES, GatherGroup, RecallRequest, group_requests, runs
from hcpolicy.runtime.staging import StagingRing
from hcpolicy.runtime.store import pending_offload


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
    """kernel: 'triton' (one launch per row size, straight into every ``out``, on a grid
    of ``ctas`` programs) or 'torch' (``index_select`` into scratch, then a scatter)."""

    def __init__(self, device: torch.device, tally: Tally, kernel: str, ctas: int) -> None:
        super().__init__(device, tally)
        self.kernel = kernel
        self.ctas = ctas

    def issue(self, requests: Sequence[RecallRequest]) -> None:
        for group in group_requests(requests):
            if self.kernel == "triton":
                self._issue_triton(group)
            else:
                self._issue_torch(group)
            self.tally.add(gathers=1, h2d_bytes=group.nbytes)

    def _issue_torch(self, group: GatherGroup) -> None:
        dst = group.destination(self.device)  # [U, unit_words]
        view = group.window.device_view(self.device, group.unit_bytes)  # [slots, unit_words]
        slots = self._on_device(group, group.slot_index, group.units)  # [U]
        torch.index_select(view, 0, slots, out=dst)
        group.scatter(dst)

    def _issue_triton(self, group: GatherGroup) -> None:
        from hcpolicy.runtime._triton_gather import gather_units

        w, units = group.window, group.units
        lowest = min(group.requests, key=lambda r: r.out.data_ptr())
        base = lowest.out.data_ptr()  # destination offsets are counted from here

        def offsets(out: Optional[torch.Tensor]) -> torch.Tensor:  # [2U] source, destination
            if out is None:  # device rows: build both halves on the device
                src = group.slot_index() * w.slot_words
                return torch.cat([src, group.dst_offsets(base).to(src.device, non_blocking=True)])
            torch.mul(group.slot_index(), w.slot_words, out=out[:units])
            group.dst_offsets(base, out=out[units:])
            return out

        dev_offsets = self._on_device(group, offsets, 2 * units)
        gather_units(w.device_flat(self.device), lowest.out_words(w.word), dev_offsets, group.unit_words, self.ctas)

    def _on_device(self, group: GatherGroup, build: Callable[[Optional[torch.Tensor]], torch.Tensor],
                   n: int) -> torch.Tensor:
        """``build(out)`` an int64 [n] index: device rows build it on the device (out=None);
        host rows build it into pinned memory, uploaded asynchronously (the caching host
        allocator keeps that buffer until the copy's event completes)."""
        if group.host_rows is None:
            return build(None)
        pinned = torch.empty(n, dtype=torch.int64, pin_memory=True)
        return build(pinned).to(self.device, non_blocking=True)


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
