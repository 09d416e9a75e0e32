"""PageAllocator: which pages of the KV pool are free (host side; the pool never syncs for it).

Pages are handed out first-fit: a request is served from the lowest run of free pages
long enough to hold it when there is one (so a head's pages are contiguous in a fresh pool
and its rows can be read as a plain slice), else from the lowest free pages wherever
they are. Freed pages are reusable at once, unless they were freed ``after`` a CUDA event
(a copy still reading them, e.g. an offload to the host): those wait in quarantine until
the event has completed, and when the free pages run short an allocation makes the
current stream wait for the oldest such events instead, so later writes to those pages
are ordered after the copy without a host sync.
"""

from __future__ import annotations

import torch


class OutOfPages(MemoryError):
    """The pool has fewer free pages than a request needs; nothing was allocated."""


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = torch.ones(num_pages, dtype=torch.bool)  # CPU
        self._quarantine: list[tuple[torch.cuda.Event, torch.Tensor]] = []  # (event, pages), oldest first

    @property
    def free_pages(self) -> int:
        return int(self._free.sum())

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages

    def allocate(self, n: int) -> torch.Tensor:
        """``n`` page ids (int64 CPU tensor, ascending), contiguous when a run of n is free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        self._reap(need=n)
        start = self._first_run(n)
        if start is not None:
            pages = torch.arange(start, start + n)
        else:
            free = torch.nonzero(self._free).flatten()
            if free.numel() < n:
                raise OutOfPages(f"need {n} KV pages, {free.numel()} of {self.num_pages} are free")
            pages = free[:n]
        self._free[pages] = False
        return pages

    def free(self, pages: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """Return ``pages`` (int64 CPU ids) to the pool; freeing a free page is an error.
        ``after``: an event that must complete before the pages are written again."""
        pages = pages.to("cpu", torch.int64)
        if pages.numel() == 0:
            return
        if bool(self._free[pages].any()) or pages.unique().numel() != pages.numel():
            raise ValueError("freeing a page that is not allocated (double free)")
        if after is not None and not after.query():
            self._quarantine.append((after, pages))
            return
        self._free[pages] = True

    def drain(self) -> None:
        """Release every quarantined page, making the current stream wait for its event."""
        self._reap(need=self.num_pages + 1)

    def _reap(self, need: int) -> None:
        """Release quarantined pages whose copy is done; if fewer than ``need`` pages are
        then free, release the oldest others too, behind a device-side wait."""
        if not self._quarantine:
            return
        waiting = []
        for event, pages in self._quarantine:
            if event.query():
                self._free[pages] = True
            else:
                waiting.append((event, pages))
        self._quarantine = waiting
        while self._quarantine and int(self._free.sum()) < need:
            event, pages = self._quarantine.pop(0)
            torch.cuda.current_stream().wait_event(event)
            self._free[pages] = True

    def _first_run(self, n: int) -> int | None:
        """Start of the lowest run of >= n free pages, or None."""
        if n > self.num_pages:
            return None
        csum = torch.cat([torch.zeros(1, dtype=torch.int64), self._free.cumsum(0)])  # [N + 1]
        window = csum[n:] - csum[:-n]  # free pages in [i, i + n)
        hits = torch.nonzero(window == n)
        return int(hits[0]) if hits.numel() else None
