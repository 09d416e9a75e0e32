"""RequestKV: one request's policy-managed KV over SGLang's token-major pools.

SGLang keeps a request's KV as a row of slot indices (``req_to_token[row, p]`` is the
slot of logical position p), and one slot holds the token for every layer and every
KV head (``k_buffer[layer][slot, head]``). A policy decides per (layer, KV head), so:

- which positions a (layer, head) attends is *visibility*: a bool mask
  ``visible [layers, H_kv, capacity]`` over logical positions. Select, Recall and the
  per-step Attend views change visibility only;
- a slot is given back to SGLang's allocator only when no (layer, head) sees its
  position any more and the radix tree does not own it (positions below
  ``protected``); its row entry then becomes 0, SGLang's padding slot, so the token
  has left the request's index map;
- a Recall of a position whose slot was freed takes a fresh slot and copies the
  recalled (layer, head) rows into it from the host store; a position whose slot
  was never freed still holds every head's bytes and only becomes visible again.
  ``original`` says which positions still have the slot the forward pass wrote;
- offload and recall go through ``hcpolicy.runtime.TransferRuntime``.

``length`` is the logical sequence length (SGLang's ``seq_lens``), never shrunk, so
positions and RoPE stay right. Host reads: a few per action (selection sizes, the range
checks, the slots to free or allocate), none in ``attend``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Hashable

import torch
import torch.nn.functional as F

from hcpolicy.actions import Action, ActionError, ActionExecutor, Attend, Offload, Recall, Select, Selection, check_address
from hcpolicy.observe import LayerCache
from hcpolicy.runtime import TransferRuntime
from hcpolicy.spec import ModelSpec


class RequestKV(ActionExecutor):
    """Executes a policy's actions for one request (batch of one, as SGLang schedules them).

    row: the request's ``req_to_token`` row (a view, int32 [max_context_len]).
    pool: SGLang's KV pool (``get_key_buffer(layer)`` -> [slots, H_kv, D]).
    allocator: SGLang's token allocator (``alloc(n)``, ``free(slots)``), page size 1.
    protected: positions [0, protected) belong to the radix tree: never freed here.
    """

    def __init__(
        self,
        *,
        key: Hashable,
        spec: ModelSpec,
        row: torch.Tensor,
        length: int,
        protected: int,
        pool: Any,
        allocator: Any,
        runtime: TransferRuntime,
    ) -> None:
        self.key = key
        self.spec = spec
        self.row = row
        self.pool = pool
        self.allocator = allocator
        self.runtime = runtime
        self.protected = protected
        self.prompt_length = length
        self.length = 0
        device = row.device
        self.visible = torch.ones(spec.num_layers, spec.num_kv_heads, 0, dtype=torch.bool, device=device)
        self.original = torch.ones(0, dtype=torch.bool, device=device)
        self.host: dict[tuple[int, int], torch.Tensor] = {}  # (layer, head) -> offloaded positions [n]
        self.attend_views: dict[tuple[int, int], torch.Tensor] = {}  # (layer, head) -> positions [n]
        self.first_altered: int | None = None  # lowest position whose slot was freed or replaced
        self.touched = False  # an action was applied: attention must honour visibility
        self.freed_slots = 0
        self.recalled_slots = 0
        self.grow(length)

    # -- length and ownership ----------------------------------------------------------------
    def grow(self, length: int) -> None:
        """The sequence now has ``length`` positions; new ones are visible to every head."""
        if length <= self.visible.shape[2]:
            self.length = max(self.length, length)
            return
        capacity = max(length, 2 * self.visible.shape[2], 64)
        extra = capacity - self.visible.shape[2]
        self.visible = torch.cat([self.visible, self.visible.new_ones(*self.visible.shape[:2], extra)], dim=2)
        self.original = torch.cat([self.original, self.original.new_ones(extra)])
        self.length = length

    def protect(self, length: int) -> None:
        """The radix tree now owns positions [0, length) (after a checkpoint)."""
        self.protected = max(self.protected, length)

    def intact_length(self) -> int:
        """Positions [0, n) whose slots are the forward pass's own: what the tree may take."""
        return self.length if self.first_altered is None else self.first_altered

    # -- executing actions ---------------------------------------------------------------------
    def apply(self, actions: Iterable[Action]) -> None:
        actions = list(actions)
        super().apply(actions)
        self.touched = self.touched or bool(actions)

    def check(self, action: Action) -> None:
        check_address(action, self.spec.num_layers, self.spec.num_kv_heads)
        selection = getattr(action, "selection", None)
        if selection is not None and selection.indices.shape[0] != 1:
            raise ActionError(f"SGLang requests are sequences of their own: batch 1, got {selection.indices.shape[0]}")

    def select(self, action: Select) -> None:
        for i, h in enumerate(action.heads):
            want = self._positions(action.selection, i, action)
            self._require_visible(action.layer, h, want, "Select")
            mask = torch.zeros_like(self.visible[action.layer, h])
            mask[want] = True
            mask[self.length :] = True  # positions not written yet arrive visible
            self.visible[action.layer, h] = mask
        self._free_dead()

    def offload(self, action: Offload) -> None:
        k_buf, v_buf = self._buffers(action.layer)
        for h in action.heads:
            positions = torch.nonzero(self.visible[action.layer, h, : self.prompt_length]).flatten()  # [n]
            slots = self.row[positions].long()
            kv = torch.stack([k_buf[slots, h], v_buf[slots, h]], dim=1)  # [n, 2, D]
            key = self._host_key(action.layer, h)
            if key in self.runtime:
                self.runtime.evict(key)
            self.runtime.offload(key, kv)
            self.host[(action.layer, h)] = positions

    def recall(self, action: Recall) -> None:
        layer = action.layer
        wanted: dict[int, torch.Tensor] = {}
        for i, h in enumerate(action.heads):
            host = self.host.get((layer, h))
            if host is None:
                raise ActionError(f"layer {layer} head {h}: Recall without an earlier Offload")
            want = self._positions(action.selection, i, action)
            if not bool(torch.isin(want, host).all()):
                raise ActionError(f"layer {layer} head {h}: Recall names positions that were never offloaded")
            wanted[h] = want
        self._take_slots(torch.cat(list(wanted.values())))
        k_buf, v_buf = self._buffers(layer)
        for h, want in wanted.items():
            host = self.host[(layer, h)]
            keep = self.visible[layer, h].clone()
            keep[host] = False  # the offloaded range is replaced; later tokens stay
            keep[want] = True
            self.visible[layer, h] = keep
            stale = want[~self.original[want]]  # fresh slots: this head's bytes come from the host
            if stale.numel():
                rows = torch.searchsorted(host, stale)
                out = torch.empty(stale.numel(), 2, k_buf.shape[-1], dtype=k_buf.dtype, device=k_buf.device)
                self.runtime.wait(self.runtime.recall(self._host_key(layer, h), rows, out))
                slots = self.row[stale].long()
                k_buf[slots, h] = out[:, 0]
                v_buf[slots, h] = out[:, 1]
        self._free_dead()

    def attend_view(self, action: Attend) -> None:
        for i, h in enumerate(action.heads):
            want = self._positions(action.selection, i, action)
            if want.numel() == 0:
                raise ActionError(f"layer {action.layer} head {h}: an Attend view must keep a token")
            self._require_visible(action.layer, h, want, "Attend")
            self.attend_views[(action.layer, h)] = want

    # -- reading -------------------------------------------------------------------------------------
    def view(self, layer: int, heads: list[int] | None = None) -> LayerCache:
        """The visible KV of one layer as a padded LayerCache: keys/values [1, H', L, D]."""
        heads = list(range(self.spec.num_kv_heads)) if heads is None else heads
        visible = self.visible[layer, heads, : self.length]  # [H', L]
        k_buf, v_buf = self._buffers(layer)
        slots = self.row[: self.length].long()
        # stable sort puts each head's visible positions first, in ascending order
        order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices  # [H', L]
        lengths = visible.sum(-1)  # [H']
        head_index = torch.tensor(heads, device=slots.device).unsqueeze(-1)  # [H', 1]
        keys = k_buf[slots[order], head_index]  # [H', L, D]
        values = v_buf[slots[order], head_index]
        return LayerCache(keys=keys[None], positions=order[None], lengths=lengths[None], values=values[None])

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of this request's newest ``Q`` tokens at ``layer`` over what each KV
        head sees (and this step's Attend views, then cleared). query: [Q, H_q, D] -> [Q, H_q, D]."""
        q_len, h_q, _ = query.shape
        k_buf, v_buf = self._buffers(layer)
        slots = self.row[: self.length].long()  # freed positions read slot 0, masked below
        keys = k_buf[slots].transpose(0, 1)  # [H_kv, L, D]
        values = v_buf[slots].transpose(0, 1)
        positions = torch.arange(self.length, device=slots.device)
        query_positions = positions[self.length - q_len :]
        allowed = self.visible[layer, :, : self.length].unsqueeze(1) & (positions <= query_positions.unsqueeze(-1))
        for h in range(self.spec.num_kv_heads):  # [H_kv, Q, L] above
            view = self.attend_views.pop((layer, h), None)
            if view is not None:
                member = torch.zeros(self.length, dtype=torch.bool, device=slots.device)
                member[view] = True
                allowed[h] &= member
        mask = allowed.repeat_interleave(h_q // self.spec.num_kv_heads, dim=0)  # [H_q, Q, L]
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1)[None], keys[None].to(query.dtype), values[None].to(query.dtype),
            attn_mask=mask[None], scale=scaling if scaling is not None else 1 / math.sqrt(query.shape[-1]),
            enable_gqa=True,
        )  # fmt: skip
        return out[0].transpose(0, 1)  # [Q, H_q, D]

    def device_slots(self) -> int:
        """Slots of this request's row that are live (for reports)."""
        return int((self.row[: self.length] != 0).sum())

    def visible_tokens(self) -> int:
        """Tokens summed over (layer, head): what the policy kept, as visibility."""
        return int(self.visible[:, :, : self.length].sum())

    def release(self) -> None:
        """Drop this request's host copies (its slots go back through the radix cache)."""
        for layer, head in list(self.host):
            key = self._host_key(layer, head)
            if key in self.runtime:
                self.runtime.evict(key)
        self.host.clear()
        self.attend_views.clear()

    # -- internals -----------------------------------------------------------------------------
    def _buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.get_key_buffer(layer), self.pool.get_value_buffer(layer)

    def _host_key(self, layer: int, head: int) -> tuple:
        return (self.key, layer, head)

    def _positions(self, selection: Selection, i: int, action: Action) -> torch.Tensor:
        n = int(selection.lengths[0, i])
        want = selection.indices[0, i, :n].to(self.row.device)
        if n and (int(want.min()) < 0 or int(want.max()) >= self.length):
            raise ActionError(f"{type(action).__name__} names positions outside [0, {self.length})")
        if n > 1 and not bool((want[1:] > want[:-1]).all()):
            raise ActionError(f"{type(action).__name__} positions must be strictly ascending")
        return want

    def _require_visible(self, layer: int, head: int, want: torch.Tensor, what: str) -> None:
        if not bool(self.visible[layer, head, want].all()):
            raise ActionError(f"layer {layer} head {head}: {what} names positions that are not on the device")

    def _free_dead(self) -> None:
        """Give back the slots of positions no (layer, head) sees, above the tree's part."""
        n = self.length
        live = self.row[:n] != 0
        dead = ~self.visible[:, :, :n].any(dim=1).any(dim=0) & live  # [L]
        dead[: self.protected] = False
        positions = torch.nonzero(dead).flatten()
        if positions.numel() == 0:
            return
        self.allocator.free(self.row[positions].long())
        self.row[positions] = 0
        self.original[positions] = False
        self.freed_slots += positions.numel()
        self._altered_at(int(positions[0]))

    def _take_slots(self, wanted: torch.Tensor) -> None:
        """Fresh slots for wanted positions whose slot was freed."""
        missing = torch.unique(wanted[self.row[wanted] == 0])
        if missing.numel() == 0:
            return
        slots = self.allocator.alloc(missing.numel())
        if slots is None:
            raise RuntimeError(
                f"hcpolicy: no free KV slots for a recall of {missing.numel()} tokens "
                f"({self.allocator.available_size()} free); lower --mem-fraction-static or the batch"
            )
        self.row[missing] = slots.to(self.row.dtype)
        self.recalled_slots += missing.numel()
        self._altered_at(int(missing[0]))

    def _altered_at(self, position: int) -> None:
        self.first_altered = position if self.first_altered is None else min(self.first_altered, position)

