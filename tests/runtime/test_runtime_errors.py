"""Bad inputs raise ValueError/KeyError; a failed host allocation leaves the store intact."""

import pytest
import torch

from hcpolicy.runtime import HostAllocationError, TransferRuntime


@pytest.fixture
def rt() -> TransferRuntime:
    rt = TransferRuntime("cpu")
    rt.offload("x", torch.arange(40, dtype=torch.float32).view(10, 2, 2))
    return rt


def test_unknown_and_evicted_keys_raise_key_error_naming_the_key(rt: TransferRuntime) -> None:
    out = torch.empty(1, 2, 2)
    with pytest.raises(KeyError, match="'nope'"):
        rt.recall("nope", torch.tensor([0]), out)
    rt.evict("x")
    with pytest.raises(KeyError, match="'x'"):
        rt.recall("x", torch.tensor([0]), out)
    with pytest.raises(KeyError, match="'x'"):
        rt.evict("x")
    with pytest.raises(KeyError, match="'x'"):
        rt.recall_many([("x", torch.tensor([0]), out)])


@pytest.mark.parametrize(
    "rows, out, match",
    [
        (torch.tensor([0, 10]), torch.empty(2, 2, 2), r"\[0, 10\)"),
        (torch.tensor([-1]), torch.empty(1, 2, 2), r"\[0, 10\)"),
        (torch.tensor([0], dtype=torch.int32), torch.empty(1, 2, 2), "int64"),
        (torch.tensor([[0]]), torch.empty(1, 2, 2), "1-D"),
        ([0], torch.empty(1, 2, 2), "1-D"),
        (torch.tensor([0, 1]), torch.empty(1, 2, 2), "shape|float32"),
        (torch.tensor([0]), torch.empty(1, 2, 3), "float32"),
        (torch.tensor([0]), torch.empty(1, 2, 2, dtype=torch.float64), "float32"),
        (torch.tensor([0]), torch.empty(1, 2, 2, device="meta"), "meta"),
        (torch.tensor([0]), torch.empty(1, 2, 4)[:, :, ::2], "contiguous"),
        (torch.tensor([0], device="meta"), torch.empty(1, 2, 2), "meta"),
        (torch.tensor([0]), "not a tensor", "torch.Tensor"),
    ],
)
def test_bad_recall_inputs_raise_value_error(rt: TransferRuntime, rows, out, match: str) -> None:
    before = rt.counters()
    with pytest.raises(ValueError, match=match):
        rt.recall("x", rows, out)
    assert rt.counters() == before


def test_a_bad_request_in_a_batch_enqueues_nothing(rt: TransferRuntime) -> None:
    good = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError):
        rt.recall_many([("x", torch.tensor([3]), good), ("x", torch.tensor([99]), torch.empty(1, 2, 2))])
    assert torch.equal(good, torch.zeros(1, 2, 2))
    assert rt.counters().recalls == 0


@pytest.mark.parametrize(
    "key, src, match",
    [
        ("x", torch.zeros(3, 2), "already"),
        ("y", torch.zeros(0, 2), "L >= 1"),
        ("y", torch.zeros(3, 0), "non-empty"),
        ("y", torch.tensor(1.0), "L >= 1"),
        ("y", torch.zeros(3, device="meta"), "meta"),
        ("y", [1, 2], "torch.Tensor"),
    ],
)
def test_bad_offload_inputs_raise_value_error(rt: TransferRuntime, key, src, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rt.offload(key, src)
    assert len(rt) == 1 and rt.host_bytes() == 160


@pytest.mark.parametrize(
    "kwargs",
    [{"device": "tpu"}, {"device": "cpu", "recall_mode": "fast"}, {"device": "cpu", "host_limit_bytes": -1},
     {"device": "cpu", "staging_bytes": 1}],
)
def test_bad_constructor_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TransferRuntime(**kwargs)


def test_cuda_device_without_cuda_raises_value_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="cuda"):
        TransferRuntime("cuda")


class FailingAlloc:
    """Allocates normally until ``fail`` is set, then raises like torch does on OOM."""

    def __init__(self) -> None:
        self.fail = False

    def __call__(self, nbytes: int) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return torch.empty(nbytes, dtype=torch.uint8)


def test_failed_host_allocation_raises_and_leaves_the_store_unchanged() -> None:
    alloc = FailingAlloc()
    rt = TransferRuntime("cpu", host_alloc=alloc)
    a = torch.randn(16, 2, 8)
    rt.offload("a", a)
    before = (len(rt), rt.host_bytes(), rt.counters())
    alloc.fail = True
    with pytest.raises(HostAllocationError) as info:
        rt.offload("b", torch.randn(32, 2, 8))
    message = str(info.value)
    assert "2048 bytes" in message and "holds 1024 bytes in 1 blocks" in message
    assert isinstance(info.value, MemoryError) and info.value.requested == 2048
    assert (len(rt), rt.host_bytes(), rt.counters()) == before and "b" not in rt
    # later operations still work, including the key that failed
    alloc.fail = False
    out = torch.empty(3, 2, 8)
    rt.recall("a", torch.tensor([15, 0, 7]), out)
    assert torch.equal(out, a[[15, 0, 7]])
    rt.offload("b", torch.ones(2, 2))
    assert len(rt) == 2


def test_host_limit_is_enforced_like_a_failed_allocation() -> None:
    rt = TransferRuntime("cpu", host_limit_bytes=100)
    rt.offload("a", torch.zeros(10, dtype=torch.int64))  # 80 bytes
    with pytest.raises(HostAllocationError, match="host_limit_bytes=100"):
        rt.offload("b", torch.zeros(3, dtype=torch.int64))
    rt.evict("a")
    rt.offload("b", torch.zeros(3, dtype=torch.int64))
    assert rt.host_bytes() == 24


def test_allocator_returning_the_wrong_thing_is_a_type_error() -> None:
    rt = TransferRuntime("cpu", host_alloc=lambda n: torch.empty(n, dtype=torch.float32))
    with pytest.raises(TypeError, match="uint8"):
        rt.offload("a", torch.zeros(2))
    assert len(rt) == 0
