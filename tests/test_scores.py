"""hcpolicy.scores against naive float64 loops and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcpolicy.observe import LayerCache
from hcpolicy.scores import attention_weights, group_reduce, overlap, pool1d, topk_selection, topk_sets


def ragged_cache(gen: torch.Generator) -> LayerCache:
    """B=2, H_kv=2, padded to 7 entries; scattered ascending positions; padding holds junk."""
    keys = torch.randn(2, 2, 7, 4, generator=gen)
    positions = torch.tensor(
        [[[0, 2, 3, 7, 9, 11, 99], [1, 4, 5, 6, 99, 99, 99]], [[3, 4, 5, 6, 7, 8, 10], [0, 1, 99, 99, 99, 99, 99]]]
    )
    lengths = torch.tensor([[6, 4], [7, 2]])
    return LayerCache(keys=keys, positions=positions, lengths=lengths)


def naive_weights(queries: torch.Tensor, qpos: list[int], cache: LayerCache) -> torch.Tensor:
    b_size, h_q, q_len, d = queries.shape
    g = h_q // cache.num_kv_heads
    out = torch.zeros(b_size, h_q, q_len, cache.keys.shape[2], dtype=torch.float64)
    for b in range(b_size):
        for hq in range(h_q):
            h = hq // g
            for i in range(q_len):
                allowed = [
                    j for j in range(int(cache.lengths[b, h])) if int(cache.positions[b, h, j]) <= qpos[i]
                ]
                if not allowed:
                    continue
                logits = torch.tensor(
                    [float(queries[b, hq, i].double() @ cache.keys[b, h, j].double()) / math.sqrt(d) for j in allowed],
                    dtype=torch.float64,
                )
                w = torch.exp(logits - logits.max())
                for j, x in zip(allowed, (w / w.sum()).tolist()):
                    out[b, hq, i, j] = x
    return out


@pytest.mark.parametrize("chunk", [1024, 2])
def test_attention_weights_match_naive_causal_softmax(chunk):
    gen = torch.Generator().manual_seed(0)
    cache = ragged_cache(gen)
    queries = torch.randn(2, 4, 5, 4, generator=gen)  # G = 2
    qpos = [0, 2, 4, 8, 12]  # 0 sees nothing on some heads; 12 sees every entry
    got = attention_weights(queries, torch.tensor(qpos), cache, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (2, 4, 5, 7)
    torch.testing.assert_close(got.double(), naive_weights(queries, qpos, cache), atol=1e-6, rtol=1e-5)
    assert (got[0, 0:2, 0, 1:] == 0).all()  # future keys get weight 0
    assert (got[0, 2:4, 0] == 0).all()  # no key at or before position 0 on head 1: an all-zero row


def test_group_reduce():
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)  # H_q = 6, H_kv = 2, G = 3
    for how, fold in (("mean", lambda t: sum(t) / 3), ("max", max), ("sum", sum)):
        got = group_reduce(x, 2, how)
        assert got.shape == (2, 2, 3)
        for b in range(2):
            for h in range(2):
                for j in range(3):
                    assert float(got[b, h, j]) == pytest.approx(fold([float(x[b, h * 3 + i, j]) for i in range(3)]))
    with pytest.raises(ValueError, match="unknown reduction"):
        group_reduce(x, 2, "median")


def test_pool1d_edges_and_options():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # the window shrinks at the edges rather than counting zero padding
    torch.testing.assert_close(pool1d(x, 3), torch.tensor([1.5, 2.0, 3.0, 4.0, 4.5]))
    torch.testing.assert_close(pool1d(x, 5), torch.tensor([2.0, 2.5, 3.0, 3.5, 4.0]))
    torch.testing.assert_close(pool1d(-x, 3, "max"), torch.tensor([-1.0, -1.0, -2.0, -3.0, -4.0]))
    assert pool1d(x, 1) is x
    batch = torch.stack([x, 2 * x]).view(2, 1, 5)  # leading dims are independent rows
    torch.testing.assert_close(pool1d(batch, 3)[1, 0], 2 * torch.tensor([1.5, 2.0, 3.0, 4.0, 4.5]))
    with pytest.raises(ValueError, match="odd"):
        pool1d(x, 4)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool1d(x, 3, "median")


def test_pool1d_mask_acts_like_an_edge():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0, 5.0, float("inf")])
    mask = torch.tensor([True, True, True, False, True, False])
    torch.testing.assert_close(pool1d(x, 3, mask=mask), torch.tensor([1.5, 2.0, 2.5, 100.0, 5.0, float("inf")]))
    torch.testing.assert_close(pool1d(x, 3, "max", mask=mask), torch.tensor([2.0, 3.0, 3.0, 100.0, 5.0, float("inf")]))
    full = torch.ones(6, dtype=torch.bool)
    y = torch.randn(3, 6)
    torch.testing.assert_close(pool1d(y, 5, mask=full), pool1d(y, 5))


def test_topk_selection_ragged_budgets_ties_and_positions():
    scores = torch.tensor([[[5.0, 1.0, 5.0, 3.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 9.0]]])
    positions = torch.tensor([[[10, 11, 12, 13, 14], [0, 3, 6, 9, 12], [2, 4, 6, 8, 0]]])
    valid = torch.tensor([[[True] * 5, [True] * 5, [True, True, True, True, False]]])
    budgets = torch.tensor([[2, 3, 9]])  # 9 > 4 valid entries: clamped
    sel = topk_selection(scores, budgets, positions, valid)
    assert sel.lengths.tolist() == [[2, 3, 4]]
    assert sel.indices.shape == (1, 3, 4)  # padded to the largest (clamped) budget
    # ties go to the lower index: the first two 5.0s, the first three zeros
    assert sel.as_lists() == [[[10, 12], [0, 3, 6], [2, 4, 6, 8]]]


def test_topk_selection_zero_budget():
    sel = topk_selection(torch.randn(2, 2, 4), torch.zeros(2, 2, dtype=torch.int64), torch.arange(4).expand(2, 2, 4))
    assert sel.lengths.tolist() == [[0, 0], [0, 0]] and sel.indices.shape == (2, 2, 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_topk_selection_matches_a_sorted_list(length, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (2, 3, length), generator=gen).float()  # many ties
    budgets = torch.randint(0, length + 2, (2, 3), generator=gen)
    positions = torch.randperm(100, generator=gen)[:length].expand(2, 3, length)
    sel = topk_selection(scores, budgets, positions)
    for b in range(2):
        for h in range(3):
            row = scores[b, h].tolist()
            order = sorted(range(length), key=lambda i: (-row[i], i))[: min(int(budgets[b, h]), length)]
            assert sel.as_lists()[b][h] == sorted(int(positions[b, h, i]) for i in order)


def test_overlap_on_hand_made_sets():
    a = torch.tensor([1, 2, 3])
    assert float(overlap(a, torch.tensor([2, 3, 4, 5]), 8)) == pytest.approx(2 / 3)
    assert float(overlap(a, torch.tensor([3, 1, 2]), 8)) == 1.0
    assert float(overlap(a, torch.tensor([0, 7]), 8)) == 0.0
    assert float(overlap(a, torch.tensor([3, 5]), 8)) == 0.5  # min(|A|, |B|) = 2
    # leading dims broadcast: one reference set against two others
    got = overlap(torch.tensor([[0, 1]]), torch.tensor([[[0, 5], [1, 0]]]), 6)
    assert got.tolist() == [[0.5, 1.0]]


def test_topk_sets():
    x = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert sorted(topk_sets(x, 2)[0].tolist()) == [1, 3]
    assert topk_sets(x, 10).shape == (1, 4)  # k larger than L: every index
