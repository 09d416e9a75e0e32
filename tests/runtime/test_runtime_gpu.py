"""CUDA runtime: every recall mode byte-exact against the CPU runtime, and the ordering
guarantees (staging reuse, offload-then-recall, evict during a recall) under load."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from runtime_cases import as_bytes, programs, random_tensor, run_program

from hcpolicy.runtime import HostAllocationError, TransferRuntime

pytestmark = pytest.mark.gpu

# Every CUDA recall path; the zero-copy one with both gather kernels.
PATHS = {
    "zero_copy-triton": dict(recall_mode="zero_copy", gather_kernel="triton"),
    "zero_copy-torch": dict(recall_mode="zero_copy", gather_kernel="torch"),
    "staged": dict(recall_mode="staged"),
    "direct": dict(recall_mode="direct"),
}


def _busy(ms_hint: int = 20) -> torch.Tensor:
    """Queue ~tens of ms of matmuls on the current stream (copy streams wait on it)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(max(1, ms_hint // 2)):
        a = (a @ a).clamp_(-1, 1)
    return a


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(program=programs)
def test_random_programs_round_trip(path: str, program: list) -> None:
    rt = TransferRuntime("cuda", staging_bytes=4096, gather_ctas=2, **PATHS[path])  # tiny: many chunks
    run_program(rt, program)


@pytest.mark.parametrize("kernel", ["triton", "torch"])
@settings(max_examples=15, deadline=None)
@given(program=programs)
def test_random_programs_with_device_rows(kernel: str, program: list) -> None:
    rt = TransferRuntime("cuda", recall_mode="zero_copy", gather_kernel=kernel)
    run_program(rt, program, rows_on_device=True)


def _kv_store(rt: TransferRuntime, heads: int, length: int) -> dict[int, torch.Tensor]:
    ref = {}
    for h in range(heads):
        ref[h] = random_tensor(length, (2, 128), torch.bfloat16, seed=h)
        rt.offload(h, ref[h].cuda())
    return ref


def _pages(length: int, count: int, gen: torch.Generator) -> torch.Tensor:
    firsts = torch.randint(0, length // 16, (count,), generator=gen) * 16
    return (firsts[:, None] + torch.arange(16)).flatten()  # [count * 16]


@pytest.mark.parametrize("path", PATHS)
def test_modes_match_the_cpu_runtime_on_paged_kv(path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    gpu, cpu = TransferRuntime("cuda", **PATHS[path]), TransferRuntime("cpu")
    ref = _kv_store(gpu, heads=32, length=4096)
    for h, x in ref.items():
        cpu.offload(h, x)
    reqs = [(h, _pages(4096, 24, gen), None) for h in ref]
    outs_gpu = [torch.empty(len(r), 2, 128, dtype=torch.bfloat16, device="cuda") for _, r, _ in reqs]
    outs_cpu = [torch.empty(len(r), 2, 128, dtype=torch.bfloat16) for _, r, _ in reqs]
    t = gpu.recall_many([(h, r, o) for (h, r, _), o in zip(reqs, outs_gpu)])
    cpu.recall_many([(h, r, o) for (h, r, _), o in zip(reqs, outs_cpu)])
    single = torch.randint(0, 4096, (5000,), generator=gen)  # fully scattered rows
    out1 = torch.empty(5000, 2, 128, dtype=torch.bfloat16, device="cuda")
    gpu.recall(7, single, out1)
    gpu.wait(t)
    for o_gpu, o_cpu in zip(outs_gpu, outs_cpu):
        assert torch.equal(as_bytes(o_gpu), as_bytes(o_cpu))
    gpu.synchronize()
    assert torch.equal(as_bytes(out1), as_bytes(ref[7][single]))
    c = gpu.counters()
    assert c.h2d_bytes == (32 * 24 * 16 + 5000) * 512
    if path.startswith("zero_copy"):
        assert c.h2d_copies == 0 and c.gathers == 2


def test_staging_buffers_are_not_reused_while_a_copy_reads_them() -> None:
    """Recalls far larger than the staging area, queued behind compute, no host sync."""
    rt = TransferRuntime("cuda", recall_mode="staged", staging_bytes=64 << 10)  # 2 x 32 KiB
    ref = _kv_store(rt, heads=4, length=8192)
    gen = torch.Generator().manual_seed(1)
    rt.synchronize()
    _busy()  # the copy stream waits for this before its first DMA
    jobs = []
    for i in range(20):
        rows = torch.randint(0, 8192, (4096,), generator=gen)  # 2 MiB = 64 chunks
        out = torch.empty(4096, 2, 128, dtype=torch.bfloat16, device="cuda")
        jobs.append((i % 4, rows, out, rt.recall(i % 4, rows, out)))
    for key, rows, out, t in jobs:
        t.synchronize()
        assert torch.equal(as_bytes(out), as_bytes(ref[key][rows]))
    c = rt.counters()
    assert c.h2d_copies == 20 * 64 and c.wait_s > 0


@pytest.mark.parametrize("path", PATHS)
def test_recall_right_after_offload_sees_the_offloaded_bytes(path: str) -> None:
    rt = TransferRuntime("cuda", **PATHS[path])
    src = random_tensor(1 << 18, (2, 128), torch.bfloat16, seed=3)  # 128 MiB
    src_gpu = src.cuda()
    torch.cuda.synchronize()
    _busy()  # delays the offload (it waits for the current stream)
    rt.offload("big", src_gpu)
    rows = torch.arange(1000, 3000)
    out = torch.empty(2000, 2, 128, dtype=torch.bfloat16, device="cuda")
    rt.wait(rt.recall("big", rows, out))
    assert torch.equal(as_bytes(out), as_bytes(src[rows]))


@pytest.mark.parametrize("path", PATHS)
def test_evict_during_a_recall_keeps_the_memory_until_it_finishes(path: str) -> None:
    rt = TransferRuntime("cuda", **PATHS[path])
    src = random_tensor(1 << 16, (2, 128), torch.bfloat16, seed=4)  # 32 MiB
    rt.offload("x", src.cuda())
    # 8 runs of 2500 rows: few enough copies for 'direct' to be issued before _busy ends
    rows = (torch.randperm(26)[:8, None] * 2500 + torch.arange(2500)).flatten()
    out = torch.empty(20000, 2, 128, dtype=torch.bfloat16, device="cuda")
    rt.recall("x", rows, out)  # compiles the gather kernel now, not while _busy runs
    rt.synchronize()
    _busy()
    t = rt.recall("x", rows, out)
    rt.evict("x")
    assert "x" not in rt and rt.host_bytes() == 0
    assert rt.pending_bytes() == src.numel() * 2  # the recall is queued behind _busy
    for i in range(4):  # fresh pinned blocks that could land on the evicted memory
        rt.offload(("y", i), torch.zeros(1 << 16, 2, 128, dtype=torch.bfloat16, device="cuda"))
    t.synchronize()
    assert torch.equal(as_bytes(out), as_bytes(src[rows]))
    rt.synchronize()
    assert rt.pending_bytes() == 0


def test_wait_orders_the_compute_stream_without_a_host_sync() -> None:
    rt = TransferRuntime("cuda")
    src = torch.arange(4096 * 256, dtype=torch.float32, device="cuda").view(4096, 256)
    rt.offload("x", src)
    out = torch.empty(4096, 256, device="cuda")
    rt.wait(rt.recall("x", torch.arange(4096).flip(0), out))
    assert torch.equal(out, src.flip(0))


def test_device_rows_are_range_checked_when_asked() -> None:
    rt = TransferRuntime("cuda")
    rt.offload("x", torch.zeros(10, 4, device="cuda"))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        rt.recall("x", torch.tensor([3, 10], device="cuda"), torch.empty(2, 4, device="cuda"))


def test_cuda_store_is_pinned_and_allocation_failures_are_clean() -> None:
    rt = TransferRuntime("cuda", host_limit_bytes=1 << 20)
    rt.offload("a", torch.ones(1024, 128, device="cuda"))  # 512 KiB
    with pytest.raises(HostAllocationError, match="pinned host"):
        rt.offload("b", torch.ones(2048, 128, device="cuda"))
    assert len(rt) == 1 and rt.host_bytes() == 1 << 19
    with pytest.raises(TypeError, match="pinned"):
        TransferRuntime("cuda", host_alloc=lambda n: torch.empty(n, dtype=torch.uint8)).offload(
            "a", torch.ones(4, device="cuda"))


@pytest.mark.parametrize("ctas", [1, 16])
def test_triton_gather_writes_straight_into_scattered_outs(ctas: int) -> None:
    """Outs carved from one buffer with gaps, others separate; pages and single rows."""
    rt = TransferRuntime("cuda", recall_mode="zero_copy", gather_kernel="triton", gather_ctas=ctas)
    ref = _kv_store(rt, heads=6, length=2048)
    gen = torch.Generator().manual_seed(5)
    pool = torch.full((4096, 2, 128), 7, dtype=torch.bfloat16, device="cuda")
    reqs, at = [], 0
    for h in range(6):
        rows = _pages(2048, 8, gen) if h % 2 else torch.randint(0, 2048, (100,), generator=gen)
        if h < 3:
            out = pool[at : at + len(rows)]
            at += len(rows) + 3
        else:
            out = torch.empty(len(rows), 2, 128, dtype=torch.bfloat16, device="cuda")
        reqs.append((h, rows, out))
    rt.wait(rt.recall_many(reqs))
    for h, rows, out in reqs:
        assert torch.equal(as_bytes(out), as_bytes(ref[h][rows]))
    gaps = [pool[end : end + 3] for end in (len(reqs[0][1]), len(reqs[0][1]) + 3 + len(reqs[1][1]))]
    assert all(bool((g == 7).all()) for g in gaps)  # nothing written between the outs


# Triton gather settings the benchmark compares; each must stay byte-exact.
GATHER_SETTINGS = {
    "default": {},
    "narrow": dict(gather_ctas=132, gather_warps=1, gather_tile_words=512),
    "short-lived": dict(gather_ctas=1 << 20, gather_warps=4, gather_tile_words=2048),
    "normal-priority": dict(recall_priority="normal"),
    "tiny-tile": dict(gather_ctas=3, gather_warps=1, gather_tile_words=2),
}


@pytest.mark.parametrize("setting", GATHER_SETTINGS)
def test_triton_gather_settings_with_host_device_and_mixed_rows(setting: str) -> None:
    rt = TransferRuntime("cuda", recall_mode="zero_copy", gather_kernel="triton", **GATHER_SETTINGS[setting])
    ref = _kv_store(rt, heads=6, length=2048)
    odd = random_tensor(300, (3,), torch.float32, seed=9)  # another row size in the same batch
    rt.offload("odd", odd.cuda())
    gen = torch.Generator().manual_seed(6)
    for placement in ("cpu", "cuda", "mixed"):
        reqs = []
        for h in range(6):
            rows = _pages(2048, 5, gen) if h % 2 else torch.randint(0, 2048, (77,), generator=gen)
            if placement == "cuda" or (placement == "mixed" and h % 3 == 0):
                rows = rows.cuda()
            reqs.append((h, rows, torch.empty(len(rows), 2, 128, dtype=torch.bfloat16, device="cuda")))
        odd_rows = torch.randint(0, 300, (41,), generator=gen)
        reqs.insert(2, ("odd", odd_rows.cuda() if placement != "cpu" else odd_rows,
                        torch.empty(41, 3, device="cuda")))
        rt.wait(rt.recall_many(reqs))
        for key, rows, out in reqs:
            want = odd if key == "odd" else ref[key]
            assert torch.equal(as_bytes(out), as_bytes(want[rows.cpu()])), (placement, key)
    strided = torch.randint(0, 2048, (300,), generator=gen).cuda()[::3]  # not contiguous
    out = torch.empty(100, 2, 128, dtype=torch.bfloat16, device="cuda")
    rt.wait(rt.recall(4, strided, out))
    assert torch.equal(as_bytes(out), as_bytes(ref[4][strided.cpu()]))


def test_recalls_stay_in_issue_order_across_priorities() -> None:
    """A block's last_read must cover earlier recalls on the other priority's stream."""
    rt = TransferRuntime("cuda")
    src = random_tensor(1 << 16, (2, 128), torch.bfloat16, seed=8)  # 32 MiB
    rt.offload("x", src.cuda())
    rows = torch.randperm(1 << 16)[:20000]
    outs = [torch.empty(20000, 2, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    for priority in ("normal", "high"):  # compile and create both streams before timing
        rt.recall_priority = priority
        rt.recall("x", rows, outs[0])
    rt.synchronize()
    _busy()
    rt.recall_priority = "high"
    first = rt.recall("x", rows, outs[0])
    rt.recall_priority = "normal"
    second = rt.recall("x", rows.flip(0), outs[1])
    rt.evict("x")
    assert rt.pending_bytes() == src.numel() * 2
    for i in range(4):  # fresh pinned blocks that could land on the evicted memory
        rt.offload(("y", i), torch.zeros(1 << 16, 2, 128, dtype=torch.bfloat16, device="cuda"))
    second.synchronize()
    assert first.done()  # the normal-priority recall waited for the high-priority one
    assert torch.equal(as_bytes(outs[0]), as_bytes(src[rows]))
    assert torch.equal(as_bytes(outs[1]), as_bytes(src[rows.flip(0)]))
    rt.synchronize()
    assert rt.pending_bytes() == 0


def test_index_buffers_are_not_reused_while_a_dma_reads_them() -> None:
    """More host-row recalls queued behind compute than the index ring has buffers."""
    rt = TransferRuntime("cuda")
    ref = _kv_store(rt, heads=2, length=8192)
    gen = torch.Generator().manual_seed(7)
    warm = torch.empty(4096, 2, 128, dtype=torch.bfloat16, device="cuda")
    rt.recall(0, torch.randint(0, 8192, (4096,), generator=gen), warm)  # compiles first
    rt.synchronize()
    _busy()  # every index upload waits for this
    jobs = []
    for i in range(12):
        rows = torch.randint(0, 8192, (4096,), generator=gen)
        out = torch.empty(4096, 2, 128, dtype=torch.bfloat16, device="cuda")
        jobs.append((i % 2, rows, out, rt.recall(i % 2, rows, out)))
    for key, rows, out, t in jobs:
        t.synchronize()
        assert torch.equal(as_bytes(out), as_bytes(ref[key][rows]))
    assert rt.counters().wait_s > 0  # the fifth upload waited for the first buffer


def test_device_rows_of_a_batch_are_range_checked() -> None:
    rt = TransferRuntime("cuda")
    rt.offload("long", torch.zeros(100, 4, device="cuda"))
    rt.offload("short", torch.zeros(10, 4, device="cuda"))
    ok = (torch.tensor([99, 0], device="cuda"), torch.empty(2, 4, device="cuda"))
    with pytest.raises(ValueError, match=r"'short'.*\[0, 10\)"):
        rt.recall_many([("long", *ok), ("short", torch.tensor([10], device="cuda"), torch.empty(1, 4, device="cuda"))])
    rt.wait(rt.recall_many([("long", *ok), ("short", torch.tensor([9], device="cuda"),
                                                     torch.empty(1, 4, device="cuda"))]))
