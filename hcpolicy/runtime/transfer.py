"""Transfer handles and the references that must outlive the copies behind them."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from hcpolicy.runtime.counters import Tally


@attrs.frozen(eq=False)
class Transfer:
    """One offload or recall batch in flight.

    Backed by a CUDA event recorded on a copy stream after the last copy; on CPU (or for an
    empty request) the event is None and the transfer is already complete.
    """

    event: Optional[torch.cuda.Event]
    _tally: Tally = attrs.field(repr=False)

    def done(self) -> bool:
        """Non-blocking: whether every copy of this transfer has finished."""
        return self.event is None or self.event.query()

    def synchronize(self) -> None:
        """Block the host until the transfer finished (counted in ``wait_s``)."""
        if self.event is not None and not self.event.query():
            with self._tally.waiting():
                self.event.synchronize()


class Inflight:
    """Keeps tensors alive until the event of the copy that uses them has completed.

    A copy stream may still read an offload's source or write a recall's ``out`` after the
    caller dropped its last reference; the caching allocator would then hand that memory to
    the next kernel on the compute stream. Holding a reference until the event completes
    avoids that without ``record_stream`` (whose semantics depend on later allocations).
    """

    def __init__(self) -> None:
        self._entries: list[tuple[torch.cuda.Event, tuple[Any, ...]]] = []

    def hold(self, event: torch.cuda.Event, *refs: Any) -> None:
        self._entries.append((event, refs))

    def reap(self) -> None:
        """Drop the references of completed copies (event queries, no host sync)."""
        self._entries = [(e, refs) for e, refs in self._entries if not e.query()]

    def wait_all(self, tally: Tally) -> None:
        if self._entries:
            with tally.waiting():
                for event, _ in self._entries:
                    event.synchronize()
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
