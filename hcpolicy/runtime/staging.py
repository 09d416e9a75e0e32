"""Double-buffered pinned staging for the staged recall path.

The host gathers rows into one buffer while the copy engine drains the other. A buffer
is handed out again only after the event recorded behind its last DMA has completed:
overwriting pinned memory a DMA is still reading would ship the new rows under the old
request (the bug of the reference implementation, which reuses one buffer).
"""

from __future__ import annotations

from typing import Optional

import torch

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
