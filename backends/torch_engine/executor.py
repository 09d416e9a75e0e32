"""PagedExecutor: the engine's cache takes a policy's actions (Select, Offload, Recall, Attend).

Each action reads the host once (the new lengths size pages and copies, and the same read
carries the validity flags), then moves rows on the device; during a prefill, a Select whose
policy knows its lengths on the host reads nothing, and its validity waits on the device
for the prefill's one check (``check_deferred``). Offload and Recall go through
``hcpolicy.runtime.TransferRuntime``: satellites' full KV lives in its host store, keyed
(cache, layer, sequence, head). Recalls are ``recall.Recaller``'s: incremental, on the
runtime's copy stream, landing in place or in fresh pages; the host never waits for them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hcpolicy.actions import Action, ActionError, ActionExecutor, Attend, Offload, Recall, Select, Selection, check_address
from hcpolicy.runtime import TransferRuntime

from .kv import PagedKV
from .recall import Recaller
from .recall_plan import _not_ascending

_BIG = torch.iinfo(torch.int64).max
_SELECT_BAD = "layer {layer}: Select names positions that are not on the device (or not ascending)"
_SELECT_HOST = "layer {layer}: Select's host_lengths differ from its lengths"


class PagedExecutor(ActionExecutor):
    """Executes actions on ``kv``. ``reserve``: entries each head keeps free for the tokens
    still to be generated (set by the engine), so decode steps never allocate pages."""

    def __init__(self, kv: PagedKV, runtime: TransferRuntime, cache_id: int, *, landing: str = "next_step",
                 async_pages: int | None = None, async_step_bytes: int | None = None) -> None:  # fmt: skip
        self.kv = kv
        self.runtime = runtime
        self.cache_id = cache_id
        self.reserve = 0
        self.host_positions: dict[tuple[int, int, int], torch.Tensor] = {}  # (layer, b, h) -> [n] offloaded
        self.resident: dict[tuple[int, int, int], int] = {}  # entries from the offloaded range on the device
        self.attend_views: dict[int, dict[int, Selection]] = {}  # layer -> head -> [B, 1, K] (this step)
        self.recaller = Recaller(self, landing, async_pages, async_step_bytes)
        self._reading: dict[int, torch.cuda.Event | None] = {}  # layer -> its newest offload copy (CUDA)
        self._deferred: list[tuple[int, torch.Tensor]] | None = None  # (layer, flags [2]) of Selects (defer_checks)

    def reset(self) -> None:
        self._deferred = None
        self.recaller.reset()
        for key in [k for k in self.host_positions]:
            self.runtime.evict((self.cache_id, *key))
        self.host_positions.clear()
        self.resident.clear()
        self.attend_views.clear()
        self._reading.clear()

    def apply(self, actions: Iterable[Action]) -> None:
        """As ``ActionExecutor.apply``; with async landing, consecutive Recall actions go
        out as one batch (``Recaller.recall_batch``), and after any other action the async
        recalls are fenced behind it (it may free pages they would otherwise reuse)."""
        if self.recaller.landing != "async":
            super().apply(actions)
            return
        run: list[Recall] = []
        for action in actions:
            if isinstance(action, Recall):
                self.check(action)
                run.append(action)
                continue
            if run:
                self.recaller.recall_batch(run)
                run = []
            super().apply([action])
            self.recaller.fence()
        if run:
            self.recaller.recall_batch(run)

    # -- checks --------------------------------------------------------------------------------
    def check(self, action: Action) -> None:
        check_address(action, self.kv.num_layers, self.kv.num_kv_heads)
        selection = getattr(action, "selection", None)
        if selection is not None and selection.indices.shape[0] != self.kv.batch_size:
            raise ActionError(f"selection has batch {selection.indices.shape[0]}, cache has {self.kv.batch_size}")
        if not isinstance(action, Recall):
            self.recaller.land_layer(action.layer)  # the action must see the layer as attention will

    def _locate(self, layer: int, heads: list[int], selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries of the selected positions ([B, H', K]) and a flag [1]: True when a valid
        position is not on the device or positions are not strictly ascending."""
        kv = self.kv
        width = max(1, int(kv.host_lengths[layer][:, heads].max()))
        entries = torch.arange(width, device=kv.device)
        lengths = kv.lengths[layer][:, kv.head_index(heads)].unsqueeze(-1)  # [B, H', 1]
        rows = kv.rows(layer, torch.minimum(entries, (lengths - 1).clamp(min=0)).expand(*lengths.shape[:2], width), heads)
        sortable = kv.positions[rows].masked_fill(entries >= lengths, _BIG)  # [B, H', W] ascending
        want = selection.indices.to(kv.device).contiguous()
        idx = torch.searchsorted(sortable, want).clamp(max=width - 1)
        valid = selection.valid().to(kv.device)
        bad = (sortable.gather(-1, idx) != want) & valid
        return idx, (bad.any() | _not_ascending(want, valid)).view(1)

    # -- Select --------------------------------------------------------------------------------
    def select(self, action: Select) -> None:
        """Between ``defer_checks`` and ``check_deferred`` (a prefill), a selection that
        brings its ``host_lengths`` reads nothing from the device: its checks wait there for
        ``check_deferred``. Otherwise one host read (sizes + validity), raising at once."""
        kv, layer, heads, selection = self.kv, action.layer, list(action.heads), action.selection
        entries, bad = self._locate(layer, heads, selection)
        lengths = selection.lengths.to(kv.device)
        deferred = self._deferred is not None and selection.host_lengths is not None
        if deferred:
            new_lengths = selection.host_lengths  # [B, H'] host
        else:
            host = torch.cat([lengths.flatten(), bad.long()]).tolist()  # the one host read: sizes + validity
            if host[-1]:
                raise ActionError(_SELECT_BAD.format(layer=layer))
            new_lengths = torch.tensor(host[:-1]).view(lengths.shape)  # [B, H'] host
            if selection.host_lengths is not None and not torch.equal(new_lengths, selection.host_lengths):
                raise ActionError(_SELECT_HOST.format(layer=layer))
        kept_kv = kv.kv[kv.rows(layer, entries, heads)]  # [B, H', K, 2, D], gathered before pages are reused
        kept_pos = selection.indices.to(kv.device)
        self._repack(layer, heads, new_lengths, kept_kv, kept_pos, selection.valid().to(kv.device))
        if deferred:
            # the host lengths sized the pages just pushed: they must be the selection's own
            differ = (kv.lengths[layer][:, kv.head_index(heads)] != lengths).any().view(1)
            self._deferred.append((layer, torch.cat([bad, differ])))  # type: ignore[union-attr]
        for b in range(kv.batch_size):
            for i, h in enumerate(heads):
                if (layer, b, h) in self.resident:
                    self.resident[(layer, b, h)] = int(new_lengths[b, i])

    def _repack(self, layer: int, heads: list[int], lengths: torch.Tensor, rows_kv: torch.Tensor,
                rows_pos: torch.Tensor, valid: torch.Tensor) -> None:  # fmt: skip
        """``heads`` now hold exactly the given entries (rows_kv [B, H', K, 2, D], rows_pos
        [B, H', K], valid [B, H', K]; lengths [B, H'] host) in fresh pages."""
        kv = self.kv
        pairs = [(b, i, h) for b in range(kv.batch_size) for i, h in enumerate(heads)]
        # free everything first (the new pages may reuse them), then one allocation for all
        # the heads, split per head: the allocator's scan is per call, not per page
        old = torch.cat([kv.head_pages(layer, b, h) for b, _, h in pairs])
        kv.allocator.free(old, after=self._reading.get(layer))
        counts = [kv.pages_for(int(lengths[b, i]) + self.reserve) for b, i, _ in pairs]
        for (b, i, h), pages in zip(pairs, kv.allocator.allocate(sum(counts)).split(counts)):
            kv.set_pages(layer, b, h, pages)
            kv.host_lengths[layer, b, h] = int(lengths[b, i])
        kv.push_tables(layer)
        k = rows_pos.shape[-1]
        entries = torch.arange(k, device=kv.device).expand_as(rows_pos)
        dest = torch.where(valid, kv.rows(layer, entries, heads), kv.trash_row)  # padding -> trash page
        kv.kv.index_copy_(0, dest.reshape(-1), rows_kv.reshape(-1, 2, kv.head_dim))
        kv.positions.index_copy_(0, dest.reshape(-1), rows_pos.reshape(-1))

    def defer_checks(self) -> None:
        """From now until ``check_deferred``, Selects whose selections carry host lengths
        leave their validity on the device (a prefill: the host never waits for it)."""
        self._deferred = []

    def check_deferred(self) -> None:
        """Raise ActionError for the first invalid Select since ``defer_checks`` (one host
        read for all of them; the cache is then unusable until the next prefill), and stop
        deferring."""
        deferred, self._deferred = self._deferred, None
        if not deferred:
            return
        flags = torch.stack([f for _, f in deferred]).tolist()  # [N, 2]: the one host read of the checks
        for (layer, _), (bad, differ) in zip(deferred, flags):
            if bad:
                raise ActionError(_SELECT_BAD.format(layer=layer))
            if differ:
                raise ActionError(_SELECT_HOST.format(layer=layer))

    # -- Offload -------------------------------------------------------------------------------
    def offload(self, action: Offload) -> None:
        kv, layer = self.kv, action.layer
        for b in range(kv.batch_size):
            for h in action.heads:
                n = int(kv.host_lengths[layer, b, h])
                if n == 0:
                    raise ActionError(f"layer {layer} head {h} seq {b}: nothing to offload")
                src, pos = self._head_rows(layer, b, h, n)
                key = (self.cache_id, layer, b, h)
                if key in self.runtime:
                    self.runtime.evict(key)
                transfer = self.runtime.offload(key, src)  # [n, 2, D]
                # the copy reads these pages while compute goes on: pages a later action frees
                # are quarantined behind its event (PageAllocator) rather than the stream waiting
                self._reading[layer] = transfer.event
                self.host_positions[(layer, b, h)] = pos.clone()
                self.resident[(layer, b, h)] = n

    def _head_rows(self, layer: int, b: int, h: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries [0, n) of one head: kv [n, 2, D] (a slice of the pool when contiguous)
        and positions [n]."""
        kv = self.kv
        run = kv.contiguous_run(layer, b, h, n)
        if run is not None:
            return kv.kv[run : run + n], kv.positions[run : run + n]
        rows = kv.head_rows(layer, b, h, torch.arange(n, device=kv.device))  # [n]
        return kv.kv[rows], kv.positions[rows]

    # -- Recall --------------------------------------------------------------------------------
    def recall(self, action: Recall) -> None:
        """See ``recall.Recaller``: incremental, landing as configured."""
        self.recaller.recall(action)

    def _entry_rows(self, layer: int, b: int, h: int, first: int, stop: int) -> torch.Tensor:
        pages = self.kv.head_pages(layer, b, h).to(self.kv.device)
        entries = torch.arange(first, stop, device=self.kv.device)
        return pages[entries // self.kv.page_size] * self.kv.page_size + entries % self.kv.page_size

    @property
    def pending(self) -> dict:
        """Layers with an in-place recall the next attention must wait for."""
        return self.recaller.pending

    @property
    def recalls(self) -> int:
        """Recall actions that moved rows."""
        return self.recaller.recalls

    @property
    def recalled_rows(self) -> int:
        """Rows copied from the host store."""
        return self.recaller.recalled_rows

    @property
    def moved_rows(self) -> int:
        """Recalled rows that were resident already and moved device-to-device."""
        return self.recaller.moved_rows

    def wait(self, layer: int) -> None:
        """Make the current stream wait for ``layer``'s recall (no host sync)."""
        self.recaller.wait(layer)

    # -- Attend ----------------------------------------------------------------------------------
    def attend_view(self, action: Attend) -> None:
        _, bad = self._locate(action.layer, list(action.heads), action.selection)
        empty = (action.selection.lengths == 0).any().to(bad.device)
        flags = torch.cat([bad, empty.view(1)]).tolist()  # one read per Attend action
        if flags[0]:
            raise ActionError(f"layer {action.layer}: Attend names positions that are not on the device")
        if flags[1]:
            raise ActionError(f"layer {action.layer}: an Attend view must keep a token")
        views = self.attend_views.setdefault(action.layer, {})
        for i, h in enumerate(action.heads):
            views[h] = action.selection.head(i)

    def row_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This step's Attend views of ``layer`` as a row table (page size 1): rows [B, H, W],
        lengths [B, H] and the host width W; heads without a view read all their entries.
        Clears the views."""
        kv = self.kv
        views = self.attend_views.pop(layer)
        width = max([int(kv.host_lengths[layer].max())] + [s.indices.shape[-1] for s in views.values()])
        entries = torch.arange(width, device=kv.device).expand(kv.batch_size, kv.num_kv_heads, width).clone()
        lengths = kv.lengths[layer].clone()
        for h, sel in views.items():
            found, _ = self._locate(layer, [h], sel)  # [B, 1, K]
            entries[:, h, : found.shape[-1]] = found[:, 0]
            lengths[:, h] = sel.lengths[:, 0].to(kv.device)
        entries = torch.minimum(entries, (kv.lengths[layer] - 1).clamp(min=0).unsqueeze(-1))
        return kv.rows(layer, entries), lengths, width

