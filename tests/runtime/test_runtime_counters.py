"""Counters are exact on CPU."""

import attrs
import pytest
import torch

from hcpolicy.runtime import TransferCounters, TransferRuntime


def test_counters_count_exact_bytes_copies_and_gathers() -> None:
    rt = TransferRuntime("cpu")
    assert rt.counters() == TransferCounters()
    k = torch.randn(100, 2, 64).to(torch.bfloat16)  # rows of 256 bytes
    v = torch.randn(30, 3)  # rows of 12 bytes
    rt.offload("k", k)
    rt.offload("v", v)
    rt.recall("k", torch.arange(10, 26), torch.empty(16, 2, 64, dtype=torch.bfloat16))
    rt.recall_many([
        ("k", torch.tensor([1, 5, 5]), torch.empty(3, 2, 64, dtype=torch.bfloat16)),
        ("v", torch.tensor([29, 0]), torch.empty(2, 3)),
        ("k", torch.tensor([99]), torch.empty(1, 2, 64, dtype=torch.bfloat16)),
    ])
    rt.evict("v")
    c = rt.counters()
    assert c.d2h_bytes == 100 * 256 + 30 * 12 and c.d2h_copies == 2 and c.offloads == 2
    assert c.h2d_bytes == (16 + 3 + 1) * 256 + 2 * 12
    assert c.gathers == 1 + 2  # one per recall call and row size
    assert c.h2d_copies == 0  # the CPU path gathers straight into out
    assert c.recalls == 4 and c.evictions == 1 and c.wait_s == 0.0


def test_counters_snapshot_is_frozen() -> None:
    c = TransferRuntime("cpu").counters()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.h2d_bytes = 1  # type: ignore[misc]
