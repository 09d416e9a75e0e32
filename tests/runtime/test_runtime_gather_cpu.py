"""The triton zero-copy path's host logic on the CPU (see ``gather_cases``), and the
kernel itself under Triton's interpreter where triton is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gather_cases import reference_gather_rows, run_triton_path_on_cpu

from hcpolicy.runtime.plan import RecallRequest, request_table
from hcpolicy.runtime.store import HostBlock


@pytest.mark.parametrize("seed", range(60))
def test_triton_path_places_every_row(seed: int) -> None:
    run_triton_path_on_cpu(reference_gather_rows, seed)


def test_request_table_counts_words_from_the_window_and_the_lowest_out() -> None:
    arena = torch.zeros(4096, dtype=torch.uint8)
    a = HostBlock("a", arena[64:64 + 10 * 32], torch.uint8, (32,), 10)
    b = HostBlock("b", arena[1024:1024 + 5 * 32], torch.uint8, (32,), 5)
    outs = torch.zeros(100, 32, dtype=torch.uint8)
    reqs = [RecallRequest(b, torch.tensor([1, 2]), outs[10:12]), RecallRequest(a, torch.tensor([0, 9, 3]), outs[2:5])]
    ptrs = [r.out.data_ptr() for r in reqs]
    table = request_table(reqs, ptrs, arena.data_ptr() + 64, outs[2].data_ptr(), 8)
    assert table == [0, 2, (1024 - 64) // 8, 0, 8 * 32 // 8, 0]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (runs its interpreter)")
def test_triton_kernel_under_the_interpreter_matches_the_reference() -> None:
    """The real kernel, interpreted on the CPU: several tile shapes and grids."""
    here = Path(__file__).parent
    code = (
        "from gather_cases import run_triton_path_on_cpu\n"
        "from hcpolicy.runtime._triton_gather import gather_rows\n"
        "for seed in range(12):\n"
        "    for ctas, warps, tile in ((3, 4, 64), (1, 1, 2), (64, 8, 4096)):\n"
        "        run_triton_path_on_cpu(gather_rows, seed, ctas, warps, tile)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
