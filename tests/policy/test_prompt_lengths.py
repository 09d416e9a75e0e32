"""Every registered policy at every prompt length from 1 token up, through the reference executor.

Short prompts are where budgets round to 0 or 1 token, pooling windows and query windows
exceed the prompt, and a drift monitor's top-k covers the whole prompt. Each policy is
built the way users build it (``hcpolicy.policy.factory.build_policy``) and either runs at
every length or refuses the compression at construction, for its stated reason.
"""

from __future__ import annotations

import math

import attrs
import pytest

from hcpolicy.drift import EveryN
from hcpolicy.policy.factory import build_policy
from hcpolicy.profile import HeadProfile
from hcpolicy.reference import simulate
from hcpolicy.registry import POLICIES

NAMES = POLICIES.names()
COMPRESSIONS = (0.3, 0.5, 0.9)
LENGTHS = range(1, 65)
STEPS = 5  # heterocache's default trigger decides after 5 decode steps: one drift decision per run

# The compressions a policy refuses at construction, and the reason its ValueError states.
REFUSALS = {
    "heterocache": (lambda c, profile: c <= profile.min_compression, "too low for this profile"),
}


def built_or_refused(name: str, compression: float, profile: HeadProfile):
    """The policy, or None where it refuses ``compression`` as REFUSALS says it may."""
    refuses, reason = REFUSALS.get(name, (lambda c, p: False, ""))
    if not refuses(compression, profile):
        return build_policy(name, compression, profile=profile)
    with pytest.raises(ValueError, match=reason):
        build_policy(name, compression, profile=profile)
    return None


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", NAMES)
def test_every_prompt_length_runs_on_the_reference_executor(name, compression, spec, profile):
    if built_or_refused(name, compression, profile) is None:
        return
    for length in LENGTHS:
        policy = build_policy(name, compression, profile=profile)
        cache, _, outputs = simulate(policy, spec, prompt_length=length, decode_steps=STEPS, seed=length)
        assert all(out.isfinite().all() for out in outputs), f"length {length}: non-finite attention output"
        generated = set(range(length, length + STEPS))
        for layer in cache.layers:
            for row in layer:
                # compression only drops prompt tokens: every head holds what was generated
                assert all(generated <= head.device.keys() for head in row), f"length {length}: a generated token lost"


@pytest.mark.parametrize("compression", [0.5, 0.9])
def test_heterocache_recalls_at_every_prompt_length(compression, spec, profile):
    """Satellites recalled at every length, those whose budgets round to 0 tokens included
    (the default trigger fires only where the random pivots happen to drift)."""
    base = build_policy("heterocache", compression, profile=profile)
    for length in LENGTHS:
        policy = attrs.evolve(base, trigger=EveryN(n=2))
        cache, _, _ = simulate(policy, spec, batch_size=2, prompt_length=length, decode_steps=4, seed=length)
        assert cache.recalls == policy.recalls > 0, f"length {length}"


def test_refusals_name_a_compression_that_would_work(profile):
    """The one refusal the sweep accepts says what to choose instead."""
    with pytest.raises(ValueError, match=r"choose compression > 0\.3333"):
        build_policy("heterocache", 0.3, profile=profile)
    assert math.isclose(profile.min_compression, 4 / 12)
