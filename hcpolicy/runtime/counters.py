"""Transfer counters: a mutable tally inside the runtime, a frozen snapshot outside."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import attrs


@attrs.frozen
class TransferCounters:
    """What the runtime has moved since it was made.

    Payload only: the row indices a gather needs (8 bytes per row) are not counted.

    h2d_bytes / d2h_bytes: payload bytes recalled into / offloaded from device tensors.
    h2d_copies / d2h_copies: bulk copy calls carrying payload (a DMA on CUDA, a tensor copy
        on CPU). A zero-copy recall moves its bytes with a gather kernel and issues none.
    gathers: gather operations (one GPU gather kernel, or one host gather into staging or
        into ``out``); a recall batch of several row sizes needs one per size per chunk.
    offloads / recalls / evictions: calls (a ``recall_many`` of n requests counts n recalls).
    wait_s: seconds the host spent blocked (``Transfer.synchronize``, staging-buffer reuse,
        host reads of a block still being offloaded, ``synchronize``, device-row checks).
    """

    h2d_bytes: int = 0
    h2d_copies: int = 0
    d2h_bytes: int = 0
    d2h_copies: int = 0
    gathers: int = 0
    offloads: int = 0
    recalls: int = 0
    evictions: int = 0
    wait_s: float = 0.0


_FIELDS = tuple(a.name for a in attrs.fields(TransferCounters))


class Tally:
    """The runtime's running totals; ``snapshot()`` freezes them."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {name: 0 for name in _FIELDS}
        self._values["wait_s"] = 0.0

    def add(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self._values[name] += amount  # KeyError on a typo is what we want

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Time a host-side wait into ``wait_s``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._values["wait_s"] += time.perf_counter() - start

    def snapshot(self) -> TransferCounters:
        return TransferCounters(**self._values)
