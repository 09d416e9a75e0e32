"""Every registered policy at short and long prompts through the HF backend's generate.

A tiny random Llama with 4 KV heads (so a heterocache profile has pivots, satellites,
anchors and a volatile head), built as users build policies (``build_policy``). Lengths:
the short ones where budgets round to 0 or 1 token, and a few up to 64.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from hcpolicy.backends.hf import HFBackend
from hcpolicy.classify import build_profile
from hcpolicy.drift import EveryN
from hcpolicy.policy.factory import build_policy
from hcpolicy.profile import HeadProfile
from hcpolicy.registry import POLICIES
from hcpolicy.spec import ModelSpec

from hf_helpers import transformers

NAMES = POLICIES.names()
COMPRESSIONS = (0.3, 0.5, 0.9)
LENGTHS = (1, 2, 3, 4, 5, 6, 7, 9, 12, 17, 33, 64)
NEW_TOKENS = 7  # 6 decode forwards: heterocache's default trigger decides after 5
REFUSALS = {"heterocache": (lambda c, profile: c <= profile.min_compression, "too low for this profile")}


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return HFBackend(model)


def profile_for(spec: ModelSpec) -> HeadProfile:
    """Head 0 of each layer a pivot with head 1 its satellite, the last head of layer 0
    volatile, the rest anchors: 3 full heads of 8, so compression must exceed 0.375."""
    stab = torch.linspace(0.5, 0.95, spec.num_layers * spec.num_kv_heads, dtype=torch.float64).view(spec.num_layers, -1)
    stab[0, -1] = 0.2
    adjacency = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.num_kv_heads, dtype=torch.bool)
    adjacency[:, 0, 1] = adjacency[:, 1, 0] = True
    return build_profile(spec, stab, adjacency, tau_stable=0.5)


def prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed + length))


def generate(backend: HFBackend, ids: torch.Tensor, policy, **kwargs):
    sequences, cache = backend.generate(ids, policy, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False, pad_token_id=0, **kwargs)  # fmt: skip
    assert sequences.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    return cache


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", NAMES)
def test_every_policy_generates_at_short_and_long_prompts(backend, name, compression):
    profile = profile_for(backend.spec)
    refuses, reason = REFUSALS.get(name, (lambda c, p: False, ""))
    if refuses(compression, profile):
        with pytest.raises(ValueError, match=reason):
            build_policy(name, compression, profile=profile)
        return
    for length in LENGTHS:
        policy = build_policy(name, compression, profile=profile)
        cache = generate(backend, prompt(length), policy)
        seen = length + NEW_TOKENS - 1  # the last token is sampled, never cached
        assert cache.get_seq_length() == seen
        for layer in cache.layers:
            # each head holds the tokens generated after the prompt and at most the prompt
            rows = layer.ragged.host_lengths if layer.ragged is not None else [[seen]]
            assert all(NEW_TOKENS - 1 <= n <= seen for row in rows for n in row), f"length {length}: {rows}"


@pytest.mark.parametrize("compression", [0.5, 0.6, 0.9])
def test_heterocache_recalls_at_every_short_prompt(backend, compression):
    """A recall at every length, also where every satellite of a pivot keeps 0 prompt
    tokens (the recall is then 0 entries wide; it failed with "Recall lengths exceed its
    selection's width" before)."""
    base = build_policy("heterocache", compression, profile=profile_for(backend.spec))
    for length in range(1, 17):
        policy = attrs.evolve(base, trigger=EveryN(n=2))
        generate(backend, prompt(length), policy)
        assert policy.recalls > 0, f"length {length}"


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_of_different_lengths(backend, name):
    """Three sequences of 1, 4 and 23 real tokens, left-padded to one batch."""
    profile = profile_for(backend.spec)
    policy = build_policy(name, 0.5, profile=profile)
    lengths = (1, 4, 23)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, -n:] = prompt(n, seed=b)[0]
        mask[b, -n:] = 1
    generate(backend, ids, policy, attention_mask=mask)
