"""Allocators against hand-computed budgets and the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from hcpolicy.budget import (
    AdaAllocator,
    BudgetRequest,
    InverseStabilityAllocator,
    PyramidAllocator,
    UniformAllocator,
    sequence_budgets,
)
from hcpolicy.classify import build_profile
from hcpolicy.spec import ModelSpec


def spec(layers: int = 4, kv_heads: int = 3) -> ModelSpec:
    return ModelSpec(architecture="synthetic", num_layers=layers, num_query_heads=kv_heads * 2,
                     num_kv_heads=kv_heads, head_dim=8)


def request(s: ModelSpec, *, layer: int = 0, length: int = 100, compression: float = 0.5, **kw) -> BudgetRequest:
    return BudgetRequest(spec=s, layer=layer, length=length, compression=compression, **kw)


@pytest.mark.parametrize(
    ("length", "compression", "expected"), [(100, 0.333, 33), (10, 0.37, 4), (7, 1.0, 7), (3, 0.01, 0)]
)
def test_uniform_rounds_c_times_l(length, compression, expected):
    got = UniformAllocator().budgets(request(spec(), length=length, compression=compression, batch_size=2))
    assert got.dtype == torch.int64 and got.tolist() == [[expected] * 3] * 2


@pytest.mark.parametrize(
    ("compression", "length", "beta"), [(0.1, 1000, 20.0), (0.3, 97, 20.0), (0.6, 500, 4.0), (0.9, 64, 20.0)]
)
def test_pyramid_falls_linearly_and_averages_c_times_l(compression, length, beta):
    s = spec(layers=8)
    alloc = PyramidAllocator(beta=beta)
    per_layer = [int(alloc.budgets(request(s, layer=i, length=length, compression=compression))[0, 0])
                 for i in range(s.num_layers)]
    assert per_layer == sorted(per_layer, reverse=True)
    assert all(1 <= n <= length for n in per_layer)
    # each layer rounds by at most half a token
    assert sum(per_layer) / s.num_layers == pytest.approx(compression * length, abs=0.5)
    avg = compression * length
    if 2 * avg - avg / beta <= length:  # the unclamped shape: the last layer keeps avg / beta
        assert per_layer[-1] == max(1, round(avg / beta))
    else:  # the first layer is capped at L and the mean is kept
        assert per_layer[0] == length


def test_pyramid_keeps_everything_at_c_one_and_one_layer_keeps_c():
    s = spec(layers=5)
    for layer in range(5):
        assert PyramidAllocator().budgets(request(s, layer=layer, length=50, compression=1.0)).tolist() == [[50] * 3]
    one = spec(layers=1)
    assert PyramidAllocator().budgets(request(one, length=50, compression=0.3)).tolist() == [[15] * 3]


def test_ada_hand_example():
    s = spec(layers=1, kv_heads=2)
    scores = torch.tensor([[[10.0, 9.0, 8.0, 7.0], [1.0, 0.5, 0.2, 0.1]]])
    # per head 2 of 4, layer total 4; safeguard 0.5 -> each head keeps its best one, then
    # the two best of the rest (9 and 8) both belong to head 0
    got = AdaAllocator(safeguard=0.5).budgets(request(s, length=4, compression=0.5, scores=scores))
    assert got.tolist() == [[3, 1]]
    # no safeguard: all four go to head 0
    no_floor = AdaAllocator(safeguard=0.0).budgets(request(s, length=4, compression=0.5, scores=scores))
    assert no_floor.tolist() == [[4, 0]]


def test_ada_totals_and_safeguard_on_random_scores():
    s = spec(layers=1, kv_heads=4)
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 50, generator=gen) ** torch.tensor([1.0, 4.0, 8.0, 0.5]).view(1, 4, 1)
    for compression, safeguard in ((0.2, 0.2), (0.5, 0.0), (0.9, 1.0), (1.0, 0.2)):
        got = AdaAllocator(safeguard=safeguard).budgets(
            request(s, length=50, compression=compression, batch_size=3, scores=scores)
        )
        per_head = round(compression * 50)
        assert (got.sum(dim=1) == per_head * 4).all()
        assert (got >= math.floor(safeguard * per_head)).all() and (got <= 50).all()


def test_ada_needs_scores():
    with pytest.raises(ValueError, match="scores"):
        AdaAllocator().budgets(request(spec()))


def _profile(s: ModelSpec):
    # layer l: head 0 pivot with head 1 satellite, head 2 an anchor; layer 0's head 2 volatile
    stab = torch.tensor([[0.9, 0.6, 0.3], [0.8, 0.55, 0.95], [0.7, 0.5, 0.65], [0.99, 0.75, 0.6]], dtype=torch.float64)
    adjacency = torch.zeros(4, 3, 3, dtype=torch.bool)
    adjacency[:, 0, 1] = adjacency[:, 1, 0] = True
    return build_profile(s, stab, adjacency, tau_stable=0.5)


def test_inverse_stability_base_formula_and_clamp():
    s = spec()
    profile = _profile(s)
    h, f = 12, 5  # 4 pivots + 1 volatile
    assert (profile.total_heads, profile.num_full_heads) == (h, f)
    alloc = InverseStabilityAllocator(profile)
    for compression, length in ((0.5, 200), (0.9, 1000)):
        base = (compression * h - f) * length / (h - f)
        assert alloc.base(compression, length) == pytest.approx(base)
        clamped = 0
        for layer in range(4):
            got = alloc.budgets(request(s, layer=layer, length=length, compression=compression, batch_size=2))
            assert got.shape == (2, 3)
            for head, ratio in enumerate(profile.ratios[layer]):
                want = length if ratio is None else min(math.floor(base * ratio), length)
                clamped += ratio is not None and base * ratio > length
                assert got[:, head].tolist() == [want, want]
        if compression == 0.9:
            assert clamped > 0  # this case exercises the min(base * r, L) clamp


def test_inverse_stability_rejects_c_at_or_below_the_full_heads_share():
    profile = _profile(spec())
    alloc = InverseStabilityAllocator(profile)
    floor = 5 / 12
    for compression in (0.2, floor):
        with pytest.raises(ValueError, match=rf"compression > {floor:.4f}"):
            alloc.budgets(request(spec(), compression=compression))
    alloc.budgets(request(spec(), compression=floor + 1e-3))  # just above is fine


def test_inverse_stability_keeps_everything_at_c_one():
    s = spec()
    alloc = InverseStabilityAllocator(_profile(s))
    for layer in range(4):
        assert alloc.budgets(request(s, layer=layer, length=64, compression=1.0)).tolist() == [[64] * 3]


def test_request_validation():
    with pytest.raises(ValueError, match="layer"):
        request(spec(layers=2), layer=2)
    with pytest.raises(ValueError, match="compression"):
        request(spec(), compression=0.0)


def test_sequence_budgets_from_host_starts_equal_the_device_ones():
    """Host starts (ints) give what a starts tensor gives, and an allocator that reads no
    scores makes host budgets for ``batch_size`` sequences."""
    s = spec()
    alloc = InverseStabilityAllocator(_profile(s))
    scores = torch.rand(2, 3, 100)
    for starts in (torch.tensor([0, 30]), [0, 30]):
        got = sequence_budgets(alloc, s, 1, 0.5, 100, None, starts, batch_size=2)
        assert got.device.type == "cpu"
        assert torch.equal(got, sequence_budgets(alloc, s, 1, 0.5, 100, scores, torch.tensor([0, 30])))
    want = [alloc.budgets(request(s, layer=1, length=n)).tolist()[0] for n in (100, 70)]
    assert got.tolist() == want
    assert sequence_budgets(alloc, s, 1, 0.5, 100, None, None, batch_size=2).shape == (2, 3)


def test_a_sequence_that_is_all_padding_gets_no_budget():
    """A row of left padding alone has no prompt to budget: refused, not budgeted as if
    it were the whole prompt (what a backend that reads starts as 0 would do)."""
    s = spec()
    alloc = UniformAllocator()
    with pytest.raises(ValueError, match=r"sequence 1 of the batch is all padding \(it starts at 100 of a 100-token"):
        sequence_budgets(alloc, s, 0, 0.5, 100, None, [0, 100])
    assert sequence_budgets(alloc, s, 0, 0.5, 100, None, [0, 98]).tolist() == [[50] * 3, [1] * 3]
