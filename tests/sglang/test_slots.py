"""Slot accounting of policy actions on SGLang's real allocator, pools and radix caches.

Every test runs with the plain RadixCache and with SGLang's default UnifiedRadixCache on
both of its tree cores (python, rust).
"""

from __future__ import annotations

from array import array

import pytest
import torch
from sglang_helpers import SPEC, TREES, Scheduler, make_pools, make_tree, token_kv

from hcpolicy.actions import ActionError, Offload, Recall, Select, Selection
from hcpolicy.backends.sglang.store import PolicyStore
from hcpolicy.policy.baselines import FullKV
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

HEADS = tuple(range(SPEC.num_kv_heads))


def selection(*per_head: list[int]) -> Selection:
    """One sequence's positions per head, padded."""
    width = max(1, *(len(p) for p in per_head))
    indices = torch.zeros(1, len(per_head), width, dtype=torch.int64)
    for h, positions in enumerate(per_head):
        indices[0, h, : len(positions)] = torch.tensor(positions, dtype=torch.int64)
    lengths = torch.tensor([[len(p) for p in per_head]], dtype=torch.int64)
    return Selection(indices=indices, lengths=lengths)


@pytest.fixture(params=TREES)
def world(request):
    pools = make_pools()
    tree = make_tree(pools, request.param)
    store = PolicyStore(spec=SPEC, policy_factory=FullKV, req_to_token_pool=pools.req_to_token, pool=pools.kv,
                        allocator=pools.allocator)  # fmt: skip
    tree.attach(store)
    return pools, tree, store, Scheduler(pools, tree)


def track(store: PolicyStore, req):
    return store.start(req.kv.req_pool_idx, length=req.kv.kv_committed_len, protected=req.kv.cache_protected_len)


def tree_slots(tree, tokens: list[int]) -> torch.Tensor:
    """The slots the tree holds for the longest cached prefix of ``tokens``."""
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
    return tree.path_device_indices(match.last_device_node)[: match.device_prefix_len]


def assert_tree_rows_intact(pools, tree, tokens: list[int]) -> int:
    """Every slot the tree holds for ``tokens`` carries that token's K/V in every layer and
    head, and none of them is free. Returns how many positions the tree holds."""
    slots = tree_slots(tree, tokens)
    truth = token_kv(SPEC, tokens)[: len(slots)]  # [n, layers, 2, H, D]
    for layer in range(SPEC.num_layers):
        assert torch.equal(pools.kv.get_key_buffer(layer)[slots], truth[:, layer, 0])
        assert torch.equal(pools.kv.get_value_buffer(layer)[slots], truth[:, layer, 1])
    assert not torch.isin(slots, pools.allocator.free_pages).any()
    return len(slots)


def test_slots_return_exactly_through_evict_offload_recall(world):
    pools, tree, store, sched = world
    free_at_start = pools.allocator.available_size()
    tokens = list(range(1, 33))
    req = sched.admit(tokens)
    kv = track(store, req).kv
    evens, first8 = list(range(0, 32, 2)), list(range(8))
    kv.apply([
        Offload(layer=1, heads=[1]),
        Select(layer=0, heads=HEADS, selection=selection(evens, first8)),
        Select(layer=1, heads=HEADS, selection=selection(first8, first8)),
    ])  # fmt: skip
    dead = sorted(set(range(32)) - set(evens) - set(first8))  # no layer or head sees these
    assert pools.allocator.available_size() == free_at_start - 32 + len(dead)
    row = sched.row(req)
    assert (row[dead] == 0).all() and (row[evens + first8] != 0).all()

    before = pools.allocator.available_size()
    kv.apply([Recall(layer=1, heads=[1], selection=selection([9, 11, 20]))])
    assert pools.allocator.available_size() == before - 2  # 9 and 11 get fresh slots; 20 never lost its slot
    truth = token_kv(SPEC, tokens)
    for p in (9, 11, 20):
        assert torch.equal(pools.kv.get_key_buffer(1)[row[p], 1], truth[p, 1, 0, 1])
        assert torch.equal(pools.kv.get_value_buffer(1)[row[p], 1], truth[p, 1, 1, 1])
    view = kv.view(1, [1])
    assert view.positions[0, 0, : view.lengths[0, 0]].tolist() == [9, 11, 20]  # replaces the offloaded range

    kv.apply([Select(layer=1, heads=[1], selection=selection([20]))])  # 9 and 11 die again
    assert pools.allocator.available_size() == before
    sched.decode_slot(req, token=99)
    kv.grow(33)
    sched.finish(req)
    assert len(store) == 0  # on_release dropped the request and its host copies
    assert store.runtime.host_bytes() == 0
    held = assert_tree_rows_intact(pools, tree, tokens + [99])
    assert held == dead[0]  # the tree took the intact prefix, up to the first freed slot
    tree.evict(EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == free_at_start


def test_policy_never_frees_locked_tree_slots(world):
    pools, tree, store, sched = world
    free_at_start = pools.allocator.available_size()
    shared = list(range(1, 17))
    first = sched.admit(shared + list(range(50, 58)))
    sched.finish(first)  # uncompressed: the tree holds all 24 tokens
    assert assert_tree_rows_intact(pools, tree, shared + list(range(50, 58))) == 24

    tokens = shared + list(range(100, 116))
    req = sched.admit(tokens)
    assert req.kv.cache_protected_len == 16  # the shared prefix is matched and locked
    prefix_slots = sched.row(req)[:16].clone()
    kv = track(store, req).kv
    keep = [30, 31]
    kv.apply([Select(layer=layer, heads=HEADS, selection=selection(keep, keep)) for layer in range(SPEC.num_layers)])
    row = sched.row(req)
    assert torch.equal(row[:16], prefix_slots)  # hidden from every head, but the tree's: not freed
    assert (row[16:30] == 0).all()
    assert kv.view(0).lengths.tolist() == [[2, 2]]

    free = pools.allocator.available_size()
    tree.evict(EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == free + 8  # only the first request's unlocked suffix
    assert not torch.isin(prefix_slots, pools.allocator.free_pages).any()
    assert assert_tree_rows_intact(pools, tree, shared) == 16

    sched.finish(req)
    assert assert_tree_rows_intact(pools, tree, tokens) == 16  # nothing compressed went in
    tree.evict(EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == free_at_start


def test_uncompressed_rows_are_cached_whole(world):
    """A request whose policy hid tokens without freeing any (a full head keeps them) is
    still fully cacheable: every slot holds every head's bytes."""
    pools, tree, store, sched = world
    tokens = list(range(1, 21))
    req = sched.admit(tokens)
    kv = track(store, req).kv
    kv.apply([Select(layer=0, heads=[1], selection=selection([0, 19]))])
    assert kv.intact_length() == 20 and pools.allocator.available_size() == 512 - 20
    sched.finish(req)
    assert assert_tree_rows_intact(pools, tree, tokens) == 20


def test_bad_actions_fail_clearly(world):
    pools, tree, store, sched = world
    kv = track(store, sched.admit(list(range(1, 11)))).kv
    with pytest.raises(ActionError, match="without an earlier Offload"):
        kv.apply([Recall(layer=0, heads=[0], selection=selection([1]))])
    kv.apply([Select(layer=0, heads=[0], selection=selection([1, 2]))])
    with pytest.raises(ActionError, match="not on the device"):
        kv.apply([Select(layer=0, heads=[0], selection=selection([3]))])
    with pytest.raises(ActionError, match="outside"):
        kv.apply([Select(layer=1, heads=[0], selection=selection([10]))])
    with pytest.raises(ActionError, match="head 5 out of range"):
        kv.apply([Offload(layer=0, heads=[5])])
