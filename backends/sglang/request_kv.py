"""RequestKV: one request's policy-managed KV in SGLang, token-major while its prompt is
computed, head-major once its policy has acted.

SGLang keeps a request's KV as a row of slot indices (``req_to_token[row, p]`` is the
slot of logical position p), and one slot holds the token for every layer and every
KV head (``k_buffer[layer][slot, head]``). A policy decides per (layer, KV head), so:

- while the prompt is computed (prefill), the policy sees the row's KV and what it keeps
  is *visibility*: a bool mask ``visible [layers, H_kv, capacity]`` over positions.
  Select and Recall change visibility; Offload copies a head's rows to the host through
  ``hcpolicy.runtime``. No slot is freed yet;
- at the end of the prefill (``finalize``), a request whose policy acted moves to
  ``HeadPages``: each (layer, KV head) keeps exactly its visible rows, packed into pages
  of SGLang's own pool (the request's prompt pages are reused in place, layer by layer),
  and every page no layer needs goes back to SGLang's allocator. The row's entries past
  the radix tree's part (``protected``) become 0, SGLang's padding slot: the tokens have
  left the request's index map. Decode steps then attend through the paged kernel, and
  later actions move a head's rows between pages and the host;
- a request whose policy never acts stays token-major: SGLang's own path and kernels.

``length`` is the logical sequence length (SGLang's ``seq_lens``), never shrunk, so
positions and RoPE stay right.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Hashable

import numpy as np
import torch
import torch.nn.functional as F

from hcpolicy.actions import Action, ActionError, ActionExecutor, Attend, Offload, Recall, Select, Selection, check_address
from hcpolicy.observe import LayerCache
from hcpolicy.runtime import TransferRuntime
from hcpolicy.spec import ModelSpec

from .head_pages import HeadPages


class RequestKV(ActionExecutor):
    """Executes a policy's actions for one request (batch of one, as SGLang schedules them).

    row: the request's ``req_to_token`` row (a view, int32 [max_context_len]).
    pool: SGLang's KV pool (``get_key_buffer(layer)`` -> [slots, H_kv, D]).
    allocator: SGLang's token allocator (``alloc(n)``, ``free(slots)``), pages of ``page_size``.
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
        page_size: int = 1,
        on_freed: Callable[[int], None] | None = None,
    ) -> None:
        self.key = key
        self.spec = spec
        self.row = row
        self.pool = pool
        self.allocator = allocator
        self.runtime = runtime
        self.page_size = page_size
        self.on_freed = on_freed  # told how many slots went back to SGLang (its scheduler may admit more)
        self.protected = protected
        self.prompt_length = length
        self.length = 0
        device = row.device
        self.visible = torch.ones(spec.num_layers, spec.num_kv_heads, 0, dtype=torch.bool, device=device)
        self.host: dict[tuple[int, int], torch.Tensor] = {}  # (layer, head) -> offloaded positions [n]
        self.host_whole: dict[tuple[int, int], bool] = {}  # (layer, head) -> the host holds its whole prompt
        self.attend_views: dict[tuple[int, int], torch.Tensor] = {}  # (layer, head) -> positions [n]
        self.pages: HeadPages | None = None  # head-major storage, after ``finalize``
        self.touched = False  # an action was applied: the request leaves SGLang's own path
        self.freed_slots = 0  # prompt slots given back to SGLang at ``finalize``
        self.moves = 0  # head-major heads rebuilt by actions (their page tables changed)
        self.grow(length)

    @property
    def head_major(self) -> bool:
        return self.pages is not None

    # -- length and ownership ----------------------------------------------------------------
    def grow(self, length: int) -> None:
        """The sequence now has ``length`` positions; new ones are visible to every head."""
        self.length = max(self.length, length)
        if self.head_major or length <= self.visible.shape[2]:
            return
        capacity = max(length, 2 * self.visible.shape[2], 64)
        extra = capacity - self.visible.shape[2]
        self.visible = torch.cat([self.visible, self.visible.new_ones(*self.visible.shape[:2], extra)], dim=2)

    def protect(self, length: int) -> None:
        """The radix tree now owns positions [0, length) (after a checkpoint)."""
        self.protected = max(self.protected, length)

    def intact_length(self) -> int:
        """Positions [0, n) whose slots are the forward pass's own: what the tree may take."""
        return self.protected if self.head_major else self.length

    # -- head-major ------------------------------------------------------------------------------
    def finalize(self) -> None:
        """Move to head-major pages (see the module docstring); a no-op unless the policy acted."""
        if self.head_major or not self.touched:
            return
        n, p, h_kv = self.length, self.page_size, self.spec.num_kv_heads
        slots = self.row[:n].long()
        own = torch.unique(slots[self.protected :] // p).cpu().numpy()
        pages = HeadPages(num_layers=self.spec.num_layers, num_kv_heads=h_kv, pool=self.pool,
                          allocator=self.allocator, page_size=p)  # fmt: skip
        pages.adopt(own[own != 0])
        for layer in range(self.spec.num_layers):
            visible = self.visible[layer, :, :n]  # [H, n]
            counts = visible.sum(-1).tolist()  # one host read per layer
            head, position = torch.nonzero(visible, as_tuple=True)  # head-major, positions ascending
            k_rows, v_rows = pages.rows(layer)
            source = slots[position] * h_kv + head
            k, v = k_rows[source], v_rows[source]  # every read of the layer before any write
            for h, (k_h, v_h, pos_h) in enumerate(zip(k.split(counts), v.split(counts), position.split(counts))):
                in_prompt = len(pos_h) if n == self.prompt_length else int((pos_h < self.prompt_length).sum())
                pages.rebuild(layer, h, k_h, v_h, pos_h, n, in_prompt)
        self.row[self.protected : n] = 0
        self.pages = pages
        self.freed_slots = pages.return_unused() * p
        self._freed(self.freed_slots)
        self.visible = self.visible[:, :, :0]

    def decode_step(self, length: int, slot: int) -> np.ndarray:
        """A decode step of a head-major request: the sequence now has ``length`` positions
        and SGLang gave position length - 1 the slot ``slot`` (already zeroed in the row by
        the caller). A fresh page becomes the request's; returns the rows [N, H] (host) of
        the new token's K/V (``HeadPages.plan_append``)."""
        assert self.pages is not None
        self.length = length
        page = slot // self.page_size
        fresh = page != 0 and slot % self.page_size == 0
        if fresh:
            self.pages.adopt(np.array([page]))
        rows = self.pages.plan_append()
        if fresh:  # only the adopted page can have become idle: pages a step takes are used
            self._freed(self.pages.return_if_idle(page) * self.page_size)
        return rows

    def device_tokens(self) -> int:
        """Rows held on the device, summed over (layer, head)."""
        if self.head_major:
            return self.pages.kept_entries()
        return int(self.visible[:, :, : self.length].sum())

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
            if self.head_major:
                held = self.pages.positions(action.layer, h, self.length)
                index = self._index_in(held, want, action.layer, h, "Select")
                k, v = self.pages.read(action.layer, h)
                in_prompt = int((want < self.prompt_length).sum())
                self.pages.rebuild(action.layer, h, k[index], v[index], want, self.length, in_prompt)
                self.moves += 1
                continue
            self._require_visible(action.layer, h, want, "Select")
            mask = torch.zeros_like(self.visible[action.layer, h])
            mask[want] = True
            mask[self.length :] = True  # positions not written yet arrive visible
            self.visible[action.layer, h] = mask
        if self.head_major:
            self._freed(self.pages.return_unused() * self.page_size)

    def offload(self, action: Offload) -> None:
        for h in action.heads:
            positions, k, v = self._held_prompt(action.layer, h)
            key = self._host_key(action.layer, h)
            if key in self.runtime:
                self.runtime.evict(key)
            self.runtime.offload(key, torch.stack([k, v], dim=1))  # [n, 2, D]
            self.host[(action.layer, h)] = positions
            self.host_whole[(action.layer, h)] = positions.numel() == self.prompt_length  # host rows = positions

    def recall(self, action: Recall) -> None:
        layer = action.layer
        if self.head_major and all(self.host_whole.get((layer, h), False) for h in action.heads):
            self._recall_prompts(action)
            return
        for i, h in enumerate(action.heads):
            host = self.host.get((layer, h))
            if host is None:
                raise ActionError(f"layer {layer} head {h}: Recall without an earlier Offload")
            want = self._positions(action.selection, i, action)
            if not bool(torch.isin(want, host).all()):
                raise ActionError(f"layer {layer} head {h}: Recall names positions that were never offloaded")
            if not self.head_major:  # nothing was freed yet: every position's bytes are in its slot
                keep = self.visible[layer, h].clone()
                keep[host] = False  # the offloaded range is replaced; later tokens stay
                keep[want] = True
                self.visible[layer, h] = keep
                continue
            held = self.pages.positions(layer, h, self.length)
            keep = ~torch.isin(held, host)  # the offloaded range is replaced; later tokens stay
            k_held, v_held = self.pages.read(layer, h)
            stay, k_stay, v_stay = held[keep], k_held[keep], v_held[keep]
            out = torch.empty(want.numel(), 2, k_held.shape[-1], dtype=k_held.dtype, device=k_held.device)
            rows = torch.searchsorted(host, want)
            self.runtime.wait(self.runtime.recall(self._host_key(layer, h), rows, out))
            positions, order = torch.sort(torch.cat([stay, want]))
            k = torch.cat([k_stay, out[:, 0]])[order]
            v = torch.cat([v_stay, out[:, 1]])[order]
            self.pages.rebuild(layer, h, k, v, positions, self.length, int((positions < self.prompt_length).sum()))
            self.moves += 1
        if self.head_major:
            self._freed(self.pages.return_unused() * self.page_size)

    def _recall_prompts(self, action: Recall) -> None:
        """A Recall of heads whose whole prompt is on the host (HeteroCache's satellites):
        the named prompt positions replace each head's prompt entries and its decode tokens
        stay. Batched over the heads: one host read of the positions (checked there), one
        transfer, one write (``HeadPages.replace_prompt``)."""
        layer, heads, selection = action.layer, list(action.heads), action.selection
        counts = (selection.host_lengths if selection.host_lengths is not None else selection.lengths.cpu())[0].tolist()
        wants = [selection.indices[0, i, : int(n)] for i, n in enumerate(counts)]
        host = torch.cat(wants).cpu() if wants else torch.zeros(0, dtype=torch.int64)  # the rows of the host copies
        for h, want in zip(heads, host.split([int(n) for n in counts])):
            if want.numel() and (int(want.min()) < 0 or int(want.max()) >= self.prompt_length):
                raise ActionError(f"layer {layer} head {h}: Recall names positions that were never offloaded")
            if want.numel() > 1 and not bool((want[1:] > want[:-1]).all()):
                raise ActionError("Recall positions must be strictly ascending")
        kv = self.pages.rows(layer)[0]
        out = torch.empty(host.numel(), 2, kv.shape[-1], dtype=kv.dtype, device=kv.device)
        parts = out.split([int(n) for n in counts])
        rows = host.split([int(n) for n in counts])
        self.runtime.wait(self.runtime.recall_many([(self._host_key(layer, h), r, o) for h, r, o in zip(heads, rows, parts)]))
        self.pages.replace_prompt(layer, heads, list(parts), wants, self.length)
        self.moves += len(heads)
        self._freed(self.pages.return_unused() * self.page_size)

    def attend_view(self, action: Attend) -> None:
        for i, h in enumerate(action.heads):
            want = self._positions(action.selection, i, action)
            if want.numel() == 0:
                raise ActionError(f"layer {action.layer} head {h}: an Attend view must keep a token")
            if self.head_major:
                self._index_in(self.pages.positions(action.layer, h, self.length), want, action.layer, h, "Attend")
            else:
                self._require_visible(action.layer, h, want, "Attend")
            self.attend_views[(action.layer, h)] = want

    # -- reading -------------------------------------------------------------------------------------
    def view(self, layer: int, heads: list[int] | None = None) -> LayerCache:
        """The KV one layer keeps on the device as a padded LayerCache: keys/values [1, H', L, D]."""
        heads = list(range(self.spec.num_kv_heads)) if heads is None else heads
        if self.head_major:
            parts = [(self.pages.positions(layer, h, self.length), *self.pages.read(layer, h)) for h in heads]
            width = max(1, max(pos.numel() for pos, _, _ in parts))
            pad = lambda t: F.pad(t, (0, 0, 0, width - t.shape[0]))  # noqa: E731
            keys = torch.stack([pad(k) for _, k, _ in parts])
            values = torch.stack([pad(v) for _, _, v in parts])
            positions = torch.stack([F.pad(pos, (0, width - pos.numel())) for pos, _, _ in parts])
            lengths = torch.tensor([pos.numel() for pos, _, _ in parts], device=keys.device)
            return LayerCache(keys=keys[None], positions=positions[None], lengths=lengths[None], values=values[None])
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
        head keeps (and this step's Attend views, then cleared), gathered: the reference the
        paged kernel is tested against, and the path of a step with Attend views.
        query: [Q, H_q, D] -> [Q, H_q, D]."""
        q_len, h_q, _ = query.shape
        h_kv = self.spec.num_kv_heads
        cache = self.view(layer)
        keys, values = cache.keys[0], cache.values[0]  # [H_kv, W, D]
        positions = cache.positions[0]
        width = positions.shape[-1]
        valid = torch.arange(width, device=keys.device) < cache.lengths[0].unsqueeze(-1)  # [H_kv, W]
        query_positions = torch.arange(self.length - q_len, self.length, device=keys.device)
        allowed = valid.unsqueeze(1) & (positions.unsqueeze(1) <= query_positions.view(1, -1, 1))  # [H_kv, Q, W]
        for h in range(h_kv):
            view = self.attend_views.pop((layer, h), None)
            if view is not None:
                allowed[h] &= torch.isin(positions[h], view).unsqueeze(0)
        mask = allowed.repeat_interleave(h_q // h_kv, dim=0)  # [H_q, Q, W]
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1)[None], keys[None].to(query.dtype), values[None].to(query.dtype),
            attn_mask=mask[None], scale=scaling if scaling is not None else 1 / math.sqrt(query.shape[-1]),
            enable_gqa=True,
        )  # fmt: skip
        return out[0].transpose(0, 1)  # [Q, H_q, D]

    def has_views(self, layer: int) -> bool:
        return any(key[0] == layer for key in self.attend_views)

    def release(self) -> None:
        """Drop this request's host copies and give its head-major pages back (its row's
        slots go back through the radix cache)."""
        for layer, head in list(self.host):
            key = self._host_key(layer, head)
            if key in self.runtime:
                self.runtime.evict(key)
        self.host.clear()
        self.attend_views.clear()
        if self.pages is not None:
            self.pages.release()

    # -- internals -----------------------------------------------------------------------------
    def _freed(self, slots: int) -> None:
        if slots and self.on_freed is not None:
            self.on_freed(slots)

    def _buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.get_key_buffer(layer), self.pool.get_value_buffer(layer)

    def _host_key(self, layer: int, head: int) -> tuple:
        return (self.key, layer, head)

    def _held_prompt(self, layer: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions below the prompt's end that head (layer, h) keeps, with their K and V [n, D]."""
        if self.head_major:
            held = self.pages.positions(layer, h, self.length)
            k, v = self.pages.read(layer, h)
            prompt = held < self.prompt_length
            return held[prompt], k[prompt], v[prompt]
        positions = torch.nonzero(self.visible[layer, h, : self.prompt_length]).flatten()  # [n]
        k_buf, v_buf = self._buffers(layer)
        slots = self.row[positions].long()
        return positions, k_buf[slots, h], v_buf[slots, h]

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

    @staticmethod
    def _index_in(held: torch.Tensor, want: torch.Tensor, layer: int, head: int, what: str) -> torch.Tensor:
        """Entries of ``held`` (ascending) at positions ``want``; an ActionError if one is not held."""
        index = torch.searchsorted(held, want).clamp(max=max(held.numel() - 1, 0))
        if want.numel() and (held.numel() == 0 or not bool((held[index] == want).all())):
            raise ActionError(f"layer {layer} head {head}: {what} names positions that are not on the device")
        return index
