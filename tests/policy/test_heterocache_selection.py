"""HeteroCache's recall selection (default mode) from one ranking equals a top-k per satellite."""

import pytest
import torch

from hcpolicy.classify import build_profile
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.scores import topk_selection
from hcpolicy.spec import ModelSpec

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]  # fmt: skip


def policy() -> HeteroCachePolicy:
    spec = ModelSpec("synthetic", num_layers=1, num_query_heads=8, num_kv_heads=4, head_dim=16)
    adj = torch.zeros(1, 4, 4, dtype=torch.bool)
    adj[0, 0, 1:3] = True
    return HeteroCachePolicy(profile=build_profile(spec, torch.tensor([[0.9, 0.6, 0.7, 0.3]]), adj, tau_stable=0.5),
                             compression=0.8)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_satellite_selection_equals_a_topk_per_satellite(device):
    pol = policy()
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        b, s, length = 1 + trial % 3, 1 + trial % 6, 1 + (trial * 37) % 4000
        if trial % 3 == 0:  # many ties: they go to the lower index either way
            scores = torch.randint(0, 4, (b, length), generator=gen).float()
        else:
            scores = torch.rand(b, length, generator=gen)
        positions = torch.sort(torch.randperm(3 * length, generator=gen)[:length]).values.expand(b, length)
        budgets = torch.randint(0, length + 3, (b, s), generator=gen)
        scores, positions, budgets = scores.to(device), positions.to(device).contiguous(), budgets.to(device)
        width = int(budgets.max())
        got = pol._satellite_selection(scores, budgets, positions, width)
        expand = scores.unsqueeze(1).expand(b, s, -1)
        want = topk_selection(expand, budgets, positions.unsqueeze(1).expand(b, s, -1), width=width)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.lengths, want.lengths)
