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


def held_rows(kv, layer: int, h: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Positions, keys and values head (layer, h) holds (through the request's own view)."""
    view = kv.view(layer, [h])
    n = int(view.lengths[0, 0])
    return view.positions[0, 0, :n].tolist(), view.keys[0, 0, :n], view.values[0, 0, :n]


def assert_holds(kv, tokens: list[int], layer: int, h: int, positions: list[int]) -> None:
    """Head (layer, h) holds exactly ``positions``, with their true K/V."""
    truth = token_kv(SPEC, tokens)
    held, k, v = held_rows(kv, layer, h)
    assert held == positions
    assert torch.equal(k, truth[positions, layer, 0, h])
    assert torch.equal(v, truth[positions, layer, 1, h])


def test_slots_return_exactly_through_compress_recall_decode_finish(world):
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
    assert pools.allocator.available_size() == free_at_start - 32  # nothing moves while the prompt is computed
    kv.finalize()
    # head-major: layer 0 keeps 16 + 8 rows, layer 1 8 + 8; a page holds H_kv = 2 rows a layer,
    # so the request keeps 8 + 4 = 12 of its 32 slots as pages and gives 20 back
    assert kv.head_major and kv.pages.num_pages == 12
    assert pools.allocator.available_size() == free_at_start - 12
    assert (sched.row(req) == 0).all() and kv.freed_slots == 20
    assert_holds(kv, tokens, 0, 0, evens)
    assert_holds(kv, tokens, 1, 1, first8)

    kv.apply([Recall(layer=1, heads=[1], selection=selection([9, 11, 20]))])
    assert_holds(kv, tokens, 1, 1, [9, 11, 20])  # replaces the offloaded range, bytes from the host
    assert pools.allocator.available_size() == free_at_start - 12  # 3 rows fit in the 4 pages layer 1 has
    kv.apply([Select(layer=0, heads=[0], selection=selection([2, 4]))])
    # layer 0 now uses 1 + 4 pages and layer 1 4 + 2, but a page returns only once no layer
    # uses it: layer 0's head 1 keeps pages 8-11, layer 1 uses 0-5
    assert kv.pages.num_pages == 10 and pools.allocator.available_size() == free_at_start - 10

    for step in range(3):  # decode: SGLang's slot for each new token becomes a page of the request
        loc = sched.decode_slot(req, token=99 + step)
        sched.row(req)[-1] = 0  # the attention wrapper does this for the batch
        new = token_kv(SPEC, tokens + list(range(99, 100 + step)))[-1]  # [layers, 2, H, D]
        rows = kv.decode_step(33 + step, int(loc))
        for layer in range(SPEC.num_layers):
            k_rows, v_rows = kv.pages.rows(layer)
            k_rows[torch.from_numpy(rows[layer])] = new[layer, 0]
            v_rows[torch.from_numpy(rows[layer])] = new[layer, 1]
    full = tokens + [99, 100, 101]
    assert_holds(kv, full, 0, 0, [2, 4, 32, 33, 34])
    assert_holds(kv, full, 1, 1, [9, 11, 20, 32, 33, 34])
    held = kv.pages.num_pages
    assert pools.allocator.available_size() == free_at_start - held
    sched.finish(req)
    assert len(store) == 0  # on_release dropped the request, its pages and host copies
    assert store.runtime.host_bytes() == 0
    assert assert_tree_rows_intact(pools, tree, full) == 0  # nothing compressed went in
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
    keep = [3, 30, 31]
    kv.apply([Select(layer=layer, heads=HEADS, selection=selection(keep, keep)) for layer in range(SPEC.num_layers)])
    kv.finalize()
    row = sched.row(req)
    assert torch.equal(row[:16], prefix_slots)  # the tree's: not freed, not overwritten
    assert (row[16:] == 0).all()
    assert_holds(kv, tokens, 0, 1, keep)  # position 3 was copied out of the tree's slot
    assert kv.pages.num_pages == 4  # a page holds 2 rows a layer: 3 rows a head take 2 pages
    assert pools.allocator.available_size() == free_at_start - 24 - 4

    free = pools.allocator.available_size()
    tree.evict(EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == free + 8  # only the first request's unlocked suffix
    assert not torch.isin(prefix_slots, pools.allocator.free_pages).any()
    assert assert_tree_rows_intact(pools, tree, shared) == 16

    sched.finish(req)
    assert assert_tree_rows_intact(pools, tree, tokens) == 16  # nothing compressed went in
    tree.evict(EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == free_at_start


def test_untouched_requests_stay_token_major_and_are_cached_whole(world):
    pools, tree, store, sched = world
    tokens = list(range(1, 21))
    req = sched.admit(tokens)
    kv = track(store, req).kv
    kv.finalize()  # the policy never acted: SGLang's own layout and path
    assert not kv.head_major and kv.intact_length() == 20 and pools.allocator.available_size() == 512 - 20
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
    kv.finalize()
    with pytest.raises(ActionError, match="not on the device"):
        kv.apply([Select(layer=0, heads=[0], selection=selection([3]))])
    kv.apply([Select(layer=1, heads=[1], selection=selection([1, 2])), Offload(layer=1, heads=[1])])
    with pytest.raises(ActionError, match="never offloaded"):
        kv.apply([Recall(layer=1, heads=[1], selection=selection([1, 5]))])


def test_pages_above_one_slot(monkeypatch):
    """SGLang pages of 4 slots: a head-major page is 4 slots x 2 heads = 8 rows a layer; the
    request's prompt pages are reused, decode takes a page from SGLang every 4 steps (the
    steps between land in SGLang's padding page 0), and every page comes back."""
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_helpers import Pools

    pools = make_pools()
    kv_pool = MHATokenToKVPool(size=512, page_size=4, dtype=torch.float64, head_num=SPEC.num_kv_heads,
                               head_dim=SPEC.head_dim, layer_num=SPEC.num_layers, device="cpu",
                               enable_memory_saver=False)  # fmt: skip
    allocator = PagedTokenToKVPoolAllocator(size=512, page_size=4, dtype=torch.float64, device="cpu", kvcache=kv_pool,
                                            need_sort=False)  # fmt: skip
    pools = Pools(kv_pool, allocator, pools.req_to_token, SPEC)
    store = PolicyStore(spec=SPEC, policy_factory=FullKV, req_to_token_pool=pools.req_to_token, pool=kv_pool,
                        allocator=allocator)  # fmt: skip
    store.tree_bound = True
    free_at_start = allocator.available_size()
    tokens = list(range(1, 31))  # 30 tokens: 8 pages
    loc = allocator.alloc(32)
    row_id = 1
    pools.req_to_token.req_to_token[row_id, :30] = loc[:30].to(torch.int32)
    truth = token_kv(SPEC, tokens)
    for layer in range(SPEC.num_layers):
        kv_pool.set_kv_buffer(None, loc[:30], truth[:, layer, 0], truth[:, layer, 1], layer_id_override=layer)
    kv = store.start(row_id, length=30, protected=0).kv
    keep = list(range(0, 30, 3))  # 10 a head: 2 pages of 8 rows each, 4 pages a layer
    kv.apply([Select(layer=layer, heads=HEADS, selection=selection(keep, keep)) for layer in range(SPEC.num_layers)])
    kv.finalize()
    assert kv.pages.num_pages == 4 and allocator.available_size() == free_at_start - 16
    assert_holds(kv, tokens, 1, 1, keep)
    row = pools.req_to_token.req_to_token[row_id]
    for step in range(6):  # what SGLang's paged decode allocation does after a zeroed entry
        length = 31 + step
        slot = int(row[length - 2]) + 1 if (length - 1) % 4 else int(allocator.alloc(4)[0])
        rows = kv.decode_step(length, slot)
        for layer in range(SPEC.num_layers):
            k_rows, v_rows = kv.pages.rows(layer)
            k_rows[torch.from_numpy(rows[layer])] = float(step)
            v_rows[torch.from_numpy(rows[layer])] = float(step)
    held, k, _ = held_rows(kv, 0, 1)
    assert held == keep + list(range(30, 36)) and k[-6:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert allocator.available_size() == free_at_start - 4 * kv.pages.num_pages
    store.release(row_id)
    assert allocator.available_size() == free_at_start


def test_recall_of_a_partly_offloaded_head(world):
    """A head whose host copy is part of its prompt (offloaded after a Select) recalls
    through the general path: the offloaded range is replaced, the rest stays."""
    pools, tree, store, sched = world
    tokens = list(range(1, 21))
    kv = track(store, sched.admit(tokens)).kv
    kv.apply([Select(layer=1, heads=[1], selection=selection([1, 2, 3, 15]))])
    kv.finalize()
    kv.apply([Offload(layer=1, heads=[1]), Select(layer=1, heads=[1], selection=selection([1]))])
    assert not kv.host_whole[(1, 1)]
    kv.apply([Recall(layer=1, heads=[1], selection=selection([2, 15]))])
    assert_holds(kv, tokens, 1, 1, [2, 15])  # 1 was in the offloaded range: replaced
