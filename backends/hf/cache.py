"""HeadwiseCache: a transformers Cache whose layers keep a real length per KV head.

A layer starts dense (exactly like ``DynamicLayer``, so a keep-everything policy is
bit-identical to plain transformers) and turns ragged (``RaggedKV``) at the first action
that changes what it holds. ``get_seq_length`` always reports the logical length, so
RoPE positions, masks and ``generate`` see the sequence as if nothing had been dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from . import compat
from .recall import _stack_padded, recall as recall_rows
from .storage import RaggedKV
from hcpolicy.actions import (
    Action, ActionError, ActionExecutor, Attend, Offload, Recall, Select, Selection, check_address, head_index,
)  # fmt: skip
from hcpolicy.capabilities import Requirements
from hcpolicy.observe import LayerCache, Observation, Phase
from hcpolicy.policy.base import Policy
from hcpolicy.runtime import TransferRuntime
from hcpolicy.spec import ModelSpec


@attrs.frozen(eq=False)
class KVHandle:
    """What ``update`` returns in place of K/V tensors: the layer, and where the new tokens
    start. The hcpolicy attention function reads the layer's storage through it."""

    layer: "HeadwiseLayer"
    first_position: int


class HeadwiseLayer(compat.DynamicLayer, ActionExecutor):
    def __init__(self, owner: "HeadwiseCache", index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.seen = 0
        self.ragged: RaggedKV | None = None
        self.prefilled = False
        self.host_positions: dict[tuple[int, int], torch.Tensor] = {}  # (b, h) -> [n] offloaded positions
        self.host_resident: dict[tuple[int, int], int] = {}  # (b, h) -> rows on device from the host range
        self.attend_views: dict[int, Selection] = {}  # head -> this step's Attend selection [B, 1, K]
        self.recall_plans: dict[tuple[int, ...], tuple] = {}  # heads -> (layout key, RecallPlan)
        self._head_index: dict[tuple[int, ...], torch.Tensor] = {}  # heads -> [H'] on the device

    # -- transformers' layer interface ------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.owner.check_live()
        first = self.seen
        self.seen += key_states.shape[2]
        if self.ragged is None:
            super().update(key_states, value_states)
        else:
            self.ragged = self.ragged.append(key_states, value_states, first, self.owner.headroom)
        handle = KVHandle(self, first)
        return handle, handle

    def get_seq_length(self, *args: Any) -> int:
        return self.seen

    def get_mask_sizes(self, arg: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        return self.seen + compat.mask_query_length(arg), 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("HeadwiseCache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HeadwiseCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("HeadwiseCache does not support expanding the batch after prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("HeadwiseCache does not support selecting batch entries")

    def reset(self) -> None:
        # drop the tensors (some transformers releases only zero them in place), so that a
        # reset layer holds no memory
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.ragged = None
        self.prefilled = False
        self.host_positions.clear()
        self.host_resident.clear()
        self.attend_views.clear()
        self.recall_plans.clear()

    # -- views --------------------------------------------------------------------------------
    def view(self, heads: list[int] | None = None) -> LayerCache:
        """The device KV as a padded LayerCache (dense layers: no copy)."""
        if self.ragged is None:
            keys, values = self.keys, self.values
            if heads is not None:
                index = head_index(heads, keys.device, self._head_index)  # a list index would sync the host
                keys, values = keys[:, index], values[:, index]
            return LayerCache.dense(keys, values, starts=self.owner.starts)
        cache = self.ragged.padded(heads)
        return attrs.evolve(cache, starts=self.owner.starts)

    def kv_bytes(self) -> int:
        if self.ragged is not None:
            return self.ragged.nbytes()
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.numel() * self.keys.element_size() * 2

    # -- executing actions ---------------------------------------------------------------------------
    def check(self, action: Action) -> None:
        self.owner.check_live()
        if action.layer != self.index:
            raise ActionError(f"action for layer {action.layer} reached layer {self.index}")
        check_address(action, self.owner.spec.num_layers, self.owner.spec.num_kv_heads)

    def attend_view(self, action: Attend) -> None:
        for i, h in enumerate(action.heads):
            self.attend_views[h] = action.selection.head(i)

    def _make_ragged(self) -> RaggedKV:
        if self.ragged is None:
            self.ragged = RaggedKV.from_dense(self.keys, self.values, self.owner.headroom)
            # drop the dense tensors: from here on the layer's device memory is what it keeps
            self.keys = self.values = torch.empty(0, device=self.ragged.kv.device)
        return self.ragged

    def _rows_of(self, heads: list[int], selection: Selection, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage rows of the selected positions: (kv [B, H', K, 2, D], positions [B, H', K])."""
        store = self._make_ragged()
        kv_rows, pos_rows = store._rows_view()  # [B, H, W, 2, D], [B, H, W]
        kv_rows, pos_rows = kv_rows[:, heads], pos_rows[:, heads]
        valid = torch.arange(pos_rows.shape[2], device=pos_rows.device) < store.lengths[:, heads].unsqueeze(-1)
        sortable = pos_rows.masked_fill(~valid, torch.iinfo(torch.int64).max)
        want = selection.indices.to(pos_rows.device)
        idx = torch.searchsorted(sortable, want).clamp(max=pos_rows.shape[2] - 1)  # [B, H', K]
        found = sortable.gather(2, idx) == want
        if not bool((found | ~selection.valid().to(found.device)).all()):  # one host read per action
            raise ActionError(f"layer {self.index}: {what} names positions that are not on the device")
        return kv_rows.gather(2, idx[..., None, None].expand(*idx.shape, *kv_rows.shape[3:])), want

    def select(self, action: Select) -> None:
        heads = list(action.heads)
        kv, pos = self._rows_of(heads, action.selection, "Select")
        lengths = action.selection.lengths.tolist()  # one host read per Select: sizes the new layout
        for b, row in enumerate(lengths):
            for i, h in enumerate(heads):
                if (b, h) in self.host_positions:
                    self.host_resident[(b, h)] = row[i]
        self.ragged = self.ragged.replace(heads, kv, pos, lengths, self.owner.headroom)

    def offload(self, action: Offload) -> None:
        store = self._make_ragged()
        runtime = self.owner.runtime
        self.recall_plans.clear()  # they hold the offloaded positions
        for b in range(store.batch_size):
            for h in action.heads:
                start, n = store.host_starts[b][h], store.host_lengths[b][h]
                key = (self.owner.cache_id, self.index, b, h)
                if key in runtime:
                    runtime.evict(key)
                runtime.offload(key, store.kv[start : start + n])  # [n, 2, D], contiguous rows
                self.host_positions[(b, h)] = store.positions[start : start + n].clone()
                self.host_resident[(b, h)] = n

    def recall(self, action: Recall) -> None:
        """Write the recalled rows over the offloaded rows a head holds, in place; one host
        read per action, no host wait for the copy (see ``recall.py``)."""
        recall_rows(self, action)

    def offloaded_view(self, heads: Sequence[int]) -> LayerCache:
        """``Observation.offloaded``: the full KV ``heads`` held when they were offloaded,
        read back from the host store into a padded [B, H', N, D] cache (the compute stream
        waits for the copy; the host does not)."""
        self.owner.check_live()
        store = self._make_ragged()
        heads = list(heads)
        missing = [h for h in heads if any((b, h) not in self.host_positions for b in range(store.batch_size))]
        if missing:
            raise KeyError(f"layer {self.index}: heads {missing} were never offloaded")
        batch, device = store.batch_size, store.kv.device
        positions = _stack_padded([[self.host_positions[(b, h)] for h in heads] for b in range(batch)])  # [B, H', N]
        counts = [[self.host_positions[(b, h)].shape[0] for h in heads] for b in range(batch)]
        rows = torch.zeros(*positions.shape, *store.kv.shape[1:], dtype=store.kv.dtype, device=device)
        requests = [
            ((self.owner.cache_id, self.index, b, h), torch.arange(counts[b][i]), rows[b, i, : counts[b][i]])
            for b in range(batch) for i, h in enumerate(heads)
        ]  # fmt: skip
        runtime = self.owner.runtime
        runtime.wait(runtime.recall_many(requests))
        lengths = torch.tensor(counts, dtype=torch.int64, device=device)
        return LayerCache(keys=rows[..., 0, :], values=rows[..., 1, :], positions=positions, lengths=lengths,
                          starts=self.owner.starts)  # fmt: skip


class HeadwiseCache(compat.Cache):
    """A transformers Cache driven by a policy; pass it as ``past_key_values``.

    Build it through ``HFBackend.new_cache`` (which also attaches the attention function).
    """

    _next_id = 0

    def __init__(
        self,
        spec: ModelSpec,
        policy: Policy | None,
        *,
        device: torch.device,
        headroom: int = 64,
        record_window: int | None = 0,
        reuse_resident: bool = True,
    ) -> None:
        """policy: None keeps everything. headroom: spare rows per head for appends before
        a ragged layer regrows. record_window: prompt queries kept per layer so ``fork`` can
        replay the prefill for other policies (0 = none, None = all). reuse_resident: a
        Recall moves the rows a head already holds on the device and fetches only the others
        from the host (fewer PCIe bytes, a few more device ops and a transient copy of the
        recalled heads' rows); False fetches every row of a changed head from the host. Both
        land the same bytes."""
        self.spec = spec
        self.policy = policy
        self.policy_needs = policy.requirements() if policy is not None else Requirements()
        self.headroom = headroom
        self.reuse_resident = reuse_resident
        self.starts: torch.Tensor | None = None  # [B] left padding, None without
        self.prompt_length: int | None = None
        self.released = False  # release() freed everything: the cache cannot be used again
        self.recalls = 0  # Recall actions that moved bytes
        self.sequence_recalls: dict[int, int] = {}  # batch index -> recalls that changed its KV
        self.record_window = record_window
        self.query_window = _widest(self.policy_needs.query_window, record_window)
        self.recorded_queries: list[torch.Tensor | None] = [None] * spec.num_layers
        # called as observer(layer, step, query [B, H_q, 1, D], cache view, scaling) for the
        # newest query of every forward over a dense layer (profiling reads attention rows)
        self.observer: Callable[[int, int, torch.Tensor, LayerCache, float | None], None] | None = None
        HeadwiseCache._next_id += 1
        self.cache_id = HeadwiseCache._next_id
        # recall rows come from searchsorted over the offloaded positions, in range by
        # construction: no per-recall range check (it would cost a host sync)
        self.runtime = TransferRuntime(device, check_device_rows=False)
        super().__init__(layers=[HeadwiseLayer(self, i) for i in range(spec.num_layers)])

    def compress(self, layer: HeadwiseLayer, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """Run the policy's prefill on one dense layer and execute its actions."""
        if layer.index == 0:
            self.policy.reset(self.spec, queries.shape[0])
        window = self.policy_needs.query_window
        if window is not None:
            queries, positions = queries[:, :, -window:], positions[-window:]
        obs = Observation(
            phase=Phase.PREFILL, layer=layer.index, queries=queries, query_positions=positions,
            cache=layer.view(), prompt_length=self.prompt_length,
        )  # fmt: skip
        layer.apply(list(self.policy.prefill(obs)))

    def fork(self, policy: Policy | None, *, headroom: int | None = None) -> "HeadwiseCache":
        """A new cache holding this cache's prefill, compressed by ``policy``.

        Only a cache recorded with enough prompt queries (``record_window``) and not yet
        compressed can be forked; the dense K/V are copied, this cache is left as it is.
        """
        self.check_live()
        needs = policy.requirements() if policy is not None else Requirements()
        if any(layer.ragged is not None or not layer.prefilled for layer in self.layers):
            raise ValueError("only a complete, uncompressed prefill can be forked")
        if not _covers(self.record_window, needs.query_window):
            def describe(n: int | None) -> str:
                return "all" if n is None else str(n)

            raise ValueError(
                f"policy needs {describe(needs.query_window)} prompt queries; this prefill recorded "
                f"{describe(self.record_window)}"
            )
        other = HeadwiseCache(
            self.spec, policy, device=self.runtime.device, headroom=self.headroom if headroom is None else headroom,
            reuse_resident=self.reuse_resident,
        )
        other.starts, other.prompt_length = self.starts, self.prompt_length
        for mine, theirs in zip(self.layers, other.layers):
            theirs.lazy_initialization(mine.keys, mine.values)
            theirs.keys, theirs.values = mine.keys.clone(), mine.values.clone()
            theirs.seen, theirs.prefilled = mine.seen, True
        if policy is not None:
            positions = torch.arange(self.prompt_length, device=self.layers[0].keys.device)
            for layer, queries in zip(other.layers, self.recorded_queries):
                other.compress(layer, queries, positions[-queries.shape[2] :])
        return other

    def get_seq_length(self, layer_idx: int = 0, *args: Any) -> int:
        return self.layers[layer_idx].seen

    def kv_bytes_device(self) -> int:
        """Bytes of K/V this cache holds on the device now."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kv_bytes_full(self, dtype_bytes: int) -> int:
        """Bytes a full (uncompressed) cache of the same logical length would hold."""
        seen = self.layers[0].seen
        b = self.layers[0].ragged.batch_size if self.layers[0].ragged is not None else self._batch()
        return self.spec.num_layers * b * self.spec.num_kv_heads * seen * self.spec.head_dim * 2 * dtype_bytes

    def _batch(self) -> int:
        layer = self.layers[0]
        return layer.keys.shape[0] if layer.is_initialized and layer.keys is not None and layer.keys.numel() else 0

    def host_bytes(self) -> int:
        return self.runtime.host_bytes()

    def release(self) -> None:
        """Free the host copies and every layer's storage now.

        Layers point back at their cache, so a dropped cache is a reference cycle that only
        the cycle collector frees, at a time set by object counts, not bytes: a loop over
        many caches can run out of memory first. Call this when a cache is done.
        """
        for key in self.runtime_keys():
            self.runtime.evict(key)
        for layer in self.layers:
            layer.reset()
        self.recorded_queries = [None] * self.spec.num_layers
        self.released = True

    def check_live(self) -> None:
        """Raise ValueError once ``release`` has run: the KV and host copies are gone, and a
        forward would silently restart the sequence at position 0."""
        if self.released:
            raise ValueError(f"this HeadwiseCache was released (cache.release()): its KV and host copies are gone; "
                             "start a new one with backend.new_cache(policy)")  # fmt: skip

    def runtime_keys(self) -> list[tuple[int, ...]]:
        return [
            (self.cache_id, layer.index, b, h) for layer in self.layers for (b, h) in layer.host_positions
        ]


def _widest(a: int | None, b: int | None) -> int | None:
    """The larger query window (None = all prompt queries)."""
    return None if a is None or b is None else max(a, b)


def _covers(recorded: int | None, needed: int | None) -> bool:
    if recorded is None:
        return True
    return needed is not None and needed <= recorded
