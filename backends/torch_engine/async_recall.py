"""Async recalls (``landing='async'``): Recall actions as batches the host never waits for.

``issue`` takes Recall actions of any layers. On the host it only books fresh pages (sized
by each selection's host lengths, else its width) and replaces recalls of the same heads
still in flight; on a side stream ``recall_plan.plan_batch`` plans every head at once and
one gather kernel on the runtime's recall stream fills the fresh pages (held rows move on
the device, the others cross PCIe: ``TransferRuntime.reading_rows``). Each head's entry
count, host and moved rows and the batch's validity flag go to pinned memory behind the
copies.

``land`` switches heads whose batch is done to their fresh pages: the tokens decoded in the
meantime are copied behind the recalled entries (one gather for all heads), the device
tables are written from the fresh pages already there, and surplus and old pages are freed
in one scan. The host reads the pinned facts only once the batch's event has completed, so
a landing found by ``ready`` waits for nothing; a replaced recall's pages return to the
pool once its copy is done (``reap``).

Ordering: the side stream starts after ``fence``, an event on the compute stream that every
landing, and every other action on the cache, records after it frees pages, so fresh pages
are never pages that queued compute still reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from hcpolicy._device import upload
from hcpolicy.actions import ActionError, Recall

from .recall_plan import Key, OffloadedIndex, plan_batch, recall_keys, recall_rows, sizes

if TYPE_CHECKING:
    from .recall import Recaller


@attrs.define(eq=False)
class Batch:
    """One issued batch: ``facts`` (pinned int64 [3M + 1]) holds, once ``event`` completed,
    each head's entry count, host rows and moved rows, then a flag for an invalid action."""

    facts: torch.Tensor
    event: torch.cuda.Event | None  # behind its plan, then behind the last chunk of its gather sent
    heads: int
    fresh: torch.Tensor  # [M, P] the heads' fresh pages (device), for the landing's tail copy
    rows: tuple = ()  # (dst, pool_src, host_rows) [M, K] of its gather, alive until it is done
    keys: tuple = ()  # the runtime's keys of its heads (their host blocks)
    planned: torch.cuda.Event | None = None  # its plan's end on the side stream
    sent: int = 0  # entries of the gather sent so far
    total: int = 0  # entries of the gather (M * K)
    valid: np.ndarray | None = None  # [M] the first valid[m] entries of head m are rows to move
    _values: list[int] | None = None

    @property
    def queued(self) -> bool:
        """Part of its gather is not sent yet (``AsyncRecalls.pace``)."""
        return self.sent < self.total

    def done(self) -> bool:
        return not self.queued and (self.event is None or self.event.query())

    def fact(self, kind: int, index: int) -> int:
        if self._values is None:
            self._values = self.facts.tolist()  # pinned host memory, complete: no sync
        return self._values[kind * self.heads + index]

    @property
    def bad(self) -> bool:
        return bool(self.fact(3, 0))


@attrs.define(eq=False)
class Landing:
    """A head in flight: its fresh pages (host ids) and its row in ``batch``."""

    pages: torch.Tensor
    batch: Batch
    index: int


class AsyncRecalls:
    def __init__(self, recaller: "Recaller", max_pages: int | None, step_rows: int | None = None) -> None:
        self.rec, self.exe, self.kv = recaller, recaller.exe, recaller.kv
        self.max_pages = max_pages
        self.step_rows = step_rows  # gather entries sent per decode step (None: a batch's whole gather at once)
        self._budget = step_rows  # what the current step may still send
        self._queue: list[Batch] = []  # batches whose gather is not all sent, oldest first
        self.inflight: dict[Key, Landing] = {}  # oldest first
        self.fence_event: torch.cuda.Event | None = None
        self._side: torch.cuda.Stream | None = None
        self._index = OffloadedIndex(self.kv.max_pages * self.kv.page_size)  # logical positions stay below
        self._retired: list[Landing] = []  # replaced while in flight: freed when their copy is done

    # -- streams -------------------------------------------------------------------------------
    def fence(self) -> None:
        """Record where the side stream may start: after the compute stream's queued work."""
        if self.kv.device.type == "cuda":
            self.fence_event = torch.cuda.Event()
            self.fence_event.record(torch.cuda.current_stream(self.kv.device))

    def side(self) -> torch.cuda.Stream | None:
        if self.kv.device.type != "cuda":
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(self.kv.device)
        return self._side

    def prepare(self) -> None:
        """After prefill: index the offloaded positions now (on the side stream), not in the
        first decode step that recalls."""
        side = self.side()
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.kv.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self._index.update(self.exe.host_positions)

    # -- issue ---------------------------------------------------------------------------------
    def issue(self, actions: Sequence[Recall]) -> None:
        """Recall actions as batches: a head named twice starts a new batch."""
        group: list[Recall] = []
        keys: list[Key] = []  # the group's heads, in order
        for action in actions:
            mine = recall_keys(action, self.kv.batch_size, self.exe.host_positions)
            if not set(keys).isdisjoint(mine):
                self._issue(group, keys)
                group, keys = [], []
            group.append(action)
            keys += mine
        if group:
            self._issue(group, keys)

    def _issue(self, actions: list[Recall], keys: list[Key]) -> None:
        """One batch: ``keys`` are the actions' heads (layer, sequence, head), in order."""
        kv, exe = self.kv, self.exe
        for key in [k for k in keys if k in self.inflight]:
            # a newer recall of a head still in flight replaces it: the old copy runs out and
            # its pages go back to the pool then (``reap``); nothing waits for it
            self._retired.append(self.inflight.pop(key))
        lengths = kv.host_lengths.numpy()
        tails = [int(lengths[k]) - exe.resident[k] for k in keys]
        wanted = sizes(actions, kv.batch_size)
        room = [n + t + exe.reserve for n, t in zip(wanted, tails)]
        counts = [kv.pages_for(r) for r in room]
        pages = self._fresh_pages(sum(counts)).split(counts)
        side = self.side()
        if side is not None:
            if self.fence_event is None:
                side.wait_stream(torch.cuda.current_stream(kv.device))
            else:
                side.wait_event(self.fence_event)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            index = self._index.update(exe.host_positions)
            plan = plan_batch(kv, exe.resident, index, actions, keys, pages, room)
            facts = torch.empty(plan["facts"].shape, dtype=torch.int64, pin_memory=side is not None)
            facts.copy_(plan["facts"], non_blocking=True)
            planned = None
            if side is not None:
                planned = torch.cuda.Event()
                planned.record(side)
            rows = (plan["dst"], plan["pool_src"], plan["host_rows"])
            batch = Batch(facts=facts, event=planned, heads=len(keys), fresh=plan["fresh"], rows=rows,
                          keys=tuple((exe.cache_id, *k) for k in keys), planned=planned, total=rows[0].numel(),
                          valid=np.minimum(wanted, rows[0].shape[1]))  # fmt: skip
        for i, (key, head_pages) in enumerate(zip(keys, pages)):
            self.inflight[key] = Landing(pages=head_pages, batch=batch, index=i)
        self._queue.append(batch)
        if self.step_rows is None:  # the whole gather now, from the side stream (after the plan)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                self._spend()
        self.rec.recalls += len(actions)

    # -- the gathers, sent in chunks ------------------------------------------------------------
    def pace(self, quiet: bool = False) -> None:
        """After a decode step is enqueued: send the next ``step_rows`` recalled rows of the
        gathers not sent yet, oldest batch first, to run under the next step (``quiet``:
        none; the engine passes it when the next step ends with a decision). A batch none
        of whose heads will land any more (all replaced by newer recalls) sends nothing
        more."""
        self._budget = 0 if quiet else self.step_rows
        if self._queue:
            self._drop_dead()
            self._spend()

    def _drop_dead(self) -> None:
        """Queued batches none of whose heads will land (all replaced) send nothing more:
        their pages go back once the part sent is done."""
        live = {id(x.batch) for x in self.inflight.values()}
        for batch in [b for b in self._queue if id(b) not in live]:
            batch.total = batch.sent
            self._queue.remove(batch)

    def _spend(self) -> None:
        while self._queue and (self._budget is None or self._budget > 0):
            batch = self._queue[0]
            end, rows = batch.total, None
            if self._budget is not None:
                end, rows = _past_rows(batch.valid, batch.rows[0].shape[1], batch.sent, self._budget)
                self._budget -= rows
            self._send(batch, end - batch.sent)

    def _send(self, batch: Batch, n: int) -> None:
        """Enqueue entries [sent, sent + n) of ``batch``'s gather on the recall stream, after
        the current stream's queued work and the batch's plan."""
        kv = self.kv
        lo, hi = batch.sent, batch.sent + n
        with self.exe.runtime.reading_rows(list(batch.keys), align=(kv.kv.data_ptr(),)) as view:
            if batch.planned is not None:
                stream = torch.cuda.current_stream(kv.device)
                stream.wait_event(batch.planned)
                for t in batch.rows:  # made on the side stream: not reused before this chunk ran
                    t.record_stream(stream)
            recall_rows(kv.kv, view, *batch.rows, self.exe.runtime.gather_shape(), lo=lo, hi=hi)
        batch.sent = hi
        if view.transfer.event is not None:
            batch.event = view.transfer.event
        if not batch.queued:
            self._queue.remove(batch)

    def land_all(self) -> None:
        """Land every recall in flight now: what their gathers have not sent goes at once and
        the host waits for the copies (replaced recalls' pages return too)."""
        for x in list(self._retired):
            self._finish(x.batch)
        self.reap()
        self.land(list(self.inflight), wait=True)

    def _finish(self, batch: Batch) -> None:
        """The host waits for all of ``batch``'s gather (what is not sent yet goes now)."""
        if batch.queued:
            self._send(batch, batch.total - batch.sent)
        if batch.event is not None:
            batch.event.synchronize()

    def _fresh_pages(self, need: int) -> torch.Tensor:
        """``need`` pages, landing the oldest in-flight recalls while the bound or the pool's
        free pages say there is no room."""
        def short() -> bool:
            inflight = sum(x.pages.numel() for x in self.inflight.values())
            over = self.max_pages is not None and inflight + need > self.max_pages
            return over or self.kv.allocator.free_pages < need

        self._drop_dead()  # a batch this issue just replaced whole copies nothing more
        while self._retired and short():  # replaced recalls' pages first: nothing lands
            self._finish(self._retired[0].batch)
            self.reap()
        while self.inflight and short():
            self.land([next(iter(self.inflight))], wait=True)
        return self.kv.allocator.allocate(need, contiguous=False)  # tables index them: no run search

    # -- land ----------------------------------------------------------------------------------
    def ready(self) -> list[Key]:
        """Heads whose batch's copies are done (one event query per batch)."""
        done: dict[int, bool] = {}
        return [k for k, x in self.inflight.items() if done.setdefault(id(x.batch), x.batch.done())]

    def reap(self) -> None:
        """Free the pages of replaced recalls whose copies are done; report a bad one."""
        done = [x for x in self._retired if x.batch.done()]
        if not done:
            return
        self._retired = [x for x in self._retired if not x.batch.done()]
        self.kv.allocator.free(torch.cat([x.pages for x in done]))
        if any(x.batch.bad for x in done):
            raise ActionError("a Recall that a later one replaced named positions that were never offloaded "
                              "(or not ascending)")  # fmt: skip

    def land(self, keys: list[Key], wait: bool = False) -> None:
        """Switch ``keys`` to their recalled pages; ``wait``: even if their copies are still
        running (the host waits for them: it must read their sizes)."""
        if not keys:
            return
        kv, exe = self.kv, self.exe
        landings = [self.inflight.pop(k) for k in keys]
        batches = list({id(x.batch): x.batch for x in landings}.values())
        for batch in batches:
            if wait:
                self._finish(batch)
        bad = [k for k, x in zip(keys, landings) if x.batch.bad]
        if bad:
            kv.allocator.free(torch.cat([x.pages for x in landings]))
            raise ActionError(f"layer {bad[0][0]}: Recall names positions that were never offloaded (or not "
                              "ascending); reported when its batch landed, its heads keep their selection")  # fmt: skip
        sizes = [[x.batch.fact(i, x.index) for i in range(3)] for x in landings]  # n, host rows, moved rows
        lengths = kv.host_lengths.numpy()  # a view: numpy reads and writes cost no torch op each
        tails = [int(lengths[k]) - exe.resident[k] for k in keys]  # decoded since the offload
        keep = [min(kv.pages_for(s[0] + t + exe.reserve), x.pages.numel()) for s, t, x in zip(sizes, tails, landings)]
        meta = upload(torch.tensor([[k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
                                    [exe.resident[k] for k in keys], [s[0] for s in sizes], tails, keep]),
                      kv.device)  # [7, M]: layer, sequence, head, resident, n, tail, pages kept  # fmt: skip
        if kv.device.type == "cuda":
            # each batch's fresh pages were made on the side stream and are read here, by ops
            # the compute stream may run a step later; a batch whose last head lands now
            # frees them, and without this the side stream could reuse the block first
            for batch in batches:
                batch.fresh.record_stream(torch.cuda.current_stream(kv.device))
        fresh = _fresh_rows(landings, len(keys))  # [M, P] their fresh pages (device)
        self._copy_tails(meta, fresh, max(tails))
        freed = [kv.set_pages_many(keys, [x.pages[:m] for x, m in zip(landings, keep)])]
        freed += [x.pages[m:] for x, m in zip(landings, keep)]
        for key, (n, host_rows, moved), tail in zip(keys, sizes, tails):
            lengths[key] = n + tail
            exe.resident[key] = n
        from_host = sum(s[1] for s in sizes)
        self.rec.recalled_rows += from_host
        self.rec.moved_rows += sum(s[2] for s in sizes)
        self.rec.landed += len(keys)
        exe.runtime.count_h2d(from_host * kv.kv[0].numel() * kv.kv.element_size())
        kv.allocator.free(torch.cat(freed))  # one scan; the tail copy read the old pages before
        # the device tables from the fresh pages already there (the host mirror above agrees)
        cols = torch.arange(kv.max_pages, device=kv.device)
        table_rows = F.pad(fresh, (0, kv.max_pages - fresh.shape[1])).masked_fill(cols >= meta[6].unsqueeze(1), 0)
        index = (meta[0], meta[1], meta[2])
        kv._table.index_put_(index, table_rows)
        kv._lengths.index_put_(index, meta[4] + meta[5])
        self.fence()  # the freed pages are free once the compute stream is past this point

    def _copy_tails(self, meta: torch.Tensor, fresh: torch.Tensor, t_max: int) -> None:
        """Entries [resident, resident + tail) of each head's old pages -> [n, n + tail) of its
        fresh pages, every head at once (meta [7, M] as in ``land``; the device tables still
        hold the old pages)."""
        if t_max == 0:
            return
        src, dst = self._tail_rows(meta, fresh, t_max)
        self.kv.kv.index_copy_(0, dst, self.kv.kv[src])
        self.kv.positions.index_copy_(0, dst, self.kv.positions[src])

    def _tail_rows(self, meta: torch.Tensor, fresh: torch.Tensor, t_max: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool rows ``_copy_tails`` reads and writes: src, dst [M * t_max] (the trash
        row past each head's tail)."""
        kv = self.kv
        e = torch.arange(t_max, device=kv.device)
        live = e < meta[5].unsqueeze(1)  # [M, T]
        old = meta[3].unsqueeze(1) + e
        new = meta[4].unsqueeze(1) + e
        table = kv._table[meta[0], meta[1], meta[2]]  # [M, max pages]
        src = table.gather(1, (old // kv.page_size).clamp(max=kv.max_pages - 1)) * kv.page_size + old % kv.page_size
        dst = fresh.gather(1, (new // kv.page_size).clamp(max=fresh.shape[1] - 1)) * kv.page_size + new % kv.page_size
        return torch.where(live, src, kv.trash_row).flatten(), torch.where(live, dst, kv.trash_row).flatten()

    def reset(self) -> None:
        """Drop everything in flight (its pages return to the pool once the copies are done)."""
        for x in [*self.inflight.values(), *self._retired]:
            if x.batch.event is not None:
                torch.cuda.current_stream(self.kv.device).wait_event(x.batch.event)
            self.kv.allocator.free(x.pages)
        self.inflight.clear()
        self._retired.clear()
        self._queue.clear()
        self.fence_event = None


def _past_rows(valid: np.ndarray, k: int, start: int, rows: int) -> tuple[int, int]:
    """Flat entries of M heads of ``k`` entries, the first ``valid[m]`` of head m rows to
    move: the entry after ``rows`` more rows from entry ``start`` (the end when fewer are
    left), and how many rows that is."""
    before = np.concatenate([[0], np.cumsum(valid)])  # [M + 1] rows before head m

    def rows_to(x: int) -> int:
        m = x // k
        return int(before[-1]) if m >= len(valid) else int(before[m]) + min(x - m * k, int(valid[m]))

    have = rows_to(start)
    target = have + rows
    if target >= before[-1]:
        return len(valid) * k, int(before[-1]) - have
    m = int(np.searchsorted(before, target, side="right")) - 1  # before[m] <= target < before[m + 1]
    return m * k + target - int(before[m]), rows


def _fresh_rows(landings: list[Landing], m: int) -> torch.Tensor:
    """[M, P] the landing heads' fresh pages (device): their batch's rows as they are when
    they are a whole batch in order (the common case), else gathered and padded."""
    first = landings[0].batch
    if m == first.heads and all(x.batch is first and x.index == i for i, x in enumerate(landings)):
        return first.fresh
    width = max(x.batch.fresh.shape[1] for x in landings)
    return torch.cat([F.pad(x.batch.fresh[x.index : x.index + 1], (0, width - x.batch.fresh.shape[1]))
                      for x in landings])  # fmt: skip
