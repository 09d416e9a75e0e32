"""What a backend can do and what a policy needs; matched without isinstance checks."""

from __future__ import annotations

import attrs

from hcpolicy._validate import integer
from hcpolicy.actions import ACTION_TYPES


def _action_types(value: frozenset[type] | set[type] | tuple[type, ...]) -> frozenset[type]:
    types = frozenset(value)
    unknown = [t for t in types if t not in ACTION_TYPES]
    if unknown:
        raise ValueError(f"not action types: {unknown}")
    return types


@attrs.frozen
class Capabilities:
    """Declared by a backend."""

    actions: frozenset[type] = attrs.field(converter=_action_types)
    per_head_lengths: bool = False
    max_batch_size: int | None = None
    cuda_graphs: bool = False


@attrs.frozen
class Requirements:
    """Declared by a policy.

    query_window: prompt queries the policy wants to observe at prefill (None = all of them).
    decode_observations: whether ``Policy.decode`` must be called every step.
    decode_period: the policy acts only every ``decode_period`` decode steps (on the steps
        ``s`` with ``(s + 1) % decode_period == 0``, counted from 0), so it may receive that
        many steps of queries in one observation (``queries [B, H_q, N, D]``, ``step`` = the
        step of the first of them). Backends may batch them (one call per period instead of
        one per step); 1 = every step, one query each.
    """

    actions: frozenset[type] = attrs.field(converter=_action_types, factory=frozenset)
    per_head_lengths: bool = False
    query_window: int | None = 1
    decode_observations: bool = False
    decode_period: int = attrs.field(default=1, validator=integer(1))


def unmet(capabilities: Capabilities, requirements: Requirements) -> list[str]:
    """Human-readable reasons a backend cannot serve a policy (empty when it can)."""
    reasons = [
        f"cannot execute {t.__name__} actions"
        for t in sorted(requirements.actions - capabilities.actions, key=lambda t: t.__name__)
    ]
    if requirements.per_head_lengths and not capabilities.per_head_lengths:
        reasons.append("cannot hold a different number of tokens per KV head")
    return reasons
