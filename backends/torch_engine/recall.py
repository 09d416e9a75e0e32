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
  selection. At the start of each later step a finished copy (``event.query()``, no sync)
  is landed: the tokens generated meanwhile are copied behind the recalled entries, the
  head's page table and length switch to the new pages, and the old pages are freed.
  Until then the head attends over its previous selection (one or more steps late).
  ``max_pages`` bounds the pages in flight: beyond it (or when the pool runs short) the
  oldest recalls land first, with a device-side wait (the heads of one Recall action go
  in flight together, so one action may exceed the bound alone). A new action on a head or layer
  with a recall in flight lands that recall first.

On CPU every copy is synchronous, so 'async' lands at the start of the next step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch

from hcpolicy.actions import ActionError, Recall

if TYPE_CHECKING:
    from .executor import PagedExecutor

LANDINGS = ("next_step", "eager_step", "async")
Key = tuple[int, int, int]  # (layer, sequence, KV head)


@attrs.define
class Landing:
    """An async recall of one head in flight: its fresh pages hold ``n`` recalled entries."""

    pages: torch.Tensor  # host int64 page ids
    n: int
    event: torch.cuda.Event | None
    issued: bool = False  # its copies are queued (only then may it land)


class Recaller:
    """Executes Recall actions for ``executor`` (which owns the host-store bookkeeping)."""

    def __init__(self, executor: "PagedExecutor", landing: str = "next_step", max_pages: int | None = None) -> None:
        if landing not in LANDINGS:
            raise ValueError(f"recall landing must be one of {LANDINGS}, got {landing!r}")
        if max_pages is not None and max_pages < 1:
            raise ValueError(f"async recall pages must be >= 1 or None, got {max_pages}")
        self.exe, self.kv = executor, executor.kv
        self.landing, self.max_pages = landing, max_pages
        self.pending: dict[int, torch.cuda.Event] = {}  # layer -> in-place recall to wait for
        self.inflight: dict[Key, Landing] = {}  # async recalls, oldest first
        self.recalls = self.recalled_rows = self.moved_rows = self.landed = 0
        self._side: torch.cuda.Stream | None = None

    def reset(self) -> None:
        """Drop everything in flight (its pages return to the pool once the copies are done)."""
        for landing in self.inflight.values():
            self._device_wait(landing.event)
            self.kv.allocator.free(landing.pages)
        self.inflight.clear()
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

    def land_ready(self) -> int:
        """Land the async recalls whose copies have finished (``event.query()``: no sync)."""
        ready = [k for k, x in self.inflight.items() if x.issued and (x.event is None or x.event.query())]
        self._land(ready)
        return len(ready)

    def land_layer(self, layer: int) -> None:
        """Land ``layer``'s async recalls now (device-side wait): an action is about to change it."""
        self._land([k for k in self.inflight if k[0] == layer], wait=True)

    def _land(self, keys: list[Key], wait: bool = False) -> None:
        kv, exe = self.kv, self.exe
        for key in keys:
            landing = self.inflight.pop(key)
            if wait:
                self._device_wait(landing.event)
            layer, b, h = key
            resident, total = exe.resident[key], int(kv.host_lengths[layer, b, h])
            tail = total - resident  # tokens generated since the offload, some while in flight
            if tail:
                old = kv.head_rows(layer, b, h, torch.arange(resident, total, device=kv.device))
                new = _page_rows(landing.pages, kv.page_size, landing.n, landing.n + tail, kv.device)
                kv.kv.index_copy_(0, new, kv.kv[old])
                kv.positions.index_copy_(0, new, kv.positions[old])
            kv.allocator.free(kv.head_pages(layer, b, h).clone())
            kv.set_pages(layer, b, h, landing.pages)
            kv.host_lengths[layer, b, h] = landing.n + tail
            exe.resident[key] = landing.n
            self.landed += 1
        for layer in sorted({k[0] for k in keys}):
            kv.push_tables(layer)

    def _inflight_pages(self) -> int:
        return sum(x.pages.numel() for x in self.inflight.values())

    def _fresh_pages(self, need: int) -> torch.Tensor:
        """``need`` pages for an async recall, landing the oldest in-flight recalls while the
        bound or the pool's free pages say there is no room."""
        def short() -> bool:
            over = self.max_pages is not None and self._inflight_pages() + need > self.max_pages
            return over or self.kv.allocator.free_pages < need

        issued = [k for k, x in self.inflight.items() if x.issued]  # oldest first
        while issued and short():
            self._land([issued.pop(0)], wait=True)
        return self.kv.allocator.allocate(need)

    # -- Recall ----------------------------------------------------------------------------------
    def recall(self, action: Recall) -> None:
        """Heads' offloaded-range entries become ``action.selection`` (tokens generated after
        the offload stay behind them). One host read per action; a head whose set did not
        change moves nothing; resident entries move on the device, the rest come from the host."""
        kv, exe, layer, heads, sel = self.kv, self.exe, action.layer, list(action.heads), action.selection
        keys = [(layer, b, h) for b in range(kv.batch_size) for h in heads]
        for key in keys:
            if key not in exe.host_positions:
                raise ActionError(f"layer {layer} head {key[2]}: Recall without an earlier Offload")
        if any(k in self.inflight for k in keys):
            self._land([k for k in keys if k in self.inflight], wait=True)
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
        requests, scatters = [], []
        for j, (key, plan) in enumerate(zip(keys, plans)):
            if rest[3 * j + 1]:
                b, i = key[1], heads.index(key[2])
                self._recall_head(key, want[b, i], plan, lengths[j], rest[3 * j + 2], requests, scatters)
        if not requests and not scatters:
            if any(rest[1::3]):
                self.recalls += 1  # moved rows on the device only
                kv.push_tables(layer)
            return
        kv.push_tables(layer)
        self.recalls += 1
        transfer = exe.runtime.recall_many([r for r, _ in requests]) if requests else None
        event = self._finish(transfer, [(r[2], dest) for r, dest in requests if dest is not None])
        if self.landing == "async":
            for key, _ in scatters:
                self.inflight[key].event, self.inflight[key].issued = event, True
        elif event is not None:
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

    def _recall_head(self, key: Key, want: torch.Tensor, plan: dict, n: int, n_new: int, requests: list,
                     scatters: list) -> None:  # fmt: skip
        """Lay head ``key`` out for ``n`` recalled entries (in place or in fresh pages), move
        its resident ones on the device now, and queue the ``n_new`` host rows."""
        kv, exe = self.kv, self.exe
        layer, b, h = key
        order = torch.argsort(plan["hit"][:n].to(torch.int8), stable=True)  # misses first, then hits
        miss, hit = order[:n_new], order[n_new:]
        moved = kv.kv[kv.head_rows(layer, b, h, plan["at"][hit])] if n > n_new else None  # copied before any write
        if self.landing == "async":
            tail = int(kv.host_lengths[layer, b, h]) - exe.resident[key]
            pages = self._fresh_pages(kv.pages_for(n + tail + exe.reserve))
            dest = _page_rows(pages, kv.page_size, 0, n, kv.device)
            self.inflight[key] = Landing(pages=pages, n=n, event=None)
            scatters.append((key, dest))
            direct = None
        else:
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


def _page_rows(pages: torch.Tensor, page_size: int, first: int, stop: int, device: torch.device) -> torch.Tensor:
    """Pool rows of entries [first, stop) of a head laid out on ``pages`` (host ids)."""
    entries = torch.arange(first, stop, device=device)
    return pages.to(device)[entries // page_size] * page_size + entries % page_size


def _not_ascending(want: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[] bool: some head's valid positions are not strictly ascending. want/valid [..., K]."""
    if want.shape[-1] < 2:
        return torch.zeros((), dtype=torch.bool, device=want.device)
    step_ok = (want[..., 1:] > want[..., :-1]) | ~valid[..., 1:]
    return ~step_ok.all()
