"""Async recalls (``landing='async'``): many Recall actions as one batch, no host sync.

``issue`` takes Recall actions of any layers. On the host it only allocates fresh pages
(sized by each selection's width, a host-known bound) and books them; on a side stream one
pass of device ops plans every head at once (where each wanted position sits in the host
store, which ones the head already holds and where, the fresh rows), and one gather kernel
on the runtime's recall stream fills the fresh pages: held rows move on the device, the
others cross PCIe (``TransferRuntime.reading_rows``). Each head's entry count, host and
moved rows and the batch's validity flag go to pinned memory behind the copies.

``land`` switches heads whose batch is done to their fresh pages: the tokens decoded in the
meantime are copied behind the recalled entries (one gather for all heads), surplus pages
are freed, and the tables go up. The host reads the pinned facts only once the batch's
event has completed, so a landing found by ``ready`` waits for nothing.

Ordering: the side stream starts after ``fence`` (an event the engine records on the
compute stream before a step's replay, and every landing records after it frees pages),
so fresh pages are never pages that queued compute still reads.
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
from hcpolicy.kernels._triton import have_triton

if TYPE_CHECKING:
    from hcpolicy.runtime.hostrows import HostRows

    from .recall import Recaller

Key = tuple[int, int, int]  # (layer, sequence, KV head)
_BIG = torch.iinfo(torch.int64).max
_ROW_SHIFT = 40  # positions stay below 2**40
GATHER_CTAS = 16  # programs of the recall gather: enough for PCIe, few SMs taken from decode


@attrs.define(eq=False)
class Batch:
    """One issued batch: ``facts`` (pinned int64 [3M + 1]) holds, once ``event`` completed,
    each head's entry count, host rows and moved rows, then a flag for an invalid action."""

    facts: torch.Tensor
    event: torch.cuda.Event | None
    heads: int
    fresh: torch.Tensor  # [M, P] the heads' fresh pages (device), for the landing's tail copy
    keep: tuple = ()  # device tensors the copies read, alive until they are done
    _values: list[int] | None = None

    def done(self) -> bool:
        return self.event is None or self.event.query()

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
    def __init__(self, recaller: "Recaller", max_pages: int | None) -> None:
        self.rec, self.exe, self.kv = recaller, recaller.exe, recaller.kv
        self.max_pages = max_pages
        self.inflight: dict[Key, Landing] = {}  # oldest first
        self.fence_event: torch.cuda.Event | None = None
        self._side: torch.cuda.Stream | None = None
        self._stack: tuple | None = None  # (host_positions, key -> row, their tensors, [heads, N])
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

    # -- issue ---------------------------------------------------------------------------------
    def issue(self, actions: Sequence[Recall]) -> None:
        """Recall actions as batches: a head named twice starts a new batch."""
        group: list[Recall] = []
        seen: set[Key] = set()
        for action in actions:
            keys = set(self._keys(action))
            if keys & seen:
                self._issue(group)
                group, seen = [], set()
            group.append(action)
            seen |= keys
        if group:
            self._issue(group)

    def _keys(self, action: Recall) -> list[Key]:
        keys = [(action.layer, b, h) for b in range(self.kv.batch_size) for h in action.heads]
        for key in keys:
            if key not in self.exe.host_positions:
                raise ActionError(f"layer {key[0]} head {key[2]}: Recall without an earlier Offload")
        return keys

    def _issue(self, actions: list[Recall]) -> None:
        kv, exe = self.kv, self.exe
        keys = [k for a in actions for k in self._keys(a)]
        for key in [k for k in keys if k in self.inflight]:
            # a newer recall of a head still in flight replaces it: the old copy runs out and
            # its pages go back to the pool then (``reap``); nothing waits for it
            self._retired.append(self.inflight.pop(key))
        lengths = kv.host_lengths.numpy()
        tails = [int(lengths[k]) - exe.resident[k] for k in keys]
        room = [n + t + exe.reserve for n, t in zip(_sizes(actions, kv.batch_size), tails)]
        counts = [kv.pages_for(r) for r in room]
        pages = self._fresh_pages(sum(counts)).split(counts)
        side = self.side()
        if side is not None:
            if self.fence_event is None:
                side.wait_stream(torch.cuda.current_stream(kv.device))
            else:
                side.wait_event(self.fence_event)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            plan = self._plan(actions, keys, pages, room)
            facts = torch.empty(plan["facts"].shape, dtype=torch.int64, pin_memory=side is not None)
            facts.copy_(plan["facts"], non_blocking=True)
            runtime_keys = [(exe.cache_id, *k) for k in keys]
            with exe.runtime.reading_rows(runtime_keys, align=(kv.kv.data_ptr(),)) as view:
                host_src = (upload(view.starts, kv.device).unsqueeze(1) + plan["host_rows"] * view.row_words)
                recall_rows(kv.kv, view, plan["dst"], plan["pool_src"], host_src)
        # made on the side stream and read on the recall stream, which may still be copying an
        # earlier batch: kept until this one lands, so the side stream cannot reuse them first
        batch = Batch(facts=facts, event=view.transfer.event, heads=len(keys), fresh=plan["fresh"],
                      keep=(plan["dst"], plan["pool_src"], plan["host_rows"]))  # fmt: skip
        for i, (key, head_pages) in enumerate(zip(keys, pages)):
            self.inflight[key] = Landing(pages=head_pages, batch=batch, index=i)
        self.rec.recalls += len(actions)

    def _plan(self, actions: list[Recall], keys: list[Key], pages: Sequence[torch.Tensor],
              room: list[int]) -> dict[str, torch.Tensor]:  # fmt: skip
        """Device ops for M heads wanting up to K positions each: fresh rows ``dst`` [M, K]
        (-1: no entry), the pool row of each wanted position the head holds (``pool_src``,
        else -1) or its host row (``host_rows``), the fresh pages ``fresh`` [M, P] and
        ``facts`` [3M + 1]."""
        kv, exe, dev = self.kv, self.exe, self.kv.device
        width = max(a.selection.indices.shape[-1] for a in actions)
        want = torch.cat([F.pad(a.selection.indices.to(dev).flatten(0, 1), (0, width - a.selection.indices.shape[-1]))
                          if a.selection.indices.shape[-1] < width else a.selection.indices.to(dev).flatten(0, 1)
                          for a in actions])  # [M, K]  # fmt: skip
        n = torch.cat([a.selection.lengths.to(dev).flatten() for a in actions])  # [M]
        k = torch.arange(width, device=dev)
        valid = k < n.unsqueeze(1)  # [M, K] (Selection.valid, all heads at once)
        # per head, in one upload: layer, sequence, head, resident entries, room for entries,
        # row of its offloaded positions in the stack; then its fresh pages, padded
        m, p = len(keys), max(x.numel() for x in pages)
        stack = self._offloaded_stack()
        meta = np.zeros(6 * m + m * p, dtype=np.int64)
        meta[: 6 * m].reshape(6, m)[:] = [[key[0] for key in keys], [key[1] for key in keys], [key[2] for key in keys],
                                          [exe.resident[key] for key in keys], room,
                                          [stack[1][key] for key in keys]]  # fmt: skip
        fresh_host = meta[6 * m :].reshape(m, p)
        for i, x in enumerate(pages):
            fresh_host[i, : x.numel()] = x.numpy()
        meta = upload(torch.from_numpy(meta), dev)
        facts, fresh = meta[: 6 * m].view(6, m), meta[6 * m :].view(m, p)
        held, cap = facts[3].unsqueeze(1), facts[4].unsqueeze(1)  # [M, 1]
        valid = valid & (k < cap)  # never past the pages booked on the host (a bad action is flagged)
        # where each wanted position sits in its head's host block: one search in the keyed
        # stack (row << 40 | position, ascending throughout), no copy of the heads' rows
        keyed, width_n = stack[3], stack[4]
        query = (facts[5].unsqueeze(1) << _ROW_SHIFT) + want.clamp(min=0)  # [M, K]
        found = torch.searchsorted(keyed, query).clamp(max=keyed.numel() - 1)
        missing = (keyed[found] != query) & valid
        host_rows = (found - facts[5].unsqueeze(1) * width_n).clamp(min=0, max=width_n - 1)
        # which ones the head holds now (its first ``resident`` entries), and their pool rows
        r_max = max(max(exe.resident[k] for k in keys), 1)
        entries = torch.arange(r_max, device=dev)
        table = kv._table[facts[0], facts[1], facts[2]]  # [M, max pages]
        e = torch.minimum(entries, (held - 1).clamp(min=0))  # [M, R]
        rows = table.gather(1, e // kv.page_size) * kv.page_size + e % kv.page_size
        now = kv.positions[rows].masked_fill(entries >= held, _BIG)  # [M, R] ascending
        at = torch.searchsorted(now, want).clamp(max=r_max - 1)
        hit = (now.gather(1, at) == want) & valid
        pool_src = torch.where(hit, rows.gather(1, at), -1)
        # the fresh rows, and the recalled positions written there now (nothing reads them yet)
        dst = fresh.gather(1, (k // kv.page_size).expand(m, -1)) * kv.page_size + k % kv.page_size
        dst = torch.where(valid, dst, -1)
        kv.positions.index_copy_(0, torch.where(valid, dst, kv.trash_row).flatten(), want.flatten())
        bad = missing.any() | _not_ascending(want, valid) | (n > cap[:, 0]).any()
        facts = torch.cat([n, (valid & ~hit).sum(1), hit.sum(1), bad.view(1)]).to(torch.int64)
        return {"dst": dst, "pool_src": pool_src, "host_rows": host_rows, "fresh": fresh, "facts": facts}

    def _offloaded_stack(self) -> tuple:
        """(host_positions, key -> row, their tensors, keyed [heads * N], N): every offloaded
        head's positions as one ascending 1-D tensor, row << 40 | position (padding: the
        row's largest key), made again only after an offload changed them."""
        held = self.exe.host_positions
        stack = self._stack
        if stack is None or stack[0] is not held or len(stack[1]) != len(held) or any(
            stack[2][i] is not held[key] for key, i in stack[1].items()
        ):  # fmt: skip
            pad = (1 << _ROW_SHIFT) - 1
            stacked = torch.nn.utils.rnn.pad_sequence(list(held.values()), batch_first=True, padding_value=pad)
            rows = torch.arange(stacked.shape[0], device=stacked.device).unsqueeze(1) << _ROW_SHIFT
            stack = (held, {key: i for i, key in enumerate(held)}, list(held.values()), (stacked + rows).flatten(),
                     stacked.shape[1])  # fmt: skip
            self._stack = stack
        return stack

    def _fresh_pages(self, need: int) -> torch.Tensor:
        """``need`` pages, landing the oldest in-flight recalls while the bound or the pool's
        free pages say there is no room."""
        def short() -> bool:
            inflight = sum(x.pages.numel() for x in self.inflight.values())
            over = self.max_pages is not None and inflight + need > self.max_pages
            return over or self.kv.allocator.free_pages < need

        while self._retired and short():  # replaced recalls' pages first: nothing lands
            event = self._retired[0].batch.event
            if event is not None:
                event.synchronize()
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
        for batch in {id(x.batch): x.batch for x in landings}.values():
            if wait and batch.event is not None:
                batch.event.synchronize()
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
        fresh = _fresh_rows(landings, len(keys))  # [M, P] their fresh pages (device)
        if fresh.is_cuda:
            fresh.record_stream(torch.cuda.current_stream(kv.device))  # made on the side stream, read here
        self._copy_tails(meta, fresh, max(tails))
        freed = [kv.set_pages_many(keys, [x.pages[:m] for x, m in zip(landings, keep)])]
        freed += [x.pages[m:] for x, m in zip(landings, keep)]
        for key, (n, host_rows, moved), tail in zip(keys, sizes, tails):
            lengths[key] = n + tail
            exe.resident[key] = n
        rows = sum(s[1] for s in sizes)
        self.rec.recalled_rows += rows
        self.rec.moved_rows += sum(s[2] for s in sizes)
        self.rec.landed += len(keys)
        exe.runtime.count_h2d(rows * kv.kv[0].numel() * kv.kv.element_size())
        kv.allocator.free(torch.cat(freed))  # one scan; the tail copy read the old pages before
        # the device tables from the fresh pages already there (the host mirror above agrees)
        cols = torch.arange(kv.max_pages, device=kv.device)
        rows = F.pad(fresh, (0, kv.max_pages - fresh.shape[1])).masked_fill(cols >= meta[6].unsqueeze(1), 0)
        index = (meta[0], meta[1], meta[2])
        kv._table.index_put_(index, rows)
        kv._lengths.index_put_(index, meta[4] + meta[5])
        self.fence()  # the freed pages are free once the compute stream is past this point

    def _copy_tails(self, meta: torch.Tensor, fresh: torch.Tensor, t_max: int) -> None:
        """Entries [resident, resident + tail) of each head's old pages -> [n, n + tail) of its
        fresh pages, every head at once (meta [7, M] as in ``land``; the device tables still
        hold the old pages)."""
        if t_max == 0:
            return
        kv = self.kv
        e = torch.arange(t_max, device=kv.device)
        live = e < meta[5].unsqueeze(1)  # [M, T]
        old = meta[3].unsqueeze(1) + e
        new = meta[4].unsqueeze(1) + e
        table = kv._table[meta[0], meta[1], meta[2]]  # [M, max pages]
        src = table.gather(1, (old // kv.page_size).clamp(max=kv.max_pages - 1)) * kv.page_size + old % kv.page_size
        dst = fresh.gather(1, (new // kv.page_size).clamp(max=fresh.shape[1] - 1)) * kv.page_size + new % kv.page_size
        src, dst = torch.where(live, src, kv.trash_row).flatten(), torch.where(live, dst, kv.trash_row).flatten()
        kv.kv.index_copy_(0, dst, kv.kv[src])
        kv.positions.index_copy_(0, dst, kv.positions[src])

    def reset(self) -> None:
        """Drop everything in flight (its pages return to the pool once the copies are done)."""
        for x in [*self.inflight.values(), *self._retired]:
            if x.batch.event is not None:
                torch.cuda.current_stream(self.kv.device).wait_event(x.batch.event)
            self.kv.allocator.free(x.pages)
        self.inflight.clear()
        self._retired.clear()
        self.fence_event = None


def recall_rows(pool: torch.Tensor, view: "HostRows", dst: torch.Tensor, pool_src: torch.Tensor,
                host_src: torch.Tensor) -> None:  # fmt: skip
    """pool rows dst <- pool rows pool_src (>= 0) or the host words at host_src; dst < 0
    skips an entry. pool: [R, 2, D]; dst, pool_src, host_src: [M, K] int64 (device)."""
    words = pool.view(-1).view(torch.uint8).view(view.word)  # [R * row_words]
    dst, pool_src, host_src = dst.flatten(), pool_src.flatten(), host_src.flatten()
    if pool.is_cuda and have_triton():
        from ._recall_triton import recall_rows_triton

        recall_rows_triton(words, view.flat, dst, pool_src, host_src, view.row_words, GATHER_CTAS)
        return
    rows = words.view(-1, view.row_words)  # boolean indexing below syncs: CPU, or CUDA without triton
    take = dst >= 0
    held, far = take & (pool_src >= 0), take & (pool_src < 0)
    rows[dst[held]] = rows[pool_src[held]]
    cols = torch.arange(view.row_words, device=view.flat.device)
    rows[dst[far]] = view.flat[host_src[far].to(view.flat.device).unsqueeze(1) + cols].to(rows.device)


def _fresh_rows(landings: list[Landing], m: int) -> torch.Tensor:
    """[M, P] the landing heads' fresh pages (device): their batch's rows as they are when
    they are a whole batch in order (the common case), else gathered and padded."""
    first = landings[0].batch
    if m == first.heads and all(x.batch is first and x.index == i for i, x in enumerate(landings)):
        return first.fresh
    width = max(x.batch.fresh.shape[1] for x in landings)
    return torch.cat([F.pad(x.batch.fresh[x.index : x.index + 1], (0, width - x.batch.fresh.shape[1]))
                      for x in landings])  # fmt: skip


def _sizes(actions: Sequence[Recall], batch: int) -> list[int]:
    """Entries each head of the actions may recall, known on the host: the selection's
    host lengths when it carries them, else its width."""
    sizes = []
    for a in actions:
        host = a.selection.host_lengths
        if host is not None:
            sizes += host.flatten().tolist()
        else:
            sizes += [a.selection.indices.shape[-1]] * (batch * len(a.heads))
    return sizes


def _not_ascending(want: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[] bool: some head's valid positions are not strictly ascending. want/valid [..., K]."""
    if want.shape[-1] < 2:
        return torch.zeros((), dtype=torch.bool, device=want.device)
    step_ok = (want[..., 1:] > want[..., :-1]) | ~valid[..., 1:]
    return ~step_ok.all()
