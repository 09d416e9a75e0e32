"""HeteroCache (arXiv 2601.13684): head roles from a profile, inverse-stability budgets,
satellites offloaded to the host and recalled when their pivot's attention drifts.

``faithful=True`` reproduces the reference code's choices. The default departs from four:
- offload: only compressed heads go to the host (satellites, and anchors for the refresh
  below), not every head of a layer that has satellites;
- recall: satellite i takes its pivot's top-l_i tokens by score, not the first l_i of the
  position-sorted top-max(l) candidates;
- trigger: each sequence of a batch decides on its own, not on the batch-averaged overlap;
- prefill: compressed heads keep the top of the max attention over the last 32 prompt
  queries (``prefill_window``), not the last token's alone.
And it adds one step the paper does not have (``refresh``): when several tokens arrive in
one forward after prefill (a question appended to a compressed context), every compressed
head re-selects its budget by its own attention of those tokens over its full prompt KV,
read back from the host store, and recalls it; the pivots' monitors restart from the
newest token.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from hcpolicy._device import upload
from hcpolicy._validate import is_compression, positive
from hcpolicy.actions import Action, Offload, Recall, Select, Selection
from hcpolicy.budget import InverseStabilityAllocator, sequence_budgets
from hcpolicy.capabilities import Requirements
from hcpolicy.drift import DriftTrigger, WindowedOverlap
from hcpolicy.monitor import WindowPlan
from hcpolicy.policy.satellites import satellite_sets
from hcpolicy.observe import LayerCache, Observation
from hcpolicy.policy.base import Policy
from hcpolicy.profile import HeadProfile, Role
from hcpolicy.scores import Reduce, attention_weights, group_reduce, pool1d, topk_selection, topk_sets
from hcpolicy.spec import ModelSpec


SCORING_BYTES = 1 << 30  # decode_layers scores as many pivots at once as fit their float32 keys in this


@attrs.define(kw_only=True)
class HeteroCachePolicy(Policy):
    """HeteroCache: role-aware budgets, host offload of satellites, drift-triggered recall."""

    profile: HeadProfile
    compression: float = attrs.field(default=0.5, validator=is_compression)
    trigger: DriftTrigger | None = None  # None: WindowedOverlap(W=5, tau=0.5), batch-averaged if faithful
    pool_kernel: int = attrs.field(default=5, validator=positive)
    gqa: Reduce = attrs.field(default="max", validator=attrs.validators.in_(("mean", "max", "sum")))
    monitor_k: int | None = attrs.field(default=None)
    faithful: bool = False
    refresh: bool = attrs.field(default=attrs.Factory(lambda self: not self.faithful, takes_self=True))
    # prompt queries scoring the prefill selection (max over them): 1 = the paper's last token
    prefill_window: int = attrs.field(default=attrs.Factory(lambda self: 1 if self.faithful else 32, takes_self=True),
                                      validator=positive)  # fmt: skip
    _allocator: InverseStabilityAllocator = attrs.field(init=False, repr=False)
    _spec: ModelSpec | None = attrs.field(default=None, init=False, repr=False)
    _satellite_sets: dict = attrs.field(factory=dict, init=False, repr=False)
    _monitor_k: int = attrs.field(default=1, init=False, repr=False)
    _pending: dict = attrs.field(factory=dict, init=False, repr=False)
    _widths: dict = attrs.field(factory=dict, init=False, repr=False)
    _budgets_host: dict = attrs.field(factory=dict, init=False, repr=False)  # (layer, pivot) -> [B, S] CPU
    _compressed: dict = attrs.field(factory=dict, init=False, repr=False)  # layer -> (heads, budgets [B, H'])
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
        batched observations of ``period`` queries act the same); without a period and
        without ``refresh`` the policy never acts while decoding and needs no decode
        observations."""
        period = self.trigger.period
        return Requirements(
            actions={Select, Offload, Recall}, per_head_lengths=True, query_window=self.prefill_window,
            decode_observations=period is not None or self.refresh, decode_period=period or 1,
        )  # fmt: skip

    def reset(self, spec: ModelSpec, batch_size: int) -> None:
        self.profile.check(spec)
        self._spec = spec
        self._satellite_sets.clear()
        self._pending.clear()
        self._widths.clear()
        self._budgets_host.clear()
        self._compressed.clear()
        self.trigger.reset()
        self.recalls = 0

    # -- prefill ------------------------------------------------------------------------------
    def prefill(self, obs: Observation) -> Sequence[Action]:
        spec = self._require_reset(self._spec)
        layer, length = obs.layer, obs.prompt_length
        w = min(self.prefill_window, obs.queries.shape[2])
        scores = self._last_token_scores(obs.queries[:, :, -w:], obs.query_positions[-w:], obs.cache)  # [B, H_kv, L]
        # the allocator reads no scores: budgets are host numbers (ratios, C, each sequence's
        # length), read here for free; the device gets its copies without a sync (upload)
        budgets = sequence_budgets(
            self._allocator, spec, layer, self.compression, length, None, obs.cache.starts_list(),
            batch_size=scores.shape[0],
        )  # [B, H_kv] host
        self._monitor_k = self.monitor_k or max(1, min(length, round(self._allocator.base(self.compression, length))))
        roles = self.profile.roles[layer]
        compressed = [h for h, r in enumerate(roles) if not r.full]
        satellites = self.profile.heads(layer, Role.SATELLITE)
        actions: list[Action] = []
        if self.faithful:
            offload = range(len(roles)) if satellites else ()
        else:
            offload = compressed if self.refresh else satellites
        if offload:
            actions.append(Offload(layer=layer, heads=offload))
        kept = budgets[:, compressed]  # [B, H'] host
        kept_device = upload(kept, scores.device)
        self._compressed[layer] = (compressed, kept_device)
        if compressed:
            idx = upload(compressed, scores.device)
            # a prefill cache is dense (L - starts[b] valid entries per head), which each
            # budget fits: the host budgets are the selection's lengths (host_budgets)
            selection = topk_selection(
                scores[:, idx], kept_device, obs.cache.positions[:, idx], obs.cache.valid()[:, idx], host_budgets=kept
            )
            actions.append(Select(layer=layer, heads=compressed, selection=selection))
        for pivot, sats in self.profile.clusters[layer].items():
            if not sats:
                continue
            sat_idx = [compressed.index(s) for s in sats]
            sat_index = upload(sat_idx, scores.device)
            self._satellite_sets[(layer, pivot)] = _subset(selection, sat_idx, sat_index)
            self._budgets_host[(layer, pivot)] = budgets[:, list(sats)]
            # host copy of the widest satellite budget: sizes recalls without a sync
            self._widths[(layer, pivot)] = int(budgets[:, list(sats)].max())
            self.trigger.set_reference((layer, pivot), topk_sets(scores[:, pivot], self._monitor_k))
        return actions

    # -- decode -------------------------------------------------------------------------------
    def observed_heads(self, layer: int) -> tuple[int, ...]:
        """Only the pivots that monitor satellites are read while decoding; with ``refresh``,
        a layer with compressed heads but no monitor names its first compressed head, so
        that its decode call (for a chunk) still comes."""
        monitors = self._monitors(layer)
        if monitors or not self.refresh:
            return monitors
        compressed = [h for h, r in enumerate(self.profile.roles[layer]) if not r.full]
        return tuple(compressed[:1])

    def _monitors(self, layer: int) -> tuple[int, ...]:
        return tuple(p for p, sats in self.profile.clusters[layer].items() if sats)

    def decode(self, obs: Observation) -> Sequence[Action]:
        """Buffer each monitoring pivot's new queries; at the trigger's decision steps, score
        the buffered queries together over the pivot's prompt keys and feed the trigger in
        order (the reference buffers W queries the same way). Several new tokens at once
        (a question appended after prefill) count as that many steps."""
        spec = self._require_reset(self._spec)
        if self.refresh and obs.queries.shape[2] > 1 and not obs.recorded and obs.offloaded is not None:
            return self._refresh(obs)
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
            actions.append(self._recall(key, fired, *newest))
        return actions

    def _refresh(self, obs: Observation) -> list[Action]:
        """A chunk of new tokens: each compressed head keeps the top of its own attention of
        the chunk (max over its tokens, group-folded, pooled) over its full prompt KV, with
        the budget it got at prefill; monitors restart from the chunk's newest token."""
        spec = self._require_reset(self._spec)
        layer, g = obs.layer, spec.group_size
        compressed, budgets = self._compressed[layer]
        if not compressed:
            return []
        full = obs.offloaded(compressed)  # [B, H', N, D]
        q_heads = torch.tensor([h * g + j for h in compressed for j in range(g)], device=obs.queries.device)
        weights = attention_weights(obs.queries[:, q_heads], obs.query_positions, full).amax(dim=2)  # [B, H'G, N]
        valid = full.valid()  # heads' offloaded ranges differ in length: pooling skips the padding
        scores = pool1d(group_reduce(weights, len(compressed), self.gqa), self.pool_kernel, mask=valid)
        selection = topk_selection(scores, budgets, full.positions, valid)
        for pivot, sats in self.profile.clusters[layer].items():
            if not sats:
                continue
            key = (layer, pivot)
            self._satellite_sets[key] = _subset(selection, [compressed.index(s) for s in sats])
            self._pending[key] = []
            prompt = _prompt_view(obs.cache, obs.head_index(pivot), obs.prompt_length)
            newest = self._scores(obs.queries[:, pivot * g : (pivot + 1) * g, -1:], obs.query_positions[-1:], prompt)
            self.trigger.set_reference(key, topk_sets(newest[:, -1], self._monitor_k))
        self.recalls += 1
        return [Recall(layer=layer, heads=compressed, selection=selection)]

    def _recall(self, key: tuple[int, int], fired: torch.Tensor, scores: torch.Tensor,
                positions: torch.Tensor) -> Recall:  # fmt: skip
        """The satellites of pivot ``key`` take the pivot's newest scores [B, L] (positions
        [B, L]) where ``fired`` [B], and keep their selection elsewhere."""
        return self._recalls([key], fired[None], None, scores[None], positions)[0]

    def _recalls(self, keys: list[tuple[int, int]], fired: torch.Tensor, fired_host: list[list[bool]] | None,
                 scores: torch.Tensor, positions: torch.Tensor, ascending: bool = False) -> list[Recall]:  # fmt: skip
        """``_recall`` for pivots ``keys`` at once (one batch of sorts): fired [P, B] (and
        its host copy, when known: sequences that all fired need no merge), scores [P, B, L];
        ``ascending``: positions ascend along L (``satellite_sets`` then needs no sort)."""
        length = scores.shape[-1]
        sats = [self.profile.clusters[layer][pivot] for layer, pivot in keys]
        s_max = max(len(x) for x in sats)
        host = torch.zeros(len(keys), scores.shape[1], s_max, dtype=torch.int64)  # [P, B, S] budgets
        for i, key in enumerate(keys):
            host[i, :, : len(sats[i])] = self._budgets_host[key]
        host = host.clamp(max=length)
        width = max(self._widths[key] for key in keys)
        indices, lengths = satellite_sets(scores, positions, upload(host, scores.device), width, self.faithful,
                                          ascending)  # fmt: skip
        recalls = []
        for i, (key, heads) in enumerate(zip(keys, sats)):
            s = len(heads)
            fresh = Selection(indices=indices[i, :, :s], lengths=lengths[i, :, :s], host_lengths=host[i, :, :s])
            every = fired_host is not None and all(fired_host[i])
            merged = fresh if every else _merge(fired[i], fresh, self._satellite_sets[key], fired_host and fired_host[i])
            self._satellite_sets[key] = merged
            self.recalls += 1
            recalls.append(Recall(layer=key[0], heads=heads, selection=merged))
        return recalls

    def decode_layers(self, observations: Sequence[Observation]) -> list[Sequence[Action]]:
        """Every layer of one decision step together (the engine's CUDA-graph step): all
        monitoring pivots' windows are scored as one batch and the trigger's answers come
        back in one host read, not one per pivot. The same decisions as ``decode`` layer by
        layer, to which it falls back unless each layer brings exactly one whole window,
        nothing is buffered and the layers share a prompt length and a step."""
        spec = self._require_reset(self._spec)
        period = self.trigger.period
        keys = [(obs, p) for obs in observations for p in self._monitors(obs.layer)]
        if (
            period is None or not keys
            or any(obs.queries.shape[2] != period or self._pending.get((obs.layer, p)) for obs, p in keys)
            or len({(obs.prompt_length, obs.step) for obs in observations}) != 1
        ):  # fmt: skip
            return super().decode_layers(observations)
        views = [_prompt_view(obs.cache, obs.head_index(p), obs.prompt_length) for obs, p in keys]
        if len({v.keys.shape for v in views}) != 1:
            return super().decode_layers(observations)
        g, step, length = spec.group_size, observations[0].step, observations[0].prompt_length
        b = observations[0].queries.shape[0]
        chunk = max(1, SCORING_BYTES // max(1, views[0].keys.numel() * 4))  # pivots scored together
        fired: list[torch.Tensor] = []  # [n, B] per scoring batch
        newest: list[torch.Tensor] = []  # [B, L] per pivot
        for lo in range(0, len(keys), chunk):
            part = keys[lo : lo + chunk]
            queries = torch.cat([obs.queries[:, p * g : (p + 1) * g] for obs, p in part])
            cache = _stack_views(views[lo : lo + chunk])  # pivots folded into the batch dim
            last = torch.full((period,), length, device=queries.device)
            scores = self._scores(queries, last, cache)  # [n*B, W, L]
            sets = topk_sets(scores, self._monitor_k)  # [n*B, W, k]
            monitors = [(obs.layer, p) for obs, p in part]
            fired.append(self.trigger.observe_windows(monitors, step, sets.unflatten(0, (len(part), b)), length))
            newest.extend(scores[:, -1].unflatten(0, (len(part), b)))
        fired_all = torch.cat(fired)  # [P, B]
        hits = fired_all.any(dim=1).tolist()  # the one host read of the step: which pivots fired
        actions: dict[int, list[Action]] = {obs.layer: [] for obs in observations}
        for (obs, pivot), hit, now, scores, view in zip(keys, hits, fired_all, newest, views):
            if hit:
                actions[obs.layer].append(self._recall((obs.layer, pivot), now, scores, view.positions[:, 0]))
        return [actions[obs.layer] for obs in observations]

    def window_plan(self) -> WindowPlan | None:
        """The decode decisions as a ``WindowPlan`` (after prefill), for backends that score
        the pivots' windows on the device: the same decisions as ``decode_layers``. None
        when the trigger is not a ``WindowedOverlap`` or a pivot has buffered queries."""
        spec = self._require_reset(self._spec)
        trigger = self.trigger
        if not isinstance(trigger, WindowedOverlap) or any(self._pending.values()):
            return None
        keys = [(layer, p) for layer in range(spec.num_layers) for p in self._monitors(layer)]

        def act(fired: torch.Tensor, fired_host: list[list[bool]], newest: torch.Tensor,
                positions: torch.Tensor) -> dict:  # fmt: skip
            picked = [p for p, row in enumerate(fired_host) if any(row)]
            actions: dict[int, list[Action]] = {}
            if not picked:
                return actions
            idx = upload(picked, newest.device)
            now, scores = fired[idx], newest[idx]
            trigger.move([keys[p] for p in picked], now, topk_sets(scores, self._monitor_k))
            recalls = self._recalls([keys[p] for p in picked], now, [fired_host[p] for p in picked], scores, positions,
                                    ascending=True)  # a WindowPlan's positions ascend: the prompt's  # fmt: skip
            for recall in recalls:
                actions.setdefault(recall.layer, []).append(recall)
            return actions

        return WindowPlan(
            monitors=tuple(keys), window=trigger.window, k=self._monitor_k, pool_kernel=self.pool_kernel,
            gqa=self.gqa, references=lambda: trigger.references(keys), fire=trigger.fire, act=act,
        )  # fmt: skip

    def _last_token_scores(self, queries: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Pooled, group-folded attention of the last prompt queries (max over them):
        [B, H_q', Q, D] -> [B, H_kv', L]."""
        w = attention_weights(queries, positions, cache).amax(dim=2)  # [B, H_q', L]
        return pool1d(group_reduce(w, cache.num_kv_heads, self.gqa), self.pool_kernel, mask=_padding(cache))

    def _scores(self, queries: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """One pivot's pooled, group-folded attention of W queries: [B, G, W, D] -> [B, W, L]."""
        w = attention_weights(queries, positions, cache)  # [B, G, W, L]
        return pool1d(group_reduce(w, 1, self.gqa)[:, 0], self.pool_kernel, mask=_padding(cache))  # mask [B, 1, L]


def _padding(cache: LayerCache) -> torch.Tensor | None:
    """What pooling must skip: under left padding the padded entries (they would smooth
    their neighbours' scores with zeros), else None (no padding, the fast path)."""
    return cache.valid() if cache.starts is not None else None


def _merge(fired: torch.Tensor, fresh: Selection, old: Selection, fired_host: list[bool] | None = None) -> Selection:
    """Per sequence: ``fresh`` where ``fired`` [B], else ``old`` (padding widths may differ).
    ``fired_host``: the same on the host, which carries the host lengths when both have them."""
    width = max(fresh.indices.shape[2], old.indices.shape[2])

    def widen(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[2]))

    host = None
    if fired_host is not None and fresh.host_lengths is not None and old.host_lengths is not None:
        pick = torch.tensor(fired_host).unsqueeze(1)  # [B, 1]
        host = torch.where(pick, fresh.host_lengths, old.host_lengths)
    return Selection(
        indices=torch.where(fired[:, None, None], widen(fresh.indices), widen(old.indices)),
        lengths=torch.where(fired[:, None], fresh.lengths, old.lengths), host_lengths=host,
    )  # fmt: skip


def _subset(selection: Selection, heads: list[int], index: torch.Tensor | None = None) -> Selection:
    """The selection of ``heads`` (its head dim); ``index``: the same heads as a device
    tensor (else the list indexes the device: one host sync)."""
    host = None if selection.host_lengths is None else selection.host_lengths[:, heads]
    where = heads if index is None else index
    return Selection(indices=selection.indices[:, where], lengths=selection.lengths[:, where], host_lengths=host)


def _stack_views(views: list[LayerCache]) -> LayerCache:
    """One-head caches of equal shape -> one cache whose batch is theirs end to end, keys
    in float32 (what scoring reads: one converting copy instead of a stack and a cast)."""
    starts = views[0].starts
    b = views[0].keys.shape[0]
    keys = torch.empty((len(views) * b, *views[0].keys.shape[1:]), dtype=torch.float32, device=views[0].keys.device)
    for i, v in enumerate(views):
        keys[i * b : (i + 1) * b].copy_(v.keys)
    return LayerCache(
        keys=keys, positions=torch.cat([v.positions for v in views]),
        lengths=torch.cat([v.lengths for v in views]), starts=None if starts is None else starts.repeat(len(views)),
    )  # fmt: skip


def _prompt_view(cache: LayerCache, head: int, prompt_length: int) -> LayerCache:
    """A full-KV head's prompt tokens as a one-head cache: [B, 1, L, D]."""
    keys = cache.keys[:, head : head + 1, :prompt_length]
    positions = cache.positions[:, head : head + 1, :prompt_length]
    lengths = cache.lengths[:, head : head + 1].clamp(max=prompt_length)
    return LayerCache(keys=keys, positions=positions, lengths=lengths, starts=cache.starts)
