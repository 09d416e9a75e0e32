"""Whatever is offloaded comes back byte-identical, under any sequence of operations."""

import torch
from hypothesis import given, settings
from runtime_cases import DTYPES, programs, random_tensor, run_program

from hcpolicy.runtime import TransferRuntime


@settings(max_examples=150, deadline=None)
@given(programs)
def test_random_programs_round_trip_on_cpu(program: list) -> None:
    run_program(TransferRuntime("cpu"), program)


def test_every_dtype_round_trips_bytes_exactly() -> None:
    rt = TransferRuntime("cpu")
    for i, dtype in enumerate(DTYPES):
        src = random_tensor(33, (2, 8), dtype, seed=i)
        rt.offload(dtype, src)
        rows = torch.tensor([32, 0, 5, 5, 6, 7, 1], dtype=torch.int64)
        out = torch.empty(7, 2, 8, dtype=dtype)
        rt.recall(dtype, rows, out).synchronize()
        assert torch.equal(out.view(torch.uint8), src[rows].view(torch.uint8))


def test_recall_many_mixes_row_sizes_and_dtypes() -> None:
    rt = TransferRuntime("cpu")
    srcs = {
        "k": random_tensor(50, (2, 16), torch.bfloat16, 1),
        "v": random_tensor(50, (2, 16), torch.float32, 2),
        "odd": random_tensor(9, (3, 5), torch.float16, 3),
    }
    for key, src in srcs.items():
        rt.offload(key, src)
    rows = {"k": torch.arange(40, 8, -3), "v": torch.tensor([0, 49]), "odd": torch.tensor([8, 8, 0])}
    outs = {k: torch.empty(len(rows[k]), *srcs[k].shape[1:], dtype=srcs[k].dtype) for k in srcs}
    rt.recall_many([(k, rows[k], outs[k]) for k in srcs]).synchronize()
    for k in srcs:
        assert torch.equal(outs[k].view(torch.uint8), srcs[k][rows[k]].view(torch.uint8))


def test_evict_then_reoffload_same_key_returns_new_bytes() -> None:
    rt = TransferRuntime("cpu")
    old, new = random_tensor(8, (4,), torch.int64, 1), random_tensor(12, (2,), torch.int8, 2)
    rt.offload("x", old)
    rt.evict("x")
    rt.offload("x", new)
    out = torch.empty(12, 2, dtype=torch.int8)
    rt.recall("x", torch.arange(12), out)
    assert torch.equal(out, new)
    assert rt.entry("x").rows == 12 and rt.host_bytes() == 24


def test_empty_recall_is_a_completed_transfer() -> None:
    rt = TransferRuntime("cpu")
    rt.offload("x", torch.ones(4, 2))
    t = rt.recall("x", torch.empty(0, dtype=torch.int64), torch.empty(0, 2))
    assert t.done() and rt.counters().gathers == 0
