import math

import pytest
import torch

from hcpolicy.actions import Offload, Recall, Select
from hcpolicy.classify import build_profile
from hcpolicy.drift import EveryN
from hcpolicy.observe import LayerCache, Observation, Phase
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.profile import Role
from hcpolicy.reference import ReferenceCache, simulate
from hcpolicy.spec import ModelSpec

SPEC = ModelSpec("synthetic", num_layers=2, num_query_heads=8, num_kv_heads=4, head_dim=16)
L = 48


def profile():
    stab = torch.tensor([[0.9, 0.8, 0.2, 0.7], [0.3, 0.6, 0.6, 0.55]])
    adj = torch.zeros(2, 4, 4, dtype=torch.bool)
    adj[0, 0, 1] = True  # layer 0: pivot 0 -> satellite 1, volatile 2, anchor 3
    adj[1, 1, 2] = adj[1, 1, 3] = True  # layer 1: volatile 0, pivot 1 -> satellites 2, 3
    return build_profile(SPEC, stab, adj, tau_stable=0.5)


def naive_scores(q: torch.Tensor, k: torch.Tensor, kernel: int = 5) -> torch.Tensor:
    """Last-token attention, max over the GQA group, centred average pool. q: [H_q, D], k: [H_kv, L, D]."""
    h_kv, length, d = k.shape
    g = q.shape[0] // h_kv
    out = torch.zeros(h_kv, length, dtype=torch.float64)
    for h in range(h_kv):
        rows = [torch.softmax(q[h * g + j].double() @ k[h].double().T / math.sqrt(d), -1) for j in range(g)]
        row = torch.stack(rows).max(0).values
        for i in range(length):
            window = row[max(0, i - kernel // 2) : i + kernel // 2 + 1]
            out[h, i] = window.mean()
    return out


def prefill_obs(layer, q, k):
    return Observation(
        phase=Phase.PREFILL, layer=layer, queries=q, query_positions=torch.tensor([L - 1]),
        cache=LayerCache.dense(k), prompt_length=L,
    )  # fmt: skip


@pytest.mark.parametrize("faithful", [False, True])
def test_prefill_budgets_selection_and_offload(faithful):
    prof = profile()
    pol = HeteroCachePolicy(profile=prof, compression=0.7, faithful=faithful)
    pol.reset(SPEC, 1)
    gen = torch.Generator().manual_seed(1)
    h_total, f = 8, prof.num_full_heads
    base = (0.7 * h_total - f) * L / (h_total - f)
    for layer in range(2):
        q = torch.randn(1, 8, 1, 16, generator=gen)
        k = torch.randn(1, 4, L, 16, generator=gen)
        actions = pol.prefill(prefill_obs(layer, q, k))
        offload = [a for a in actions if isinstance(a, Offload)]
        (select,) = [a for a in actions if isinstance(a, Select)]
        compressed = [h for h, r in enumerate(prof.roles[layer]) if not r.full]
        # faithful: every head of a layer with satellites; default: every compressed head
        # (anchors too: a chunk after prefill refreshes them from the host)
        assert offload[0].heads == ((0, 1, 2, 3) if faithful else tuple(compressed))
        assert set(prof.heads(layer, Role.SATELLITE)) <= set(offload[0].heads)
        assert select.heads == tuple(compressed)  # full heads are never touched
        scores = naive_scores(q[0, :, 0], k[0])
        for i, h in enumerate(compressed):
            budget = min(L, math.floor(base * prof.ratios[layer][h]))
            assert select.selection.lengths[0, i] == budget
            expected = sorted(torch.topk(scores[h], budget).indices.tolist())
            assert select.selection.indices[0, i, :budget].tolist() == expected


def decode_obs(layer, step, q, view):
    return Observation(
        phase=Phase.DECODE, layer=layer, queries=q, query_positions=torch.tensor([L + step]),
        cache=view, prompt_length=L, step=step,
    )  # fmt: skip


@pytest.mark.parametrize("faithful", [False, True])
def test_recall_follows_the_pivot(faithful):
    prof = profile()
    pol = HeteroCachePolicy(profile=prof, compression=0.7, faithful=faithful, trigger=EveryN(n=1))
    gen = torch.Generator().manual_seed(2)
    keys = [torch.randn(1, 4, L, 16, generator=gen) for _ in range(2)]
    cache = ReferenceCache(keys, [torch.randn_like(k) for k in keys])
    pol.reset(SPEC, 1)
    for layer in range(2):
        cache.apply(pol.prefill(prefill_obs(layer, torch.randn(1, 8, 1, 16, generator=gen), keys[layer])))
    layer, pivot, sats = 1, 1, (2, 3)
    cache.append(layer, torch.randn(1, 4, 16, generator=gen), torch.randn(1, 4, 16, generator=gen), L)
    q = torch.randn(1, 8, 1, 16, generator=gen)
    actions = pol.decode(decode_obs(layer, 0, q, cache.view(layer)))
    (recall,) = actions
    assert isinstance(recall, Recall) and recall.heads == sats
    cache.apply(actions)
    scores = naive_scores(q[0, :, 0], keys[layer][0])[pivot]
    budgets = [int(pol._budgets_host[(layer, pivot)][0, i]) for i in range(2)]
    for i, s in enumerate(sats):
        if faithful:  # first l_i of the position-sorted top-max(l)
            expected = sorted(torch.topk(scores, max(budgets)).indices.tolist())[: budgets[i]]
        else:  # the satellite's own budget of the pivot's top tokens
            expected = sorted(torch.topk(scores, budgets[i]).indices.tolist())
        on_device = sorted(cache.layers[layer][0][s].device)
        assert on_device == expected + [L]  # the generated token stays


def test_keep_heads_full_and_memory_follows_compression():
    pol = HeteroCachePolicy(profile=profile(), compression=0.75)
    cache, _, _ = simulate(pol, SPEC, batch_size=2, prompt_length=200, decode_steps=0)
    assert cache.device_tokens() == pytest.approx(0.75 * 2 * 8 * 200, rel=0.02)
    compressed = sum(not r.full for roles in pol.profile.roles for r in roles)
    assert compressed == 4 and cache.host_tokens() == 2 * compressed * 200  # all offloaded in full (refresh)
    pol = HeteroCachePolicy(profile=profile(), compression=0.75, refresh=False)
    cache, _, _ = simulate(pol, SPEC, batch_size=2, prompt_length=200, decode_steps=0)
    assert cache.host_tokens() == 2 * 3 * 200  # without refresh: the three satellites only


def test_errors():
    prof = profile()
    with pytest.raises(ValueError, match=r"choose compression > 0\.5000"):
        HeteroCachePolicy(profile=prof, compression=0.5)
    with pytest.raises(ValueError):
        HeteroCachePolicy(profile=prof, compression=1.5)
    pol = HeteroCachePolicy(profile=prof, compression=0.8)
    with pytest.raises(ValueError, match="does not match this model"):
        pol.reset(ModelSpec("synthetic", 2, 8, 4, 32), 1)
    with pytest.raises(RuntimeError, match="reset"):
        pol.prefill(prefill_obs(0, torch.randn(1, 8, 1, 16), torch.randn(1, 4, L, 16)))


def test_per_sequence_recall_with_left_padding():
    """Sequences of one batch fire on their own; their selections keep their own widths."""
    from hcpolicy.drift import WindowedOverlap

    prof = profile()
    pol = HeteroCachePolicy(profile=prof, compression=0.7, trigger=WindowedOverlap(window=1, tau=1.0))
    gen = torch.Generator().manual_seed(4)
    starts = torch.tensor([0, 11])  # the second sequence is 11 tokens shorter
    keys = [torch.randn(2, 4, L, 16, generator=gen) for _ in range(2)]
    pol.reset(SPEC, 2)
    for layer in range(2):
        obs = Observation(
            phase=Phase.PREFILL, layer=layer, queries=torch.randn(2, 8, 1, 16, generator=gen),
            query_positions=torch.tensor([L - 1]), cache=LayerCache.dense(keys[layer], starts=starts),
            prompt_length=L,
        )  # fmt: skip
        pol.prefill(obs)
    # layer 0: satellite 1 and anchor 3 were selected together, so the stored selection is
    # padded to the anchor's wider budget while a fresh recall is only the satellite's
    view = LayerCache.dense(keys[0], starts=starts)
    actions = pol.decode(decode_obs(0, 0, torch.randn(2, 8, 1, 16, generator=gen), view))
    (recall,) = actions
    sel = recall.selection.as_lists()
    assert all(p >= 11 for head in sel[1] for p in head)  # never a pad slot
    assert len(sel[1][0]) < len(sel[0][0])  # the shorter sequence has the smaller budget


def test_prefill_window_takes_the_max_over_the_last_prompt_queries():
    """prefill_window=W: compressed heads keep the top of the max attention over the last W
    prompt queries (each causal), group-maxed and pooled; W=1 is the paper's last token."""
    prof, w = profile(), 3
    pol = HeteroCachePolicy(profile=prof, compression=0.7, prefill_window=w)
    assert pol.requirements().query_window == w
    pol.reset(SPEC, 1)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, w, 16, generator=gen)
    k = torch.randn(1, 4, L, 16, generator=gen)
    obs = Observation(
        phase=Phase.PREFILL, layer=1, queries=q, query_positions=torch.arange(L - w, L),
        cache=LayerCache.dense(k), prompt_length=L,
    )  # fmt: skip
    (select,) = [a for a in pol.prefill(obs) if isinstance(a, Select)]
    # naive: per query row, softmax over the keys it may see, then the max over rows, group, pool
    rows = torch.zeros(8, L, dtype=torch.float64)
    for i in range(w):
        visible = L - w + i + 1
        logits = q[0, :, i].double() @ k[0].double().repeat_interleave(2, 0).transpose(1, 2) / 4.0  # [8, 8, L]
        logits = torch.diagonal(logits, dim1=0, dim2=1).T  # [8, L]: query head j against its KV head j // 2
        weights = torch.zeros(8, L, dtype=torch.float64)
        weights[:, :visible] = torch.softmax(logits[:, :visible], -1)
        rows = torch.maximum(rows, weights)
    grouped = rows.view(4, 2, L).max(1).values
    pooled = torch.stack([torch.stack([grouped[h, max(0, i - 2) : i + 3].mean() for i in range(L)]) for h in range(4)])
    for i, h in enumerate(select.heads):
        n = int(select.selection.lengths[0, i])
        expected = sorted(torch.topk(pooled[h], n).indices.tolist())
        assert select.selection.indices[0, i, :n].tolist() == expected
    with pytest.raises(ValueError):
        HeteroCachePolicy(profile=prof, compression=0.7, prefill_window=0)


@pytest.mark.parametrize("starts, host_starts", [(None, False), ([0, 11], False), ([0, 11], True)])
def test_prefill_selection_carries_its_host_lengths(starts, host_starts):
    """The budgets are host numbers: each Select carries them as host lengths (what the
    engine sizes pages with, reading nothing), equal to its lengths, and the satellites'
    stored selections keep theirs."""
    pol = HeteroCachePolicy(profile=profile(), compression=0.7)
    pol.reset(SPEC, 2)
    gen = torch.Generator().manual_seed(5)
    for layer in range(2):
        k = torch.randn(2, 4, L, 16, generator=gen)
        cache = LayerCache.dense(k, starts=None if starts is None else torch.tensor(starts),
                                 host_starts=starts if host_starts else None)  # fmt: skip
        obs = Observation(phase=Phase.PREFILL, layer=layer, queries=torch.randn(2, 8, 1, 16, generator=gen),
                          query_positions=torch.tensor([L - 1]), cache=cache, prompt_length=L)  # fmt: skip
        (select,) = [a for a in pol.prefill(obs) if isinstance(a, Select)]
        sel = select.selection
        assert sel.host_lengths is not None and torch.equal(sel.host_lengths, sel.lengths)
        assert sel.indices.shape[2] == int(sel.lengths.max())  # padded to the widest, as before
    for (layer, pivot), sats in pol._satellite_sets.items():
        assert torch.equal(sats.host_lengths, sats.lengths)
        assert torch.equal(pol._budgets_host[(layer, pivot)], sats.lengths)
        assert pol._widths[(layer, pivot)] == int(sats.lengths.max())


@pytest.mark.parametrize("batched", [False, True])
def test_a_sequence_whose_trigger_did_not_fire_keeps_its_selection(batched):
    """Batch of two: sequence 0 decodes with its last prompt query (the pivot's top-k is its
    reference: overlap 1, no fire), sequence 1 with a new one (fires at tau=1). The Recall
    re-selects sequence 1 from the pivot's scores and gives sequence 0 its old selection."""
    from hcpolicy.drift import WindowedOverlap

    pol = HeteroCachePolicy(profile=profile(), compression=0.7, trigger=WindowedOverlap(window=1, tau=1.0))
    gen = torch.Generator().manual_seed(6)
    keys = [torch.randn(2, 4, L, 16, generator=gen) for _ in range(2)]
    prompt_q = [torch.randn(2, 8, 1, 16, generator=gen) for _ in range(2)]
    pol.reset(SPEC, 2)
    selected = {}
    for layer in range(2):
        (select,) = [a for a in pol.prefill(prefill_obs(layer, prompt_q[layer], keys[layer])) if isinstance(a, Select)]
        selected[layer] = select
    layer, pivot, sat = 0, 0, 1  # layer 0: pivot 0 -> satellite 1
    old = selected[layer].selection.as_lists()
    old_sat = [old[b][selected[layer].heads.index(sat)] for b in range(2)]
    q = [p.clone() for p in prompt_q]
    q[layer][1] = torch.randn(8, 1, 16, generator=gen)
    observations = [decode_obs(i, 0, q[i], LayerCache.dense(keys[i])) for i in range(2)]
    actions = pol.decode_layers(observations)[layer] if batched else pol.decode(observations[layer])
    (recall,) = actions
    assert isinstance(recall, Recall) and recall.heads == (sat,)
    now = recall.selection.as_lists()
    assert now[0][0] == old_sat[0]  # idle: unchanged
    budget = int(pol._budgets_host[(layer, pivot)][1, 0])
    fresh = sorted(torch.topk(naive_scores(q[layer][1, :, 0], keys[layer][1])[pivot], budget).indices.tolist())
    assert now[1][0] == fresh != old_sat[1]  # fired: the pivot's top tokens, a new selection


def test_a_question_refresh_drops_the_pivot_queries_buffered_before_it():
    """EveryN(2) decides at odd steps. One query is buffered at step 0; a question (steps
    1-4) refreshes the layer. The next window is the question's aftermath only: no decision
    at step 5 (one query buffered), one at step 6; a stale step-0 query would complete a
    window at step 5 and recall from it."""
    pol = HeteroCachePolicy(profile=profile(), compression=0.7, trigger=EveryN(n=2))
    assert pol.refresh
    gen = torch.Generator().manual_seed(8)
    keys = [torch.randn(1, 4, L, 16, generator=gen) for _ in range(2)]
    pol.reset(SPEC, 1)
    for layer in range(2):
        pol.prefill(prefill_obs(layer, torch.randn(1, 8, 1, 16, generator=gen), keys[layer]))
    layer, view = 0, LayerCache.dense(keys[0])

    def step(at: int, tokens: int = 1) -> list:
        obs = Observation(
            phase=Phase.DECODE, layer=layer, queries=torch.randn(1, 8, tokens, 16, generator=gen),
            query_positions=torch.arange(L + at, L + at + tokens), cache=view, prompt_length=L, step=at,
            offloaded=lambda heads: LayerCache.dense(keys[layer][:, list(heads)]),
        )  # fmt: skip
        return list(pol.decode(obs))

    assert step(0) == []  # buffered: half a window
    (refresh,) = step(1, tokens=4)  # the question
    assert isinstance(refresh, Recall) and refresh.heads == (1, 3)  # every compressed head, from the host
    assert step(5) == []
    (recall,) = step(6)
    assert isinstance(recall, Recall) and recall.heads == (1,)
