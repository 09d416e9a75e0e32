"""HeteroCache's recall sets (``policy.satellites.satellite_sets``), several pivots at once:
the default mode, from one ranking per pivot, equals a top-k per satellite; the faithful
mode equals the reference rule (the first l_i of the top-max(l) candidates by position)."""

import pytest
import torch

from hcpolicy.policy.satellites import satellite_sets
from hcpolicy.scores import topk_selection

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]  # fmt: skip


def cases(seed: int, trials: int, device: str):
    """(scores [P, B, L], positions [B, L], budgets [P, B, S], width), ``trials`` of them."""
    gen = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        yield case(trial, gen, device)


def case(trial: int, gen: torch.Generator, device: str):
    p, b, s, length = 1 + trial % 4, 1 + trial % 3, 1 + trial % 6, 1 + (trial * 37) % 4000
    if trial % 3 == 0:  # many ties: they go to the lower index either way
        scores = torch.randint(0, 4, (p, b, length), generator=gen).float()
    else:
        scores = torch.rand(p, b, length, generator=gen)
    positions = torch.sort(torch.randperm(3 * length, generator=gen)[:length]).values.expand(b, length)
    budgets = torch.randint(0, length + 3, (p, b, s), generator=gen)
    budgets[0, :, s // 2 + 1 :] = 0  # the first pivot has fewer satellites: padded budgets
    return scores.to(device), positions.to(device).contiguous(), budgets.to(device), int(budgets.max())


@pytest.mark.parametrize("ascending", [False, True], ids=["sorts", "select"])
@pytest.mark.parametrize("device", DEVICES)
def test_satellite_sets_equal_a_topk_per_satellite(device, ascending):
    for scores, positions, budgets, width in cases(0, 60, device):
        p, b, s = budgets.shape
        indices, lengths = satellite_sets(scores, positions, budgets, width, faithful=False, ascending=ascending)
        for i in range(p):
            expand = scores[i].unsqueeze(1).expand(b, s, -1)
            want = topk_selection(expand, budgets[i], positions.unsqueeze(1).expand(b, s, -1), width=width)
            assert torch.equal(indices[i], want.indices) and torch.equal(lengths[i], want.lengths)


@pytest.mark.parametrize("device", DEVICES)
def test_faithful_sets_are_the_first_of_the_widest_candidates(device):
    for scores, positions, budgets, width in cases(1, 30, device):
        p, b, s = budgets.shape
        indices, lengths = satellite_sets(scores, positions, budgets, width, faithful=True)
        length = scores.shape[-1]
        for i in range(p):
            for j in range(b):
                widest = min(int(budgets[i, j].max()), length)
                top = torch.sort(scores[i, j], descending=True, stable=True).indices[:widest]
                cand = torch.sort(positions[j][top]).values  # the candidates by position
                for k in range(s):
                    n = min(int(budgets[i, j, k]), length)
                    assert int(lengths[i, j, k]) == n
                    assert torch.equal(indices[i, j, k, :n], cand[:n])
