"""Baseline policies: full KV and the prefill-eviction methods HeteroCache is compared with.

Each is a ``ScoredPolicy`` (one ``score`` method) except ``FullKV``; every option is an attrs
field with a default and a validator. Shapes follow ``hcpolicy.observe``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch

from hcpolicy._validate import integer, unit_interval
from hcpolicy.actions import Action, Selection
from hcpolicy.budget import AdaAllocator, Allocator, PyramidAllocator
from hcpolicy.capabilities import Requirements
from hcpolicy.observe import Observation
from hcpolicy.policy.base import Policy, ScoredPolicy
from hcpolicy.scores import Reduce, attention_weights, group_reduce, pool1d
from hcpolicy.spec import ModelSpec

_INF = float("inf")


def _odd(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if value % 2 == 0:
        raise ValueError(f"{attribute.name} must be odd (a centred window), got {value}")


@attrs.define(kw_only=True)
class FullKV(Policy):
    """Full KV: keep every token (the uncompressed baseline)."""

    _spec: ModelSpec | None = attrs.field(default=None, init=False, repr=False)

    def requirements(self) -> Requirements:
        return Requirements()

    def reset(self, spec: ModelSpec, batch_size: int) -> None:
        self._spec = spec

    def prefill(self, obs: Observation) -> Sequence[Action]:
        self._require_reset(self._spec)
        return ()


@attrs.define(kw_only=True)
class StreamingLLM(ScoredPolicy):
    """StreamingLLM: keep the first `sinks` tokens (attention sinks) and the most recent ones."""

    sinks: int = attrs.field(default=4, validator=integer(0))

    def score(self, obs: Observation) -> torch.Tensor:
        positions = obs.cache.positions  # [B, H_kv, L]
        # sinks count from each sequence's first real token (after any left padding)
        offset = positions if obs.cache.starts is None else positions - obs.cache.starts.view(-1, 1, 1)
        # recency is the score, so the top-k after the sinks is the most recent run of tokens
        # (float32 holds positions exactly up to 2**24)
        return torch.where((offset >= 0) & (offset < self.sinks), _INF, positions.float())


@attrs.define(kw_only=True)
class H2O(ScoredPolicy):
    """H2O: heavy hitters by attention accumulated over all prompt queries, plus recent tokens.

    ``recent`` is the fraction of each head's budget reserved for the most recent tokens; the
    rest goes to the highest accumulated attention (causal, summed over queries, mean over
    the GQA group). ``chunk`` prompt queries are scored at a time to bound memory.
    """

    recent: float = attrs.field(default=0.5, validator=unit_interval)
    chunk: int = attrs.field(default=256, validator=integer(1))

    def requirements(self) -> Requirements:
        return attrs.evolve(super().requirements(), query_window=None)

    def score(self, obs: Observation) -> torch.Tensor:
        cache = obs.cache
        b, h_q, q_len, _ = obs.queries.shape
        total = torch.zeros(b, h_q, cache.keys.shape[2], device=cache.keys.device)  # [B, H_q, L]
        for start in range(0, q_len, self.chunk):
            stop = start + self.chunk
            # attention_weights returns every row it computes, so chunk here to bound memory
            w = attention_weights(obs.queries[:, :, start:stop], obs.query_positions[start:stop], cache)
            total += w.sum(dim=2)  # w: [B, H_q, chunk, L]
        return group_reduce(total, cache.num_kv_heads, "mean")  # [B, H_kv, L]

    def select(self, obs: Observation, scores: torch.Tensor, budgets: torch.Tensor) -> Selection:
        cache = obs.cache
        n_recent = (budgets.double() * self.recent).floor().long()  # [B, H_kv]
        index = torch.arange(cache.keys.shape[2], device=scores.device)  # [L]
        # positions are ascending in the valid prefix, so the last n_recent valid entries
        start = (cache.lengths - n_recent).unsqueeze(-1)  # [B, H_kv, 1]
        recent = (index >= start) & cache.valid()  # [B, H_kv, L]
        return super().select(obs, scores.masked_fill(recent, _INF), budgets)


@attrs.define(kw_only=True)
class SnapKV(ScoredPolicy):
    """SnapKV: the last `window` prompt queries vote for prefix tokens; pooled; window kept.

    Scores are the window queries' attention summed over the window, reduced over each GQA
    group (``gqa``), then pooled along the sequence (``kernel``, ``pooling``) over the prefix
    only. Window tokens score +inf, so they are kept first, as far as the budget allows.
    """

    window: int = attrs.field(default=32, validator=integer(1))
    kernel: int = attrs.field(default=7, validator=[integer(1), _odd])
    pooling: Literal["avg", "max"] = attrs.field(default="avg", validator=attrs.validators.in_(("avg", "max")))
    gqa: Reduce = attrs.field(default="mean", validator=attrs.validators.in_(("mean", "max", "sum")))

    def requirements(self) -> Requirements:
        return attrs.evolve(super().requirements(), query_window=self.window)

    def score(self, obs: Observation) -> torch.Tensor:
        cache = obs.cache
        # a backend serving several policies may hand more queries than asked: the last vote
        queries, query_positions = obs.queries[:, :, -self.window :], obs.query_positions[-self.window :]
        w = attention_weights(queries, query_positions, cache)  # [B, H_q, Q, L]
        votes = group_reduce(w.sum(dim=2), cache.num_kv_heads, self.gqa)  # [B, H_kv, L]
        valid = cache.valid()  # [B, H_kv, L]
        # the window is where the voting queries sit; min() is a 0-d tensor, so no host sync
        in_window = (cache.positions >= query_positions.min()) & valid
        pooled = pool1d(votes, self.kernel, self.pooling, mask=valid & ~in_window)
        return pooled.masked_fill(in_window, _INF)


@attrs.define(kw_only=True)
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scores, with budgets falling linearly from the first layer to the last."""

    allocator: Allocator = attrs.field(factory=PyramidAllocator)


@attrs.define(kw_only=True)
class AdaSnapKV(SnapKV):
    """Ada-SnapKV: SnapKV scores; a layer's budget goes to its top scores across heads."""

    allocator: Allocator = attrs.field(factory=AdaAllocator)
