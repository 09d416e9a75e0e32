"""Each baseline's choices against a plain reference written here with loops (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from hcpolicy.actions import Attend, Select
from hcpolicy.budget import PyramidAllocator
from hcpolicy.observe import LayerCache, Observation, Phase
from hcpolicy.policy.baselines import H2O, AdaSnapKV, FullKV, PyramidKV, SnapKV, StreamingLLM
from hcpolicy.policy.quest import Quest, page_scores
from hcpolicy.reference import simulate
from hcpolicy.spec import ModelSpec

SMALL = ModelSpec(architecture="synthetic", num_layers=1, num_query_heads=4, num_kv_heads=2, head_dim=8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prefill_obs(spec: ModelSpec, length: int, window: int | None, seed: int = 0, batch: int = 1) -> Observation:
    """A dense prompt cache and its last ``window`` queries (None = all)."""
    gen = _gen(seed)
    keys = torch.randn(batch, spec.num_kv_heads, length, spec.head_dim, generator=gen)
    queries = torch.randn(batch, spec.num_query_heads, length, spec.head_dim, generator=gen)
    q = length if window is None else window
    return Observation(
        phase=Phase.PREFILL,
        layer=0,
        queries=queries[:, :, length - q :],
        query_positions=torch.arange(length - q, length),
        cache=LayerCache.dense(keys, keys.clone()),
        prompt_length=length,
    )


def run_prefill(policy, spec: ModelSpec, obs: Observation) -> Select:
    policy.reset(spec, obs.cache.batch_size)
    (action,) = policy.prefill(obs)
    assert isinstance(action, Select)
    return action


def naive_attention(obs: Observation, b: int, hq: int) -> list[list[float]]:
    """Softmax rows [Q][L] of one query head over its KV head, causal on positions."""
    g = obs.queries.shape[1] // obs.cache.num_kv_heads
    h = hq // g
    d = obs.queries.shape[-1]
    n = int(obs.cache.lengths[b, h])
    rows = []
    for i, qpos in enumerate(obs.query_positions.tolist()):
        q = obs.queries[b, hq, i].double()
        logits = []
        for j in range(n):
            if int(obs.cache.positions[b, h, j]) <= qpos:
                logits.append(float(q @ obs.cache.keys[b, h, j].double()) / math.sqrt(d))
            else:
                logits.append(-math.inf)
        top = max(logits)
        exps = [math.exp(x - top) if x > -math.inf else 0.0 for x in logits]
        rows.append([e / sum(exps) for e in exps])
    return rows


def top_positions(scores: list[float], positions: list[int], k: int) -> list[int]:
    """Positions of the k highest scores (ties to the lower index), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return sorted(positions[i] for i in order)


# -- FullKV, StreamingLLM ----------------------------------------------------------------------
def test_full_keeps_everything():
    cache, log, _ = simulate(FullKV(), SMALL, prompt_length=20, decode_steps=2)
    assert all(actions == [] for actions in log)
    assert cache.device_tokens() == SMALL.num_kv_heads * 22


@pytest.mark.parametrize(("sinks", "compression"), [(4, 0.25), (0, 0.25), (20, 0.25), (4, 1.0)])
def test_streamingllm_keeps_sinks_and_recent(sinks, compression):
    length = 64
    obs = prefill_obs(SMALL, length, window=1, batch=2)
    action = run_prefill(StreamingLLM(sinks=sinks, compression=compression), SMALL, obs)
    budget = round(compression * length)
    n_sinks = min(sinks, budget)
    expected = list(range(n_sinks)) + list(range(length - (budget - n_sinks), length))
    for rows in action.selection.as_lists():
        for kept in rows:
            assert kept == expected


def test_streamingllm_follows_positions_not_slots():
    # a ragged cache whose entries are not 0..L-1: sinks and recency are by logical position
    positions = torch.tensor([[[0, 1, 5, 9, 12, 30, 31, 40], [2, 3, 4, 6, 7, 8, 0, 0]]])
    lengths = torch.tensor([[8, 6]])
    keys = torch.randn(1, 2, 8, 8)
    obs = Observation(
        phase=Phase.PREFILL,
        layer=0,
        queries=torch.randn(1, 4, 1, 8),
        query_positions=torch.tensor([41]),
        cache=LayerCache(keys=keys, positions=positions, lengths=lengths),
        prompt_length=42,
    )
    spec = ModelSpec(architecture="synthetic", num_layers=1, num_query_heads=4, num_kv_heads=2, head_dim=8)
    action = run_prefill(StreamingLLM(sinks=3, compression=5 / 42), spec, obs)  # budget round(5) = 5
    # sinks are positions 0..2 where present (0, 1 | 2), the rest the highest positions
    assert action.selection.as_lists() == [[[0, 1, 30, 31, 40], [2, 4, 6, 7, 8]]]


# -- H2O ------------------------------------------------------------------------------------------
def naive_h2o_scores(obs: Observation) -> list[list[list[float]]]:
    b_size, h_q = obs.queries.shape[:2]
    h_kv = obs.cache.num_kv_heads
    g = h_q // h_kv
    out = []
    for b in range(b_size):
        per_head = []
        for h in range(h_kv):
            acc = [0.0] * int(obs.cache.lengths[b, h])
            for hq in range(h * g, (h + 1) * g):
                for row in naive_attention(obs, b, hq):
                    acc = [a + w / g for a, w in zip(acc, row)]
            per_head.append(acc)
        out.append(per_head)
    return out


@pytest.mark.parametrize("recent", [0.5, 0.0, 1.0, 0.3])
def test_h2o_heavy_hitters_and_recent(recent):
    length, compression = 24, 0.5
    obs = prefill_obs(SMALL, length, window=None, seed=1)
    policy = H2O(compression=compression, recent=recent, chunk=5)  # chunks of 5: 24 is not a multiple
    assert policy.requirements().query_window is None
    scores = naive_h2o_scores(obs)
    want = torch.tensor(scores, dtype=torch.float64)
    torch.testing.assert_close(policy.score(obs).double(), want, atol=1e-5, rtol=1e-5)
    action = run_prefill(policy, SMALL, obs)
    budget = round(compression * length)
    n_recent = int(recent * budget)
    for h, kept in enumerate(action.selection.as_lists()[0]):
        heavy = top_positions(scores[0][h][: length - n_recent], list(range(length - n_recent)), budget - n_recent)
        assert kept == heavy + list(range(length - n_recent, length))


# -- SnapKV family ----------------------------------------------------------------------------------
def naive_snapkv_scores(obs: Observation, window: int, kernel: int, pooling: str, gqa: str) -> list[list[float]]:
    """One sequence: [H_kv][L] with +inf on the window and pooling over the prefix only."""
    h_q, h_kv = obs.queries.shape[1], obs.cache.num_kv_heads
    g = h_q // h_kv
    length = obs.cache.keys.shape[2]
    prefix = length - window
    out = []
    for h in range(h_kv):
        per_q = []
        for hq in range(h * g, (h + 1) * g):
            rows = naive_attention(obs, 0, hq)
            per_q.append([sum(row[j] for row in rows) for j in range(length)])
        if gqa == "mean":
            votes = [sum(col) / g for col in zip(*per_q)]
        elif gqa == "max":
            votes = [max(col) for col in zip(*per_q)]
        else:
            votes = [sum(col) for col in zip(*per_q)]
        pooled = []
        for i in range(prefix):
            near = votes[max(0, i - kernel // 2) : min(prefix, i + kernel // 2 + 1)]
            pooled.append(sum(near) / len(near) if pooling == "avg" else max(near))
        out.append(pooled + [math.inf] * window)
    return out


@pytest.mark.parametrize(
    ("kernel", "pooling", "gqa"), [(7, "avg", "mean"), (3, "max", "max"), (1, "avg", "sum"), (5, "avg", "max")]
)
def test_snapkv_window_votes_pooling_and_window_kept(kernel, pooling, gqa):
    length, window, compression = 40, 6, 0.4
    obs = prefill_obs(SMALL, length, window=window, seed=2)
    policy = SnapKV(compression=compression, window=window, kernel=kernel, pooling=pooling, gqa=gqa)
    assert policy.requirements().query_window == window
    expected = naive_snapkv_scores(obs, window, kernel, pooling, gqa)
    got = policy.score(obs)[0].double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    action = run_prefill(policy, SMALL, obs)
    budget = round(compression * length)
    for h, kept in enumerate(action.selection.as_lists()[0]):
        assert kept[-window:] == list(range(length - window, length))
        assert kept == top_positions(expected[h], list(range(length)), budget)


def test_pyramidkv_budgets_fall_over_layers_and_average_to_compression():
    spec = ModelSpec(architecture="synthetic", num_layers=6, num_query_heads=4, num_kv_heads=2, head_dim=8)
    length, compression = 80, 0.3
    _, log, _ = simulate(PyramidKV(compression=compression, window=4), spec, batch_size=2, prompt_length=length,
                         decode_steps=0)
    budgets = []
    for (action,) in log:
        lengths = action.selection.lengths
        assert lengths.shape == (2, spec.num_kv_heads)
        assert (lengths == lengths[0, 0]).all()  # one budget per layer
        budgets.append(int(lengths[0, 0]))
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert budgets[-1] == round(compression * length / PyramidAllocator().beta)
    assert abs(sum(budgets) - compression * length * spec.num_layers) <= spec.num_layers / 2


def test_adasnapkv_budgets_share_the_layer_total_with_a_safeguard():
    spec = ModelSpec(architecture="synthetic", num_layers=2, num_query_heads=8, num_kv_heads=4, head_dim=8)
    length, compression, window = 64, 0.25, 4
    policy = AdaSnapKV(compression=compression, window=window)
    safeguard = policy.allocator.safeguard
    per_head = round(compression * length)
    for layer in range(spec.num_layers):
        obs = prefill_obs(spec, length, window=window, seed=10 + layer, batch=2)
        obs = Observation(phase=obs.phase, layer=layer, queries=obs.queries, query_positions=obs.query_positions,
                          cache=obs.cache, prompt_length=length)
        action = run_prefill(policy, spec, obs)
        budgets = action.selection.lengths.tolist()
        scores = policy.score(obs).double().tolist()  # checked against the naive SnapKV above
        for b, row in enumerate(budgets):
            assert sum(row) == per_head * spec.num_kv_heads
            assert min(row) >= math.floor(safeguard * per_head)
            # past each head's guaranteed share, the layer keeps its globally highest scores
            extra_kept, dropped = [], []
            for h, n in enumerate(row):
                ranked = sorted(scores[b][h], reverse=True)
                extra_kept += ranked[math.floor(safeguard * per_head) : n]
                dropped += ranked[n:]
                assert action.selection.as_lists()[b][h] == top_positions(scores[b][h], list(range(length)), n)
            assert min(extra_kept) >= max(dropped)
        assert len({n for row in budgets for n in row}) > 1  # heads really differ


# -- Quest ---------------------------------------------------------------------------------------
def ragged_cache(seed: int) -> LayerCache:
    """Batch 2, 3 KV heads with 37/20/50 and 1/16/17 entries at scattered positions."""
    gen = _gen(seed)
    lengths = torch.tensor([[37, 20, 50], [1, 16, 17]])
    width, d = 50, 8
    keys = torch.randn(2, 3, width, d, generator=gen)
    positions = torch.zeros(2, 3, width, dtype=torch.int64)
    for b in range(2):
        for h in range(3):
            n = int(lengths[b, h])
            positions[b, h, :n] = torch.randperm(80, generator=gen)[:n].sort().values
    return LayerCache(keys=keys, positions=positions, lengths=lengths, values=keys.clone())


def naive_page_scores(q: torch.Tensor, cache: LayerCache, page: int) -> list[list[list[float]]]:
    """[B][H_kv][pages] with the max over each group's query heads."""
    b_size, h_q, d = q.shape
    g = h_q // cache.num_kv_heads
    out = []
    for b in range(b_size):
        per_head = []
        for h in range(cache.num_kv_heads):
            n = int(cache.lengths[b, h])
            scores = []
            for start in range(0, n, page):
                entries = range(start, min(start + page, n))
                best = -math.inf
                for hq in range(h * g, (h + 1) * g):
                    total = 0.0
                    for k in range(d):
                        lo = min(float(cache.keys[b, h, e, k]) for e in entries)
                        hi = max(float(cache.keys[b, h, e, k]) for e in entries)
                        qd = float(q[b, hq, k])
                        total += max(qd * lo, qd * hi)
                    best = max(best, total)
                scores.append(best)
            per_head.append(scores)
        out.append(per_head)
    return out


@pytest.mark.parametrize(("compression", "page"), [(0.5, 16), (0.25, 4), (0.1, 8), (1.0, 16)])
def test_quest_page_scores_and_chosen_pages(compression, page):
    cache = ragged_cache(seed=4)
    q = torch.randn(2, 6, 8, generator=_gen(5))  # G = 2
    naive = naive_page_scores(q, cache, page)
    got = page_scores(q, cache, page)  # [B, H_kv, N]
    for b in range(2):
        for h in range(3):
            n_pages = len(naive[b][h])
            want = torch.tensor(naive[b][h], dtype=torch.float64)
            torch.testing.assert_close(got[b, h, :n_pages].double(), want, atol=1e-4, rtol=1e-5)
            assert torch.isneginf(got[b, h, n_pages:]).all()

    policy = Quest(compression=compression, page_size=page)
    spec = ModelSpec(architecture="synthetic", num_layers=1, num_query_heads=6, num_kv_heads=3, head_dim=8)
    policy.reset(spec, 2)
    obs = Observation(phase=Phase.DECODE, layer=0, queries=q.unsqueeze(2), query_positions=torch.tensor([80]),
                      cache=cache, prompt_length=60, step=0)
    (action,) = policy.decode(obs)
    assert isinstance(action, Attend)
    chosen = action.selection.as_lists()
    for b in range(2):
        for h in range(3):
            n = int(cache.lengths[b, h])
            positions = cache.positions[b, h, :n].tolist()
            newest = (n - 1) // page
            others = [p for p in range(len(naive[b][h])) if p != newest]
            others.sort(key=lambda p: (-naive[b][h][p], p))
            room = max(0, math.floor(compression * n) - (n - newest * page)) // page  # full pages that fit
            pages = sorted([newest] + others[:room])
            expected = [positions[e] for p in pages for e in range(p * page, min(p * page + page, n))]
            assert chosen[b][h] == expected, (b, h)


def test_quest_evicts_nothing_and_needs_reset():
    policy = Quest()
    assert policy.requirements().decode_observations and policy.requirements().actions == {Attend}
    cache, log, _ = simulate(policy, SMALL, prompt_length=40, decode_steps=2)
    assert log[0] == []  # prefill: no eviction
    assert cache.device_tokens() == SMALL.num_kv_heads * 42
    fresh = Quest()
    obs = Observation(phase=Phase.DECODE, layer=0, queries=torch.randn(1, 4, 1, 8), query_positions=torch.tensor([3]),
                      cache=LayerCache.dense(torch.randn(1, 2, 4, 8)), prompt_length=3)
    with pytest.raises(RuntimeError, match="reset"):
        fresh.decode(obs)


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (StreamingLLM, {"sinks": -1}),
        (H2O, {"recent": 2.0}),
        (H2O, {"chunk": 0}),
        (SnapKV, {"window": 0}),
        (SnapKV, {"kernel": 6}),
        (SnapKV, {"pooling": "median"}),
        (PyramidKV, {"gqa": "avg"}),
        (AdaSnapKV, {"compression": 0.0}),
        (Quest, {"page_size": 0}),
        (Quest, {"compression": 1.01}),
    ],
)
def test_bad_options(cls, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        cls(**options)


def test_first_docstring_lines_are_one_liners():
    for cls in (FullKV, StreamingLLM, H2O, SnapKV, PyramidKV, AdaSnapKV, Quest):
        first = cls.__doc__.strip().splitlines()[0]
        assert first.endswith(".") and len(first) <= 100, cls


def test_snapkv_votes_with_its_window_even_when_handed_more_queries():
    length, window = 30, 5
    policy = SnapKV(compression=0.5, window=window)
    every = prefill_obs(SMALL, length, window=None, seed=6)
    last = prefill_obs(SMALL, length, window=window, seed=6)
    assert torch.equal(policy.score(every), policy.score(last))
