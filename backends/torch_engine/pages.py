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

import numpy as np
import torch


class OutOfPages(MemoryError):
    """The pool has fewer free pages than a request needs; nothing was allocated."""


class PageAllocator:
    """The free map is a numpy array: on a pool of a million pages its scans (find a run,
    list the free pages, check a free) cost a fraction of torch's CPU ops, and a decode
    step that lands recalls makes a few of them."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = np.ones(num_pages, dtype=bool)
        self._free_count = num_pages
        self._cursor = 0  # where the next non-contiguous allocation starts looking
        self._quarantine: list[tuple[torch.cuda.Event, np.ndarray]] = []  # (event, pages), oldest first

    @property
    def free_pages(self) -> int:
        return self._free_count

    @property
    def used_pages(self) -> int:
        return self.num_pages - self._free_count

    def allocate(self, n: int, contiguous: bool = True) -> torch.Tensor:
        """``n`` page ids (int64 CPU tensor); with ``contiguous`` (the default) ascending and
        one run when a run of n is free, else any free pages (callers that index pages
        through tables: no search over the whole map)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        self._reap(need=n)
        if n > self._free_count:
            raise OutOfPages(f"need {n} KV pages, {self._free_count} of {self.num_pages} are free")
        start = self._first_run(n) if contiguous else None
        if start is not None:
            pages = np.arange(start, start + n, dtype=np.int64)
        elif contiguous:
            pages = np.flatnonzero(self._free)[:n].astype(np.int64)
        else:
            pages = self._scan(n)
        self._free[pages] = False
        self._free_count -= n
        return torch.from_numpy(pages)

    def _scan(self, n: int) -> np.ndarray:
        """``n`` free pages (the caller checked there are) found from a cursor that moves on
        with each such allocation, a chunk at a time, wrapping once: about n / (free
        share) entries of the map are read, not the whole map."""
        found, got, chunk = [], 0, max(2 * n, 1 << 16)
        for lo, hi in ((self._cursor, self.num_pages), (0, self._cursor)):
            for at in range(lo, hi, chunk):
                ids = np.flatnonzero(self._free[at : min(at + chunk, hi)])[: n - got] + at
                found.append(ids)
                got += ids.size
                if got == n:
                    pages = np.concatenate(found).astype(np.int64)
                    self._cursor = (int(pages[-1]) + 1) % self.num_pages
                    return pages
        raise AssertionError("unreachable: the free count said there were enough pages")

    def free(self, pages: torch.Tensor, after: torch.cuda.Event | None = None) -> None:
        """Return ``pages`` (int64 CPU ids) to the pool; freeing a free page is an error.
        ``after``: an event that must complete before the pages are written again."""
        ids = pages.to("cpu", torch.int64).numpy()
        if ids.size == 0:
            return
        if self._free[ids].any():
            raise ValueError("freeing a page that is not allocated (double free)")
        # a page named twice: marking them all free flips fewer entries than ids holds (one
        # count over the map, no array as long as the largest id)
        self._free[ids] = True
        flipped = int(np.count_nonzero(self._free)) - self._free_count
        if flipped != ids.size:
            self._free[ids] = False
            raise ValueError("freeing a page that is not allocated (double free)")
        if after is not None and not after.query():
            self._free[ids] = False  # not reusable before the copy: quarantined
            self._quarantine.append((after, ids.copy()))
            return
        self._free_count += ids.size

    def _release(self, ids: np.ndarray) -> None:
        self._free[ids] = True
        self._free_count += ids.size

    def drain(self) -> None:
        """Release every quarantined page, making the current stream wait for its event."""
        self._reap(need=self.num_pages + 1)

    def _reap(self, need: int) -> None:
        """Release quarantined pages whose copy is done; if fewer than ``need`` pages are
        then free, release the oldest others too, behind a device-side wait."""
        if not self._quarantine:
            return
        waiting = []
        for event, ids in self._quarantine:
            if event.query():
                self._release(ids)
            else:
                waiting.append((event, ids))
        self._quarantine = waiting
        while self._quarantine and self._free_count < need:
            event, ids = self._quarantine.pop(0)
            torch.cuda.current_stream().wait_event(event)
            self._release(ids)

    def _first_run(self, n: int) -> int | None:
        """Start of the lowest run of >= n free pages, or None."""
        if n > self.num_pages:
            return None
        csum = np.concatenate([[0], np.cumsum(self._free, dtype=np.int64)])  # [N + 1]
        hits = np.flatnonzero(csum[n:] - csum[:-n] == n)  # runs [i, i + n) all free
        return int(hits[0]) if hits.size else None
