"""``kernels.compact.top_positions``: each row's top-n as ascending positions, against a
sort-based top-n (ties to the lower index), on CPU, under Triton's interpreter and on CUDA;
input errors."""

import importlib.util

import pytest
import torch
from interpreted import run_interpreted

from hcpolicy.kernels.compact import top_positions


def sorted_top(x: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor, group: int, width: int):
    """[Q * group, width]: row r's top lengths[r] of x[r // group] by a stable sort, as ascending positions."""
    out = torch.zeros(lengths.numel(), width, dtype=torch.int64)
    for r, n in enumerate(lengths.tolist()):
        q = r // group
        order = torch.sort(x[q].cpu(), descending=True, stable=True).indices[:n]
        out[r, :n] = positions[q % positions.shape[0]].cpu()[order].sort().values
    return out


def case(seed: int, length: int, device: str = "cpu"):
    """Q = 6 score rows (two of many ties, one all zero), B = 2, group 3, lengths from 0 to L."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(6, length, generator=gen)
    x[1] = torch.randint(0, 3, (length,), generator=gen).float() / 4  # long runs of ties
    x[4] = 0.0
    x[5, : length // 2] = x[5, 0]
    positions = torch.sort(torch.randperm(4 * length, generator=gen)[: 2 * length].view(2, length)).values
    lengths = torch.randint(0, length + 1, (18,), generator=gen)
    lengths[:3] = torch.tensor([0, length, 1])
    width = int(lengths.max())
    return x.to(device), lengths.to(device), positions.to(device), width


@pytest.mark.parametrize("length", [1, 5, 1000, 5000])
def test_equals_a_sorted_topn(length: int) -> None:
    x, lengths, positions, width = case(length, length)
    got = top_positions(x, lengths, positions, 3, width)
    assert torch.equal(got, sorted_top(x, lengths, positions, 3, width))


def test_expanded_positions_and_width_past_every_length() -> None:
    x, lengths, _, width = case(3, 700)
    positions = torch.arange(700).expand(2, 700)  # a view with stride 0, as the engine passes
    got = top_positions(x, lengths, positions, 3, 700)
    assert torch.equal(got, sorted_top(x, lengths, positions, 3, 700))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.rand(2, 5, dtype=torch.float64), torch.ones(2, dtype=torch.int64), torch.arange(5)[None], 1, 2),
         "float32"),
        ((torch.rand(2, 5), torch.ones(2, dtype=torch.int64), torch.arange(4)[None], 1, 2), "positions"),
        ((torch.rand(3, 5), torch.ones(3, dtype=torch.int64), torch.arange(10).view(2, 5), 1, 2), "positions"),
        ((torch.rand(2, 5), torch.ones(3, dtype=torch.int64), torch.arange(5)[None], 1, 2), "lengths"),
        ((torch.rand(2, 5), torch.ones(2, dtype=torch.int64), torch.arange(5)[None], 1, 6), "width"),
    ],
)  # fmt: skip
def test_bad_inputs_raise(args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        top_positions(*args)


INTERPRETER_SCRIPT = r"""
import json, torch
from hcpolicy.kernels import _compact_triton
from hcpolicy.kernels.compact import top_positions_reference
from hcpolicy.kernels.select import kth_largest_reference
_compact_triton.BLOCK = 256  # several tiles a row: counts carried across programs
gen = torch.Generator().manual_seed(0)
x = torch.rand(4, 1000, generator=gen)
x[1] = torch.randint(0, 3, (1000,), generator=gen).float() / 4
x[3, 100:900] = 0.5
positions = torch.sort(torch.randperm(3000, generator=gen)[:2000].view(2, 1000)).values
lengths = torch.tensor([0, 1000, 3, 999, 512, 257, 40, 700, 1, 600, 256, 800])
rows = x.repeat_interleave(3, 0)
kth = kth_largest_reference(rows, lengths.clamp(min=1))
values = torch.where(lengths > 0, kth.values, float("inf"))
got = _compact_triton.top_positions_triton(x, values, kth.ties, lengths, positions, 3, 1000)
ref = top_positions_reference(rows, values, kth.ties, lengths, positions, 3, 1000)
print("RESULTS " + json.dumps(bool(torch.equal(got, ref))))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_triton_kernels_under_interpreter() -> None:
    assert run_interpreted(INTERPRETER_SCRIPT, timeout=300)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [7, 5000, 224 * 1024])
def test_cuda_equals_a_sorted_topn(length: int) -> None:
    x, lengths, positions, width = case(length, length, "cuda")
    got = top_positions(x, lengths, positions, 3, width)
    assert torch.equal(got.cpu(), sorted_top(x, lengths, positions, 3, width))
