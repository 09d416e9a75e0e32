"""A plain-tensor executor of cache actions: the semantics every backend must reproduce.

Slow and simple on purpose (Python lists per sequence and head). Tests run every policy
through it, and backends are checked against it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from hcpolicy.actions import Action, ActionError, ActionExecutor, Attend, Offload, Recall, Select, Selection, check_address
from hcpolicy.observe import LayerCache, Observation, Phase

if TYPE_CHECKING:
    from hcpolicy.policy.base import Policy
    from hcpolicy.spec import ModelSpec


class _Head:
    """One (sequence, KV head): device tokens by position, and the host copy if offloaded."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # keys, values: [L, D]
        self.device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
            p: (keys[p], values[p]) for p in range(keys.shape[0])
        }
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


class ReferenceCache(ActionExecutor):
    """Per layer, per (sequence, KV head) token store that executes actions.

    keys, values: one [B, H_kv, L, D] tensor per layer (the prompt's KV).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.batch_size, self.num_kv_heads, self.length, self.head_dim = keys[0].shape
        self.layers = [
            [[_Head(k[b, h], v[b, h]) for h in range(self.num_kv_heads)] for b in range(self.batch_size)]
            for k, v in zip(keys, values)
        ]
        self._attend: dict[tuple[int, int], Selection] = {}
        self.recalls = 0

    # -- executing actions ----------------------------------------------------------------
    def check(self, action: Action) -> None:
        check_address(action, len(self.layers), self.num_kv_heads)

    def offload(self, a: Offload) -> None:
        for row in self.layers[a.layer]:
            for h in a.heads:
                row[h].host = dict(row[h].device)

    def select(self, a: Select) -> None:
        self._check_batch(a.selection)
        for b, per_head in enumerate(a.selection.as_lists()):
            for h, positions in zip(a.heads, per_head):
                head = self.layers[a.layer][b][h]
                _check_ascending(positions, a)
                missing = [p for p in positions if p not in head.device]
                if missing:
                    raise ActionError(f"{a.layer=} head {h} seq {b}: positions {missing[:5]} are not on the device")
                head.device = {p: head.device[p] for p in positions}

    def recall(self, a: Recall) -> None:
        self._check_batch(a.selection)
        self.recalls += 1
        for b, per_head in enumerate(a.selection.as_lists()):
            for h, positions in zip(a.heads, per_head):
                head = self.layers[a.layer][b][h]
                if head.host is None:
                    raise ActionError(f"{a.layer=} head {h}: recall without an earlier offload")
                _check_ascending(positions, a)
                missing = [p for p in positions if p not in head.host]
                if missing:
                    raise ActionError(f"{a.layer=} head {h} seq {b}: positions {missing[:5]} were never offloaded")
                kept = {p: kv for p, kv in head.device.items() if p not in head.host}
                kept.update({p: head.host[p] for p in positions})
                head.device = dict(sorted(kept.items()))

    def attend_view(self, a: Attend) -> None:
        # checked here, not in attend(), so a bad view fails as an ActionError when applied
        self._check_batch(a.selection)
        for b, per_head in enumerate(a.selection.as_lists()):
            for h, positions in zip(a.heads, per_head):
                _check_ascending(positions, a)
                if not positions:
                    raise ActionError(f"{a.layer=} head {h} seq {b}: an Attend view must keep a token")
                missing = [p for p in positions if p not in self.layers[a.layer][b][h].device]
                if missing:
                    raise ActionError(f"{a.layer=} head {h} seq {b}: positions {missing[:5]} are not on the device")
        for i, h in enumerate(a.heads):
            self._attend[(a.layer, h)] = a.selection.head(i)

    def _check_batch(self, selection: Selection) -> None:
        if selection.indices.shape[0] != self.batch_size:
            raise ActionError(f"selection has batch {selection.indices.shape[0]}, cache has {self.batch_size}")

    # -- decode -------------------------------------------------------------------------------
    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        """Add one generated token to every head. keys, values: [B, H_kv, D]."""
        for b, row in enumerate(self.layers[layer]):
            for h, head in enumerate(row):
                head.device[position] = (keys[b, h], values[b, h])

    def view(self, layer: int) -> LayerCache:
        """The device tokens of one layer, padded: keys/values [B, H_kv, L_max, D]."""
        rows = self.layers[layer]
        l_max = max(len(head.device) for row in rows for head in row)
        keys = torch.zeros(self.batch_size, self.num_kv_heads, l_max, self.head_dim)
        values = torch.zeros_like(keys)
        positions = torch.zeros(self.batch_size, self.num_kv_heads, l_max, dtype=torch.int64)
        lengths = torch.zeros(self.batch_size, self.num_kv_heads, dtype=torch.int64)
        for b, row in enumerate(rows):
            for h, head in enumerate(row):
                n = lengths[b, h] = len(head.device)
                if n:
                    tokens = sorted(head.device.items())
                    positions[b, h, :n] = torch.tensor([p for p, _ in tokens])
                    keys[b, h, :n] = torch.stack([k for _, (k, _) in tokens])
                    values[b, h, :n] = torch.stack([v for _, (_, v) in tokens])
        return LayerCache(keys=keys, positions=positions, lengths=lengths, values=values)

    def attend(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """Attention output of one decode query over the device tokens (honouring Attend
        views for this step, which are then cleared). queries: [B, H_q, D] -> [B, H_q, D]."""
        b_size, h_q, d = queries.shape
        g = h_q // self.num_kv_heads
        out = torch.zeros(b_size, h_q, d, dtype=torch.float64)
        for b, row in enumerate(self.layers[layer]):
            for h, head in enumerate(row):
                tokens = head.device
                view = self._attend.get((layer, h))
                if view is not None:
                    allowed = view.as_lists()[b][0]
                    tokens = {p: tokens[p] for p in allowed}
                k = torch.stack([kv[0] for kv in tokens.values()]).double()  # [L, D]
                v = torch.stack([kv[1] for kv in tokens.values()]).double()
                q = queries[b, h * g : (h + 1) * g].double()  # [G, D]
                w = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
                out[b, h * g : (h + 1) * g] = w @ v
        self._attend = {key: s for key, s in self._attend.items() if key[0] != layer}
        return out

    def device_tokens(self) -> int:
        return sum(len(head.device) for layer in self.layers for row in layer for head in row)

    def host_tokens(self) -> int:
        return sum(len(head.host or ()) for layer in self.layers for row in layer for head in row)


def _check_ascending(positions: list[int], action: Action) -> None:
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ActionError(f"{type(action).__name__} positions must be strictly ascending: {positions[:8]}...")


def simulate(
    policy: "Policy",
    spec: "ModelSpec",
    *,
    batch_size: int = 1,
    prompt_length: int = 64,
    decode_steps: int = 8,
    seed: int = 0,
) -> tuple[ReferenceCache, list[list[Action]], list[torch.Tensor]]:
    """Run ``policy`` over random Q/K/V through a ReferenceCache, layer by layer.

    Returns the cache, the actions of every call (prefill per layer, then decode per step
    per layer) and the attention outputs of every decode step ([B, H_q, D] per layer/step).
    """
    gen = torch.Generator().manual_seed(seed)
    b, h_q, h_kv, d = batch_size, spec.num_query_heads, spec.num_kv_heads, spec.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    keys = [randn(b, h_kv, prompt_length, d) for _ in range(spec.num_layers)]
    values = [randn(b, h_kv, prompt_length, d) for _ in range(spec.num_layers)]
    prompt_queries = [randn(b, h_q, prompt_length, d) for _ in range(spec.num_layers)]
    cache = ReferenceCache(keys, values)
    needs = policy.requirements()
    window = prompt_length if needs.query_window is None else min(needs.query_window, prompt_length)
    policy.reset(spec, b)
    log: list[list[Action]] = []
    for layer in range(spec.num_layers):
        obs = Observation(
            phase=Phase.PREFILL,
            layer=layer,
            queries=prompt_queries[layer][:, :, prompt_length - window :],
            query_positions=torch.arange(prompt_length - window, prompt_length),
            cache=LayerCache.dense(keys[layer], values[layer]),
            prompt_length=prompt_length,
        )
        actions = list(policy.prefill(obs))
        cache.apply(actions)
        log.append(actions)
    outputs = []
    for step in range(decode_steps):
        position = prompt_length + step
        for layer in range(spec.num_layers):
            cache.append(layer, randn(b, h_kv, d), randn(b, h_kv, d), position)
            q = randn(b, h_q, d)
            if needs.decode_observations:
                obs = Observation(
                    phase=Phase.DECODE,
                    layer=layer,
                    queries=q.unsqueeze(2),
                    query_positions=torch.tensor([position]),
                    cache=cache.view(layer),
                    prompt_length=prompt_length,
                    step=step,
                )
                actions = list(policy.decode(obs))
                cache.apply(actions)
                log.append(actions)
            outputs.append(cache.attend(layer, q))
    return cache, log, outputs
