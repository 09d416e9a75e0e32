"""HeteroCache (arXiv 2601.13684): head roles from a profile, inverse-stability budgets,
satellites offloaded to the host and recalled when their pivot's attention drifts.

``faithful=True`` reproduces the reference code's choices; the default improves on three
of them (each measured against the faithful mode):
- offload: only satellite heads go to the host, not every head of their layer;
- recall: satellite i takes its pivot's top-l_i tokens by score, not the first l_i of the
  position-sorted top-max(l) candidates;
- trigger: each sequence of a batch decides on its own, not on the batch-averaged overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from hcpolicy._validate import fraction, positive
from hcpolicy.actions import Action, Offload, Recall, Select, Selection
from hcpolicy.budget import InverseStabilityAllocator, sequence_budgets
from hcpolicy.capabilities import Requirements
from hcpolicy.drift import DriftTrigger, WindowedOverlap
from hcpolicy.observe import LayerCache, Observation
from hcpolicy.policy.base import Policy
from hcpolicy.profile import HeadProfile, Role
from hcpolicy.scores import Reduce, attention_weights, group_reduce, pool1d, topk_selection, topk_sets
from hcpolicy.spec import ModelSpec


@attrs.define(kw_only=True)
class HeteroCachePolicy(Policy):
    """HeteroCache: role-aware budgets, host offload of satellites, drift-triggered recall."""

    profile: HeadProfile
    compression: float = attrs.field(default=0.5, validator=fraction)
    trigger: DriftTrigger | None = None  # None: WindowedOverlap(W=5, tau=0.5), batch-averaged if faithful
    pool_kernel: int = attrs.field(default=5, validator=positive)
    gqa: Reduce = attrs.field(default="max", validator=attrs.validators.in_(("mean", "max", "sum")))
    monitor_k: int | None = attrs.field(default=None)
    faithful: bool = False
    _allocator: InverseStabilityAllocator = attrs.field(init=False, repr=False)
    _spec: ModelSpec | None = attrs.field(default=None, init=False, repr=False)
    _satellite_sets: dict = attrs.field(factory=dict, init=False, repr=False)
    _budgets: dict = attrs.field(factory=dict, init=False, repr=False)
    _monitor_k: int = attrs.field(default=1, init=False, repr=False)
    _pending: dict = attrs.field(factory=dict, init=False, repr=False)
    _widths: dict = attrs.field(factory=dict, init=False, repr=False)
    recalls: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.monitor_k is not None and self.monitor_k < 1:
            raise ValueError(f"monitor_k must be >= 1 or None, got {self.monitor_k}")
        self._allocator = InverseStabilityAllocator(self.profile)
        # fail at construction, not mid-prefill, when C is below what the full heads hold
        self._allocator.base(self.compression, 1)
        if self.trigger is None:
            self.trigger = WindowedOverlap(per_sequence=not self.faithful)

    @classmethod
    def from_profile_path(cls, path: str, **options: object) -> "HeteroCachePolicy":
        return cls(profile=HeadProfile.load(path), **options)

    def requirements(self) -> Requirements:
        """The trigger decides every ``period`` steps (``decode`` buffers until then, so
        batched observations of ``period`` queries act the same); without a period the
        policy never acts while decoding and needs no decode observations."""
        period = self.trigger.period
        return Requirements(
            actions={Select, Offload, Recall}, per_head_lengths=True, query_window=1,
            decode_observations=period is not None, decode_period=period or 1,
        )  # fmt: skip

    def reset(self, spec: ModelSpec, batch_size: int) -> None:
        self.profile.check(spec)
        self._spec = spec
        self._satellite_sets.clear()
        self._budgets.clear()
        self._pending.clear()
        self._widths.clear()
        self.trigger.reset()
        self.recalls = 0

    # -- prefill ------------------------------------------------------------------------------
    def prefill(self, obs: Observation) -> Sequence[Action]:
        spec = self._require_reset(self._spec)
        layer, length = obs.layer, obs.prompt_length
        scores = self._last_token_scores(obs.queries[:, :, -1:], obs.query_positions[-1:], obs.cache)  # [B, H_kv, L]
        budgets = sequence_budgets(
            self._allocator, spec, layer, self.compression, length, scores, obs.cache.starts
        )  # [B, H_kv]
        self._monitor_k = self.monitor_k or max(1, min(length, round(self._allocator.base(self.compression, length))))
        roles = self.profile.roles[layer]
        compressed = [h for h, r in enumerate(roles) if not r.full]
        satellites = self.profile.heads(layer, Role.SATELLITE)
        actions: list[Action] = []
        if satellites:
            actions.append(Offload(layer=layer, heads=range(len(roles)) if self.faithful else satellites))
        if compressed:
            idx = torch.tensor(compressed, device=scores.device)
            selection = topk_selection(
                scores[:, idx], budgets[:, idx], obs.cache.positions[:, idx], obs.cache.valid()[:, idx]
            )
            actions.append(Select(layer=layer, heads=compressed, selection=selection))
        for pivot, sats in self.profile.clusters[layer].items():
            if not sats:
                continue
            sat_idx = [compressed.index(s) for s in sats]
            self._satellite_sets[(layer, pivot)] = _subset(selection, sat_idx)
            self._budgets[(layer, pivot)] = budgets[:, list(sats)]
            # host copy of the widest satellite budget: sizes recalls without a sync
            self._widths[(layer, pivot)] = int(budgets[:, list(sats)].max())
            self.trigger.set_reference((layer, pivot), topk_sets(scores[:, pivot], self._monitor_k))
        return actions

    # -- decode -------------------------------------------------------------------------------
    def observed_heads(self, layer: int) -> tuple[int, ...]:
        """Only the pivots that monitor satellites are read while decoding."""
        return tuple(p for p, sats in self.profile.clusters[layer].items() if sats)

    def decode(self, obs: Observation) -> Sequence[Action]:
        """Buffer each monitoring pivot's new queries; at the trigger's decision steps, score
        the buffered queries together over the pivot's prompt keys and feed the trigger in
        order (the reference buffers W queries the same way). Several new tokens at once
        (a question appended after prefill) count as that many steps."""
        spec = self._require_reset(self._spec)
        actions: list[Action] = []
        period = self.trigger.period
        if period is None:
            return actions
        g = spec.group_size
        for pivot, sats in self.profile.clusters[obs.layer].items():
            if not sats:
                continue
            key = (obs.layer, pivot)
            pending = self._pending.setdefault(key, [])
            fired, newest = None, None
            for i in range(obs.queries.shape[2]):
                pending.append(obs.queries[:, pivot * g : (pivot + 1) * g, i])  # [B, G, D]
                if len(pending) < period:
                    continue
                prompt = _prompt_view(obs.cache, obs.head_index(pivot), obs.prompt_length)
                queries = torch.stack(pending, dim=2)  # [B, G, W, D]
                last = torch.full((queries.shape[2],), obs.prompt_length, device=queries.device)
                scores = self._scores(queries, last, prompt)  # [B, W, L]
                first_step = obs.step + i + 1 - len(pending)
                sets = topk_sets(scores, self._monitor_k)  # [B, W, k]: one top-k for the window
                now = self.trigger.observe_window(key, first_step, sets, obs.prompt_length)
                if now is not None:
                    fired = now if fired is None else fired | now
                newest = (scores[:, -1], prompt.positions[:, 0])
                pending.clear()
            # one host read per pivot every W steps: whether to emit an action is a host decision
            if fired is None or not bool(fired.any()):
                continue
            fresh = self._satellite_selection(newest[0], self._budgets[key], newest[1], self._widths[key])
            merged = _merge(fired, fresh, self._satellite_sets[key])
            self._satellite_sets[key] = merged
            self.recalls += 1
            actions.append(Recall(layer=obs.layer, heads=sats, selection=merged))
        return actions

    def _satellite_selection(
        self, scores: torch.Tensor, budgets: torch.Tensor, positions: torch.Tensor, width: int
    ) -> Selection:
        """Pivot scores [B, L] -> each satellite's recalled positions; budgets [B, S]; width:
        the largest budget (host int)."""
        b, s = budgets.shape
        if not self.faithful:
            expand = scores.unsqueeze(1).expand(b, s, -1)  # [B, S, L]
            return topk_selection(expand, budgets, positions.unsqueeze(1).expand(b, s, -1), width=width)
        # reference: top-max(l) candidates sorted by position; satellite i takes the first l_i
        widest = budgets.max(dim=1, keepdim=True).values  # [B, 1]
        cand = topk_selection(scores.unsqueeze(1), widest, positions.unsqueeze(1), width=width)  # [B, 1, K]
        indices = cand.indices.expand(b, s, -1).contiguous()
        return Selection(indices=indices, lengths=torch.minimum(budgets, cand.lengths))

    def _last_token_scores(self, queries: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Pooled, group-folded attention of one query row: [B, H_q', 1, D] -> [B, H_kv', L]."""
        w = attention_weights(queries, positions, cache)[:, :, 0]  # [B, H_q', L]
        return pool1d(group_reduce(w, cache.num_kv_heads, self.gqa), self.pool_kernel)

    def _scores(self, queries: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """One pivot's pooled, group-folded attention of W queries: [B, G, W, D] -> [B, W, L]."""
        w = attention_weights(queries, positions, cache)  # [B, G, W, L]
        return pool1d(group_reduce(w, 1, self.gqa)[:, 0], self.pool_kernel)


def _merge(fired: torch.Tensor, fresh: Selection, old: Selection) -> Selection:
    """Per sequence: ``fresh`` where ``fired`` [B], else ``old`` (padding widths may differ)."""
    width = max(fresh.indices.shape[2], old.indices.shape[2])

    def widen(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[2]))

    return Selection(
        indices=torch.where(fired[:, None, None], widen(fresh.indices), widen(old.indices)),
        lengths=torch.where(fired[:, None], fresh.lengths, old.lengths),
    )


def _subset(selection: Selection, heads: list[int]) -> Selection:
    return Selection(indices=selection.indices[:, heads], lengths=selection.lengths[:, heads])


def _prompt_view(cache: LayerCache, head: int, prompt_length: int) -> LayerCache:
    """A full-KV head's prompt tokens as a one-head cache: [B, 1, L, D]."""
    keys = cache.keys[:, head : head + 1, :prompt_length]
    positions = cache.positions[:, head : head + 1, :prompt_length]
    lengths = cache.lengths[:, head : head + 1].clamp(max=prompt_length)
    return LayerCache(keys=keys, positions=positions, lengths=lengths, starts=cache.starts)
