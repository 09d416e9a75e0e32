"""TransferRuntime: the one object backends use to move KV bytes between device and host."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
from typing import Hashable, Iterator, Literal, Optional, Sequence

import attrs
import torch

from hcpolicy.runtime.counters import Tally, TransferCounters
from hcpolicy.runtime.hostrows import HostRows
from hcpolicy.runtime.paths import DirectPath, HostPath, RecallPath, StagedPath, ZeroCopyPath
from hcpolicy.runtime.plan import RecallRequest
from hcpolicy.runtime.requests import check_ranges, check_src, make_request
from hcpolicy.runtime.staging import IndexRing, StagingRing
from hcpolicy.runtime.store import HostAlloc, HostBlock, HostStore, default_host_alloc, pending_offload
from hcpolicy.runtime.streams import RECALL_PRIORITIES, RecallPriority, RecallStreams
from hcpolicy.runtime.transfer import Inflight, Transfer
from hcpolicy.runtime.window import WindowCache, word_for

RecallMode = Literal["zero_copy", "staged", "direct"]
RECALL_MODES: tuple[str, ...] = ("zero_copy", "staged", "direct")
GatherKernel = Literal["auto", "triton", "torch"]
Request = tuple[Hashable, torch.Tensor, torch.Tensor]


@attrs.frozen
class HostEntry:
    """What the store holds for one key: ``rows`` rows of ``row_shape`` in ``dtype``."""

    dtype: torch.dtype
    row_shape: tuple[int, ...]
    rows: int
    nbytes: int


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch.cuda.is_available() is False")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    return dev


class TransferRuntime:
    """Host store of offloaded KV rows plus the copies in and out of it.

    device: 'cuda[:i]' (pinned store, async copies on two dedicated streams, ordered with
        events) or 'cpu' (pageable store, synchronous copies, same API and results).
    recall_mode: CUDA recall path, see ``hcpolicy.runtime.paths``: 'zero_copy' (default;
        needs numpy, which torch uses to read ``__cuda_array_interface__``; without numpy
        the default is 'staged'), 'staged' or 'direct'. Ignored on CPU.
    staging_bytes: pinned staging for 'staged', split into two alternating buffers.
    gather_kernel: zero-copy gather: 'triton' (one launch per batch and row size, from the
        row indices straight into each ``out``), 'torch' (``index_select`` into scratch,
        then one scatter), or 'auto' (triton when importable). gather_ctas: programs of the
        triton gather; a few saturate PCIe, and the SMs they leave free keep overlapping
        compute fast (a count >= the tiles of a batch gives one short-lived program per
        tile). gather_warps: warps per program (a power of two <= 32). gather_tile_words:
        words a program moves per step (a power of two in [2, 32768]); with
        ``gather_warps`` it sets the registers each thread of a program holds.
    recall_priority: CUDA stream priority of recalls: 'high' (default; their programs are
        scheduled ahead of queued compute blocks, since a decode step waits on them) or
        'normal' (the compute streams' priority, also the lowest CUDA has).
    host_alloc: ``alloc(nbytes) -> uint8 [nbytes]`` CPU tensor (pinned on CUDA); injectable
        so tests can fail allocations. host_limit_bytes: optional cap on the store's bytes.
    check_device_rows: range-check ``rows`` that live on the device; that check costs one
        host sync per recall, so a hot path that trusts its indices turns it off.

    Ordering: every offload and recall starts after the work already queued on the caller's
    current stream; make a stream wait for a result with ``wait``. A recall of a key runs
    after that key's offload; an evicted block is released only when no copy touches it.
    """

    def __init__(
        self,
        device: str | torch.device = "cuda",
        *,
        recall_mode: Optional[RecallMode] = None,
        staging_bytes: int = 16 << 20,
        gather_kernel: GatherKernel = "auto",
        gather_ctas: int = 16,
        gather_warps: int = 8,
        gather_tile_words: int = 4096,
        recall_priority: RecallPriority = "high",
        host_alloc: Optional[HostAlloc] = None,
        host_limit_bytes: Optional[int] = None,
        check_device_rows: bool = True,
    ) -> None:
        self.device = _resolve_device(device)
        cuda = self.device.type == "cuda"
        if recall_mode is None:
            recall_mode = "zero_copy" if importlib.util.find_spec("numpy") else "staged"
        if recall_mode not in RECALL_MODES:
            raise ValueError(f"recall_mode must be one of {RECALL_MODES} or None, got {recall_mode!r}")
        self.recall_mode: RecallMode = recall_mode
        if gather_kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"gather_kernel must be 'auto', 'triton' or 'torch', got {gather_kernel!r}")
        if gather_kernel == "auto":
            gather_kernel = "triton" if importlib.util.find_spec("triton") else "torch"
        self.gather_kernel: str = gather_kernel
        self.gather_ctas = gather_ctas
        self.gather_warps = gather_warps
        self.gather_tile_words = gather_tile_words
        self.recall_priority: RecallPriority = recall_priority
        self._gather_key()  # ValueError for bad gather settings
        self._priority()  # ValueError for a bad priority
        self.check_device_rows = check_device_rows
        self._tally = Tally()
        self._store = HostStore(host_alloc or default_host_alloc(pinned=cuda), cuda, host_limit_bytes)
        self._staging = StagingRing(self._store, staging_bytes)
        self._windows = WindowCache()
        self._indices = IndexRing()
        self._inflight = Inflight()
        self._seq = itertools.count()
        self._d2h: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device) if cuda else None
        self._h2d: Optional[RecallStreams] = None
        self._paths: dict[tuple, RecallPath] = {}
        if cuda:
            self._h2d = RecallStreams(self.device)
            self._h2d.get(self._priority())  # made now rather than inside the first recall

    def _gather_key(self) -> tuple[str, int, int, int]:
        """(kernel, ctas, warps, tile words), checked: they may be changed between calls."""
        for name in ("gather_ctas", "gather_warps", "gather_tile_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        warps, tile = self.gather_warps, self.gather_tile_words
        if warps > 32 or warps & (warps - 1):
            raise ValueError(f"gather_warps must be a power of two <= 32, got {warps!r}")
        if not 2 <= tile <= 1 << 15 or tile & (tile - 1):
            raise ValueError(f"gather_tile_words must be a power of two in [2, 32768], got {tile!r}")
        return self.gather_kernel, self.gather_ctas, warps, tile

    def gather_shape(self) -> tuple[int, int, int]:
        """(programs, warps, words per pass) of the triton zero-copy gather, checked: a
        caller's own gather under ``reading_rows`` launches the same way."""
        return self._gather_key()[1:]

    def _priority(self) -> int:
        if self.recall_priority not in RECALL_PRIORITIES:
            raise ValueError(f"recall_priority must be one of {tuple(RECALL_PRIORITIES)}, "
                             f"got {self.recall_priority!r}")
        return RECALL_PRIORITIES[self.recall_priority]

    def _path(self, mode: Optional[RecallMode]) -> RecallPath:
        name: str = self.recall_mode if mode is None else mode
        if name not in RECALL_MODES:
            raise ValueError(f"mode must be one of {RECALL_MODES} or None, got {name!r}")
        # The settings may be changed between calls: checked on every device, one path
        # object per gather setting.
        key = (name, *self._gather_key()) if name == "zero_copy" else (name,)
        self._priority()
        if self._h2d is None:
            key = ("host",)  # the CPU runtime has one path; modes only differ on CUDA
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = self._make_path(key)
        return path

    def _make_path(self, key: tuple) -> RecallPath:
        name = key[0]
        if name == "host":
            return HostPath(self.device, self._tally)
        if name == "staged":
            return StagedPath(self.device, self._tally, self._staging)
        if name == "direct":
            return DirectPath(self.device, self._tally)
        _, kernel, ctas, warps, tile = key
        return ZeroCopyPath(self.device, self._tally, kernel, ctas, warps, tile, self._windows, self._indices)

    # ---- offload ---------------------------------------------------------------------

    @torch.no_grad()
    def offload(self, key: Hashable, src: torch.Tensor) -> Transfer:
        """Copy ``src`` [L, *row] (on the runtime's device, L >= 1) into a new host block.

        Async on CUDA: the copy waits for the current stream, and the runtime keeps ``src``
        alive until it is done; do not write into ``src`` before ``wait``ing for the result.
        Raises ValueError if ``key`` is present, HostAllocationError if memory runs out
        (nothing is registered then).
        """
        self._reap()
        check_src(self._store, self.device, key, src)
        data = self._store.allocate(src.numel() * src.element_size())  # [L * rowbytes] uint8
        block = HostBlock(key, data, src.dtype, tuple(src.shape[1:]), src.shape[0], next(self._seq))
        if self._d2h is None:
            block.typed().copy_(src)
            event = None
        else:
            self._d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._d2h):
                block.typed().copy_(src, non_blocking=True)
                event = self._record(self._d2h, src, data)
            block.ready = event
        self._store.add(block)
        self._tally.add(d2h_bytes=block.nbytes, d2h_copies=1, offloads=1)
        return Transfer(event, self._tally)

    # ---- recall ----------------------------------------------------------------------

    def recall(
        self, key: Hashable, rows: torch.Tensor, out: torch.Tensor, *, mode: Optional[RecallMode] = None
    ) -> Transfer:
        """Gather host rows of ``key`` into ``out``: out[i] = offloaded[rows[i]].

        rows: [n] int64 (any order, repeats allowed) on the CPU or the runtime's device;
        out: [n, *row] contiguous, same dtype as offloaded, on the runtime's device.
        mode: this call's recall path (default: the runtime's ``recall_mode``).
        Raises KeyError for an unknown or evicted key, ValueError for bad rows or out.
        """
        return self.recall_many([(key, rows, out)], mode=mode)

    @torch.no_grad()
    def recall_many(self, requests: Sequence[Request], *, mode: Optional[RecallMode] = None) -> Transfer:
        """Several recalls as one batch: one gather (or a few large copies) per row size.

        All requests are validated before anything is enqueued; one Transfer covers all.
        """
        self._reap()
        path = self._path(mode)
        reqs = [make_request(self._store.get(key), self.device, rows, out) for key, rows, out in requests]
        check_ranges(reqs, self.check_device_rows)
        live = [r for r in reqs if r.n]
        path.validate(live)
        self._tally.add(recalls=len(reqs))
        if not live:
            return Transfer(None, self._tally)
        if path.needs_host_rows:
            # .cpu() of device rows syncs; host-row paths need them, pass CPU rows to avoid it
            live = [r if r.rows.device.type == "cpu" else attrs.evolve(r, rows=r.rows.cpu()) for r in live]
        if self._h2d is None:
            path.issue(live)
            return Transfer(None, self._tally)
        return self._issue_async(path, live, self._h2d.get(self._priority()))

    def _issue_async(self, path: RecallPath, reqs: list[RecallRequest], h2d: torch.cuda.Stream) -> Transfer:
        blocks = list({id(r.block): r.block for r in reqs}.values())
        done: list[torch.cuda.Event] = []
        with self._reading(blocks, h2d, done, *(r.out for r in reqs), *(r.rows for r in reqs)):
            path.issue(reqs)
        return Transfer(done[0], self._tally)

    @contextlib.contextmanager
    def _reading(self, blocks: list[HostBlock], h2d: torch.cuda.Stream, done: list[torch.cuda.Event],
                 *refs: object) -> Iterator[None]:  # fmt: skip
        """Work enqueued inside runs on ``h2d``, after the caller's stream (its inputs are
        ready) and after any offload still writing ``blocks``; on exit one event behind it
        goes into ``done``, keeps ``refs`` and the blocks alive until it completes, and is
        each block's ``last_read``."""
        h2d.wait_stream(torch.cuda.current_stream(self.device))
        offload = pending_offload(blocks)
        if offload is not None:
            h2d.wait_event(offload)  # a block is still being offloaded: order after it
        with torch.cuda.stream(h2d):
            yield
            event = self._record(h2d, *refs, *(b.data for b in blocks))
        for block in blocks:
            block.last_read = event
        self._h2d.issued(h2d, event)  # type: ignore[union-attr]
        done.append(event)

    @contextlib.contextmanager
    def reading_rows(self, keys: Sequence[Hashable], *, align: Sequence[int] = ()) -> Iterator[HostRows]:
        """Lend the host blocks of ``keys`` (one row size) to the caller's own kernel.

        Inside the block the current stream is the recall stream (CUDA), ordered after the
        caller's stream and after the blocks' offloads; work enqueued there may read
        ``view.flat``. On exit an event is recorded behind it: ``view.transfer`` (wait for
        it with ``wait``), and no block is released before it completes. ``align``: other
        addresses or sizes the word must divide (the caller's destination, its row bytes).
        On CPU ``flat`` is the host memory itself and the caller's ops run synchronously.
        Bytes moved are the caller's to report (``count_h2d``): only it knows which rows
        it read. Raises KeyError for an unknown key, ValueError for mixed row sizes.
        """
        self._reap()
        blocks = [self._store.get(key) for key in keys]
        if not blocks:
            raise ValueError("reading_rows needs at least one key")
        if len({b.rowbytes for b in blocks}) != 1:
            raise ValueError("reading_rows needs keys of one row size")
        unique = list({id(b): b for b in blocks}.values())
        window = self._windows.get(unique)
        word_bytes, word, _ = word_for(window.word_bytes, window.rowbytes, *align)
        flat = window.host_flat() if self._h2d is None else window.device_flat(self.device)
        view = HostRows(flat=flat.view(torch.uint8).view(word), row_words=window.rowbytes // word_bytes, word=word,
                        starts=tuple((b.ptr - window.base) // word_bytes for b in blocks),
                        rows=tuple(b.rows for b in blocks))  # fmt: skip
        if self._h2d is None:
            yield view
            view.transfer = Transfer(None, self._tally)
            return
        done: list[torch.cuda.Event] = []
        with self._reading(unique, self._h2d.get(self._priority()), done):
            yield view
        self._tally.add(recalls=len(blocks), gathers=1)
        view.transfer = Transfer(done[0], self._tally)

    def count_h2d(self, nbytes: int) -> None:
        """Account bytes a ``reading_rows`` caller moved to the device."""
        self._tally.add(h2d_bytes=nbytes)

    # ---- ordering, lifetime, accounting ----------------------------------------------

    def wait(self, transfer: Transfer, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Make ``stream`` (default: the current stream) wait for ``transfer``; no host sync."""
        if transfer.event is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(transfer.event)

    def evict(self, key: Hashable) -> None:
        """Drop ``key`` (KeyError if absent). Its memory is released once no in-flight copy
        touches it (checked without blocking on later calls, or by ``synchronize``)."""
        self._windows.drop(self._store.remove(key))
        self._tally.add(evictions=1)
        self._reap()

    def synchronize(self) -> None:
        """Block until every copy issued so far is done; release evicted memory."""
        if self._d2h is not None and self._h2d is not None:
            with self._tally.waiting():
                self._d2h.synchronize()
                self._h2d.synchronize()
        self._reap()

    def _record(self, stream: torch.cuda.Stream, *refs: object) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        self._inflight.hold(event, *refs)
        return event

    def _reap(self) -> None:
        self._inflight.reap()
        self._store.reap()

    def counters(self) -> TransferCounters:
        return self._tally.snapshot()

    def entry(self, key: Hashable) -> HostEntry:
        b = self._store.get(key)
        return HostEntry(b.dtype, b.row_shape, b.rows, b.nbytes)

    def host_bytes(self) -> int:
        """Bytes of the live keys' blocks (evicted blocks awaiting release not included)."""
        return self._store.held_bytes()

    def pending_bytes(self) -> int:
        """Bytes of evicted blocks not yet released (copies still in flight)."""
        return self._store.retiring_bytes()

    def staging_bytes(self) -> int:
        return self._staging.nbytes

    def __contains__(self, key: object) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)
