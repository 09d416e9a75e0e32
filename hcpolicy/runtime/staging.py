"""Double-buffered pinned staging for the staged recall path.

The host gathers rows into one buffer while the copy engine drains the other. A buffer
is handed out again only after the event recorded behind its last DMA has completed:
overwriting pinned memory a DMA is still reading would ship the new rows under the old
request (the bug of the reference implementation, which reuses one buffer).
"""

from __future__ import annotations

from typing import Optional

import torch

from hcpolicy.runtime import hostops
from hcpolicy.runtime.counters import Tally
from hcpolicy.runtime.store import HostStore


class StagingRing:
    """``count`` pinned buffers of ``chunk_bytes`` each, used round-robin.

    Allocated lazily through the store's allocator (so a failure is a HostAllocationError
    and a runtime that never stages holds no staging memory).
    """

    def __init__(self, store: HostStore, total_bytes: int, count: int = 2) -> None:
        if count < 2:
            raise ValueError(f"staging needs at least 2 buffers to overlap, got {count}")
        if total_bytes < count:
            raise ValueError(f"staging_bytes must be >= {count}, got {total_bytes}")
        self._store = store
        self.chunk_bytes = total_bytes // count
        self._count = count
        self._buffers: list[torch.Tensor] = []
        self._events: list[Optional[torch.cuda.Event]] = [None] * count
        self._next = 0

    def acquire(self, tally: Tally) -> tuple[int, torch.Tensor]:
        """(slot, uint8 [chunk_bytes] pinned buffer) that no copy is reading any more.

        Host wait on purpose: the host is about to write this memory, and only the event
        of the DMA that last read it says when that is safe. With two buffers the wait
        is for the copy issued one chunk ago, which overlaps the gather just done.
        """
        if not self._buffers:
            self._buffers = [self._store.allocate(self.chunk_bytes) for _ in range(self._count)]
        slot = self._next
        self._next = (slot + 1) % self._count
        event = self._events[slot]
        if event is not None and not event.query():
            with tally.waiting():
                event.synchronize()
        self._events[slot] = None
        return slot, self._buffers[slot]

    def release(self, slot: int, event: torch.cuda.Event) -> None:
        """Mark ``slot`` busy until ``event`` (recorded after the DMA out of it)."""
        self._events[slot] = event

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers)


class IndexRing:
    """Pinned int64 buffers for index uploads (row indices, request tables).

    ``torch.empty(pin_memory=True)`` per recall goes through the caching host allocator and
    its event bookkeeping every call; these few buffers are kept instead, each guarded by
    the event recorded behind the DMA that last read it, and reused once that completed.
    """

    def __init__(self, slots: int = 4, min_elems: int = 1 << 16) -> None:
        self._slots = slots
        self._min = min_elems
        self._buffers: list[torch.Tensor] = []  # [capacity] int64, pinned
        self._events: list[Optional[torch.cuda.Event]] = []
        self._oldest = 0  # the slot waited for when all are busy (they are used in turn then)

    def upload(self, parts: list[torch.Tensor], device: torch.device, tally: Tally) -> torch.Tensor:
        """[sum of sizes] int64 on ``device``: ``parts`` (1-D int64 CPU tensors) concatenated
        in one pinned buffer and copied by one DMA on the current stream (no host wait
        unless every buffer is still being read)."""
        n = sum(p.numel() for p in parts)
        slot = self._acquire(n, tally)
        staged = hostops.concat(parts, out=self._buffers[slot][:n])
        dev = torch.empty(n, dtype=torch.int64, device=device)  # freed onto this stream's pool
        dev.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._events[slot] = event
        return dev

    def _acquire(self, n: int, tally: Tally) -> int:
        free = [i for i, e in enumerate(self._events) if e is None or e.query()]
        fits = [i for i in free if self._buffers[i].numel() >= n]
        if fits:
            return fits[0]
        if free:  # free, but too small for n: replaced below
            slot = free[0]
        elif len(self._buffers) < self._slots:
            slot = len(self._buffers)
            self._buffers.append(torch.empty(0, dtype=torch.int64))
            self._events.append(None)
        else:
            # Host wait on purpose: every buffer is still read by a DMA, and reusing one
            # now would ship this batch's indices under an earlier one.
            slot = self._oldest
            self._oldest = (slot + 1) % self._slots
            with tally.waiting():
                self._events[slot].synchronize()  # type: ignore[union-attr]
            self._events[slot] = None
            if self._buffers[slot].numel() >= n:
                return slot
        self._buffers[slot] = torch.empty(max(self._min, 1 << (n - 1).bit_length()), dtype=torch.int64,
                                          pin_memory=True)
        self._events[slot] = None
        return slot

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * 8 for b in self._buffers)
