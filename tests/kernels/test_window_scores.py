"""window_scores and overlap_counts: the torch path against the policy's own scoring
(softmax over the keys, group reduce, pool1d), and their errors. The Triton kernels are
compared with this path under the interpreter in tests/torch_engine/test_device_monitor.py
and on the GPU through the engine (tests/torch_engine/test_gpu.py)."""

import math

import pytest
import torch

from hcpolicy.kernels.window_scores import overlap_counts, window_scores
from hcpolicy.scores import group_reduce, pool1d


def tiles_of(logits: torch.Tensor, tile: int) -> torch.Tensor:
    """Per tile (max, sum of exp2(logit - max)): [R, G, L] -> [R, G, T, 2]."""
    n = logits.shape[-1]
    t = -(-n // tile)
    padded = torch.nn.functional.pad(logits, (0, t * tile - n), value=float("-inf")).unflatten(-1, (t, tile))
    top = padded.amax(-1)
    return torch.stack([top, torch.exp2(padded - top[..., None]).sum(-1)], dim=-1)


@pytest.mark.parametrize("gqa", ["max", "mean", "sum"])
@pytest.mark.parametrize("pool", [1, 5])
def test_window_scores_are_pooled_softmax_rows(gqa, pool):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 203, generator=gen, dtype=torch.float64).float() * 3  # base-2 logits
    got = window_scores(logits, tiles_of(logits, 16), gqa, pool)
    probs = torch.softmax(logits.double() * math.log(2), dim=-1)  # exp2(s) / sum exp2
    want = pool1d(group_reduce(probs, 1, gqa)[:, 0], pool)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-12)


def test_window_scores_errors():
    logits = torch.zeros(2, 4, 10)
    with pytest.raises(ValueError, match=r"\[R, G, L\]"):
        window_scores(logits[0], tiles_of(logits, 4)[0], "max", 5)
    with pytest.raises(ValueError, match="float32"):
        window_scores(logits.double(), tiles_of(logits, 4).double(), "max", 5)
    with pytest.raises(ValueError, match="gqa"):
        window_scores(logits, tiles_of(logits, 4), "median", 5)
    with pytest.raises(ValueError, match="odd"):
        window_scores(logits, tiles_of(logits, 4), "max", 4)
    with pytest.raises(ValueError, match="out must be"):
        window_scores(logits, tiles_of(logits, 4), "max", 5, out=torch.empty(2, 9))


def test_overlap_counts_cycle_the_masks():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 5.0, 5.0, 1.0], [4.0, 4.0, 4.0, 4.0]])
    masks = torch.tensor([[True, False, True, True]])  # every row against the one mask
    got = overlap_counts(scores, torch.tensor([2.0, 5.0, 4.0]), masks)
    assert got.tolist() == [[1, 2], [0, 1], [0, 3]]
    with pytest.raises(ValueError, match="M dividing R"):
        overlap_counts(scores, torch.zeros(3), torch.zeros(2, 4, dtype=torch.bool))
