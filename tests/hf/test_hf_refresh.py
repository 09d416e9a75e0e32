"""HeteroCache's refresh in the HF backend: a chunk of new tokens after prefill (a question
appended to a compressed context) makes every compressed head (anchors and satellites)
re-select its budget by its own attention over its full prompt KV, read back from the
host store; the rows that land are the offloaded bytes."""

import pytest
import torch

from hcpolicy.backends.hf import HFBackend
from hcpolicy.classify import build_profile
from hcpolicy.drift import Never
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.profile import Role
from hcpolicy.scores import attention_weights, group_reduce, pool1d

from test_hf_exactness import prompt
from test_hf_recall import DEVICES, offloaded_layer

CONTEXT, CHUNK = 40, 6


def anchor_profile(spec):
    """Layer 0: head 0 pivot, head 1 its satellite; layer 1: two anchors (unique, stable)."""
    stab = torch.tensor([[0.3, 0.4], [0.7, 0.9]])
    adj = torch.zeros(2, 2, 2, dtype=torch.bool)
    adj[0, 0, 1] = True
    return build_profile(spec, stab, adj, tau_stable=0.5)


def run_chunk(llama, refresh: bool):
    """Prefill CONTEXT tokens under HeteroCache, then one forward of CHUNK new tokens;
    returns (cache, policy, the chunk's observations by layer, dense prompt keys by layer)."""
    backend = HFBackend(llama)
    profile = anchor_profile(backend.spec)
    assert profile.heads(1, Role.ANCHOR) == (0, 1) and profile.heads(0, Role.SATELLITE) == (1,)
    ids = prompt(batch=2, length=CONTEXT + CHUNK, seed=3)
    dense = backend.new_cache(None, record_window=None)
    with torch.no_grad(), backend.attach():
        backend.forward(ids[:, :CONTEXT], dense)
    keys = [layer.keys[:, :, :CONTEXT].clone() for layer in dense.layers]
    policy = HeteroCachePolicy(profile=profile, compression=0.6, trigger=Never(), refresh=refresh)
    seen = {}
    decode = policy.decode
    policy.decode = lambda obs: seen.setdefault(obs.layer, obs) and decode(obs)
    cache = backend.new_cache(policy)
    with torch.no_grad(), backend.attach():
        backend.forward(ids[:, :CONTEXT], cache)
        budgets = [layer.view().lengths.clone() for layer in cache.layers]
        backend.forward(ids[:, CONTEXT:], cache)
    return cache, policy, seen, keys, budgets


@pytest.mark.parametrize("device", DEVICES)
def test_the_offloaded_view_is_the_offloaded_bytes(llama, device):
    keep = [[[1, 5, 9, 20], [0, 1, 2]], [[3, 4, 30, 39], [7, 8, 9]]]
    cache, layer, dense_k, dense_v = offloaded_layer(llama, device, True, keep)
    full = layer.offloaded_view([1, 0])
    assert torch.equal(full.keys, dense_k[:, [1, 0], :40]) and torch.equal(full.values, dense_v[:, [1, 0], :40])
    assert full.positions.tolist() == [[list(range(40))] * 2] * 2 and full.lengths.tolist() == [[40, 40]] * 2
    with pytest.raises(KeyError, match="never offloaded"):
        cache.layers[0].offloaded_view([0])


def test_a_chunk_refreshes_every_compressed_head_by_its_own_attention(llama):
    cache, policy, seen, keys, budgets = run_chunk(llama, refresh=True)
    g = llama.config.num_attention_heads // llama.config.num_key_value_heads
    assert policy.recalls == 2  # one refresh per layer, nothing from the (never) trigger
    for layer, heads in ((0, [1]), (1, [0, 1])):
        obs = seen[layer]
        assert obs.queries.shape[2] == CHUNK and obs.offloaded is not None
        store = cache.layers[layer].ragged
        for i, h in enumerate(heads):
            # the expected choice, from the dense run's prompt keys (not the host store)
            q = obs.queries[:, h * g : (h + 1) * g]
            from hcpolicy.observe import LayerCache

            w = attention_weights(q, obs.query_positions, LayerCache.dense(keys[layer][:, h : h + 1]))
            scores = pool1d(group_reduce(w.amax(2), 1, "max"), 5)[:, 0]  # [B, CONTEXT]
            for b in range(2):
                n = int(budgets[layer][b, h]) - 0  # prefill kept n prompt rows of this head
                expect = sorted(torch.sort(scores[b], descending=True, stable=True).indices[:n].tolist())
                start = store.host_starts[b][h]
                got = store.positions[start : start + n].tolist()
                assert got == expect
                assert torch.equal(store.kv[start : start + n, 0], keys[layer][b, h, expect])  # the bytes landed
                # the chunk's own tokens follow the refreshed rows
                assert store.positions[start + n : start + n + CHUNK].tolist() == list(range(CONTEXT, CONTEXT + CHUNK))


def test_without_refresh_a_chunk_recalls_nothing_and_only_satellites_go_to_the_host(llama):
    on, policy_on, *_ = run_chunk(llama, refresh=True)
    off, policy_off, *_ = run_chunk(llama, refresh=False)
    assert policy_off.recalls == 0
    row = 2 * llama.config.head_dim * 4  # K and V of one token in one head, float32
    assert off.host_bytes() == 2 * CONTEXT * 1 * row  # layer 0's satellite, two sequences
    assert on.host_bytes() == 2 * CONTEXT * 3 * row  # plus layer 1's two anchors
    assert not HeteroCachePolicy(profile=policy_on.profile, faithful=True).refresh
