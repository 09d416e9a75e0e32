"""Recall: satellites' offloaded-range entries become a new selection, incrementally.

Only positions that are not on the device already come from the host store; entries the
head already holds move device-to-device (``recalled_rows`` counts host rows,
``moved_rows`` device rows). How the copy meets the decode step (``landing``):

- 'next_step' (default): the head is rewritten in place; the copy runs on a side stream
  and the next attention that reads the layer waits for it on the device (a graph step
  waits for every pending recall before its replay; an eager step per layer). No host sync.
- 'eager_step': as 'next_step', but under CUDA graphs the step after a recall runs
  eagerly with per-layer waits (the engine's earlier behaviour, kept for comparison).
- 'async': the recall writes FRESH pages while attention keeps reading the head's old
  selection, and the host never waits: ``recall_batch`` plans every head of several
  Recall actions (any layers) in one pass of device ops on a side stream, and one gather
  kernel fills the fresh pages (rows the head holds move on the device, the others are
  read from the host store over PCIe, through ``TransferRuntime.reading_rows``), spread
  over the time the PCIe reads take. Sizes, row counts and the validity flags come back
  in pinned memory. At the start of each later step a finished batch (``event.query()``)
  is landed: the tokens generated meanwhile are copied behind the recalled entries, the
  heads' page tables and lengths switch to the new pages, and the old pages are freed; an
  invalid action raises ActionError then (its heads keep their previous selection).
  Until then a head attends over its previous selection (one or more steps late).
  ``max_pages`` bounds the pages in flight: beyond it (or when the pool runs short) the
  oldest recalls land first, the host waiting for their copies. A new action on a head
  or layer with a recall in flight lands that recall first.

On CPU every copy is synchronous, so 'async' lands at the start of the next step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hcpolicy.actions import ActionError, Recall

from .async_recall import AsyncRecalls
from .recall_plan import _not_ascending, recall_keys

if TYPE_CHECKING:
    from .executor import PagedExecutor

LANDINGS = ("next_step", "eager_step", "async")
Key = tuple[int, int, int]  # (layer, sequence, KV head)


class Recaller:
    """Executes Recall actions for ``executor`` (which owns the host-store bookkeeping)."""

    def __init__(self, executor: "PagedExecutor", landing: str = "next_step", max_pages: int | None = None,
                 step_bytes: int | None = None) -> None:  # fmt: skip
        if landing not in LANDINGS:
            raise ValueError(f"recall landing must be one of {LANDINGS}, got {landing!r}")
        if max_pages is not None and max_pages < 1:
            raise ValueError(f"async recall pages must be >= 1 or None, got {max_pages}")
        if step_bytes is not None and step_bytes < 1:
            raise ValueError(f"async recall bytes per step must be >= 1 or None, got {step_bytes}")
        self.exe, self.kv = executor, executor.kv
        self.landing = landing
        self.pending: dict[int, torch.cuda.Event] = {}  # layer -> in-place recall to wait for
        self.recalls = self.recalled_rows = self.moved_rows = self.landed = 0
        row_bytes = self.kv.kv[0].numel() * self.kv.kv.element_size()  # K + V of one entry
        self.async_ = AsyncRecalls(self, max_pages, None if step_bytes is None else max(1, step_bytes // row_bytes))
        self._side: torch.cuda.Stream | None = None

    @property
    def inflight(self) -> dict:
        """Heads with an async recall in flight, oldest first."""
        return self.async_.inflight

    def reset(self) -> None:
        """Drop everything in flight (its pages return to the pool once the copies are done)."""
        self.async_.reset()
        for event in self.pending.values():
            self._device_wait(event)
        self.pending.clear()
        self.recalls = self.recalled_rows = self.moved_rows = self.landed = 0

    # -- waiting and landing ---------------------------------------------------------------------
    def _device_wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.kv.device).wait_event(event)

    def wait(self, layer: int) -> None:
        """The current stream waits for ``layer``'s in-place recall (no host sync)."""
        self._device_wait(self.pending.pop(layer, None))

    def wait_all(self) -> None:
        for layer in list(self.pending):
            self.wait(layer)

    def pace(self, quiet: bool) -> None:
        """After a decode step is enqueued: the async recalls' gather share that runs under
        the next one (none when ``quiet``: the next step ends with a decision)."""
        if self.landing == "async":
            self.async_.pace(quiet)

    def land_ready(self) -> int:
        """Land the async recalls whose copies have finished (``event.query()``: no sync)."""
        self.async_.reap()
        ready = self.async_.ready()
        self.async_.land(ready)
        return len(ready)

    def land_all(self) -> None:
        """Land every async recall now: what their gathers have not sent goes at once and
        the host waits for the copies (the end of a run; replaced recalls' pages return)."""
        self.async_.land_all()

    def land_layer(self, layer: int) -> None:
        """Land ``layer``'s async recalls now (the host waits for their copies): an action
        is about to change the layer."""
        self.async_.land([k for k in self.inflight if k[0] == layer], wait=True)

    def prepare(self) -> None:
        """After prefill (async landing): what the first recall would otherwise build."""
        if self.landing == "async" and self.exe.host_positions:
            self.async_.prepare()

    def fence(self) -> None:
        """Async recalls issued from now on start after the compute stream's queued work."""
        self.async_.fence()

    def recall_batch(self, actions: list[Recall]) -> None:
        """Async landing: Recall actions of any layers as batches (``AsyncRecalls``)."""
        self.async_.issue(actions)

    # -- Recall ----------------------------------------------------------------------------------
    def recall(self, action: Recall) -> None:
        """Heads' offloaded-range entries become ``action.selection`` (tokens generated after
        the offload stay behind them). One host read per action; a head whose set did not
        change moves nothing; resident entries move on the device, the rest come from the host."""
        if self.landing == "async":
            self.recall_batch([action])
            return
        kv, exe, layer, heads, sel = self.kv, self.exe, action.layer, list(action.heads), action.selection
        keys = recall_keys(action, kv.batch_size, exe.host_positions)
        want = sel.indices.to(kv.device)  # [B, H', K]
        valid = sel.valid().to(kv.device)
        plans, flags = [], []
        for _, b, h in keys:
            i = heads.index(h)
            plan = self._plan(layer, b, h, want[b, i].contiguous(), valid[b, i])
            plans.append(plan)
            flags += [plan["missing"], plan["changed"], plan["new"]]
        flags.append(_not_ascending(want, valid))
        host = torch.cat([sel.lengths.to(kv.device).flatten(), torch.stack(flags).long()]).tolist()  # one read
        lengths, rest = host[: len(keys)], host[len(keys) : -1]
        if any(rest[0::3]) or host[-1]:
            raise ActionError(f"layer {layer}: Recall names positions that were never offloaded (or not ascending)")
        requests: list = []
        for j, (key, plan) in enumerate(zip(keys, plans)):
            if rest[3 * j + 1]:
                b, i = key[1], heads.index(key[2])
                self._recall_head(key, want[b, i], plan, lengths[j], rest[3 * j + 2], requests)
        if not requests:
            if any(rest[1::3]):
                self.recalls += 1  # moved rows on the device only
                kv.push_tables(layer)
            return
        kv.push_tables(layer)
        self.recalls += 1
        transfer = exe.runtime.recall_many([r for r, _ in requests]) if requests else None
        event = self._finish(transfer, [(r[2], dest) for r, dest in requests if dest is not None])
        if event is not None:
            self.pending[layer] = event

    def _plan(self, layer: int, b: int, h: int, want: torch.Tensor, valid: torch.Tensor) -> dict:
        """Device-side facts about head (layer, b, h)'s recall of ``want`` [K]: host rows,
        which wanted positions are resident now (and where), and flags for the one host read."""
        kv, exe = self.kv, self.exe
        offloaded = exe.host_positions[(layer, b, h)]  # [N] ascending
        host_rows = torch.searchsorted(offloaded, want).clamp(max=offloaded.shape[0] - 1)  # [K]
        resident = exe.resident[(layer, b, h)]
        k = want.shape[0]
        width = max(k, resident, 1)
        entries = torch.arange(width, device=kv.device)
        now = kv.positions[kv.head_rows(layer, b, h, entries.clamp(max=max(resident - 1, 0)))]
        now = now.masked_fill(entries >= resident, _BIG)  # [W] resident positions, ascending
        at = torch.searchsorted(now, want).clamp(max=width - 1)  # [K] entry of each wanted position
        hit = (now[at] == want) & valid
        wanted = torch.nn.functional.pad(want.masked_fill(~valid, -1), (0, width - k), value=-1)
        return {
            "host_rows": host_rows, "at": at, "hit": hit,
            "missing": ((offloaded[host_rows] != want) & valid).any(),
            "changed": (now.masked_fill(entries >= resident, -1) != wanted).any(),
            "new": (valid & ~hit).sum(),
        }  # fmt: skip

    def _recall_head(self, key: Key, want: torch.Tensor, plan: dict, n: int, n_new: int, requests: list) -> None:
        """Lay head ``key`` out for ``n`` recalled entries (in place or in fresh pages), move
        its resident ones on the device now, and queue the ``n_new`` host rows."""
        kv, exe = self.kv, self.exe
        layer, b, h = key
        order = torch.argsort(plan["hit"][:n].to(torch.int8), stable=True)  # misses first, then hits
        miss, hit = order[:n_new], order[n_new:]
        moved = kv.kv[kv.head_rows(layer, b, h, plan["at"][hit])] if n > n_new else None  # copied before any write
        direct = self._make_room(layer, b, h, n)
        dest = exe._entry_rows(layer, b, h, 0, n)
        kv.positions.index_copy_(0, dest, want[:n])
        if moved is not None:
            kv.kv.index_copy_(0, dest[hit], moved)
            self.moved_rows += n - n_new
        if n_new:
            if direct is not None and n_new == n:
                requests.append((((exe.cache_id, *key), plan["host_rows"][:n], direct), None))
            else:
                out = torch.empty(n_new, 2, kv.head_dim, dtype=kv.dtype, device=kv.device)
                requests.append((((exe.cache_id, *key), plan["host_rows"][miss], out), dest[miss]))
            self.recalled_rows += n_new

    def _make_room(self, layer: int, b: int, h: int, n: int) -> torch.Tensor | None:
        """In place: head (layer, b, h) holds ``n`` recalled entries then its generated tail.
        Returns the pool slice of entries [0, n) when they are one run, else None."""
        kv, exe = self.kv, self.exe
        resident = exe.resident[(layer, b, h)]
        total = int(kv.host_lengths[layer, b, h])
        tail = total - resident
        if n != resident and tail:
            old = kv.head_rows(layer, b, h, torch.arange(resident, total, device=kv.device))
            tail_kv, tail_pos = kv.kv[old], kv.positions[old]  # copies: the rows may move onto themselves
            kv.grow(layer, b, h, n + tail + exe.reserve)
            new = exe._entry_rows(layer, b, h, n, n + tail)
            kv.kv.index_copy_(0, new, tail_kv)
            kv.positions.index_copy_(0, new, tail_pos)
        else:
            kv.grow(layer, b, h, n + tail + exe.reserve)
        kv.host_lengths[layer, b, h] = n + tail
        exe.resident[(layer, b, h)] = n
        run = kv.contiguous_run(layer, b, h, n)
        return kv.kv[run : run + n] if run is not None else None

    def _finish(self, transfer: object | None, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event | None:
        """Scatter recalled scratch rows into their pool rows: on CPU now, on CUDA on a side
        stream after the transfer. Returns the event the reading side waits for (None on CPU)."""
        kv = self.kv
        if kv.device.type != "cuda":
            for out, dest in copies:
                kv.kv.index_copy_(0, dest, out)
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(kv.device)
        side = self._side
        side.wait_stream(torch.cuda.current_stream(kv.device))  # positions, moved rows, fresh pages
        if transfer is not None:
            self.exe.runtime.wait(transfer, side)
        with torch.cuda.stream(side):
            for out, dest in copies:
                kv.kv.index_copy_(0, dest, out)
                out.record_stream(side)
                dest.record_stream(side)
            event = torch.cuda.Event()
            event.record(side)
        return event


_BIG = torch.iinfo(torch.int64).max
