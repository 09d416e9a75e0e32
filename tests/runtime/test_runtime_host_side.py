"""Host-side pieces of a recall: window cache, single-threaded index passes, new options."""

from __future__ import annotations

import pytest
import torch

from hcpolicy.runtime import TransferRuntime
from hcpolicy.runtime import hostops
from hcpolicy.runtime.store import HostBlock
from hcpolicy.runtime.window import WindowCache


def _blocks(n: int, rows: int = 8, rowbytes: int = 16) -> list[HostBlock]:
    arena = torch.zeros(n * rows * rowbytes + 64 * n, dtype=torch.uint8)
    return [HostBlock(i, arena[i * (rows * rowbytes + 64) :][: rows * rowbytes], torch.uint8, (rowbytes,), rows, seq=i)
            for i in range(n)]


def test_window_cache_reuses_windows_and_their_views() -> None:
    a, b, c = _blocks(3)
    cache = WindowCache(size=2)
    w = cache.get([a, b])
    assert cache.get([a, b]) is w
    assert cache.get([b, a]) is not w  # another order is another window (and key)
    assert w.host_flat().data_ptr() == a.ptr and w.span == b.ptr + b.nbytes - a.ptr
    cache.get([c])  # evicts the least recently used: [a, b]
    assert len(cache) == 2 and cache.get([a, b]) is not w


def test_window_cache_drops_every_window_of_an_evicted_block() -> None:
    a, b, c = _blocks(3)
    cache = WindowCache()
    cache.get([a, b]), cache.get([b]), cache.get([c])
    cache.drop(b)
    assert len(cache) == 1


def test_runtime_evict_drops_cached_windows() -> None:
    rt = TransferRuntime("cpu")
    rt.offload("x", torch.zeros(4, 2))
    rt._windows.get([rt._store.get("x")])
    rt.evict("x")
    assert len(rt._windows) == 0


@pytest.mark.parametrize("with_numpy", [True, False])
def test_hostops_match_torch(with_numpy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not with_numpy:
        monkeypatch.setattr(hostops, "np", None)
    gen = torch.Generator().manual_seed(0)
    big = torch.randint(-5, 1 << 40, (100_000,), generator=gen)  # above the parallel grain
    small = [torch.randint(0, 9, (n,), generator=gen) for n in (1, 7, 300)]
    assert hostops.min_max(big) == (int(big.min()), int(big.max()))
    for parts in ([big], small, [small[0], big, small[2]], [big[::3]]):
        assert torch.equal(hostops.concat(parts), torch.cat(parts))
        out = torch.full((sum(p.numel() for p in parts),), -1, dtype=torch.int64)
        assert hostops.concat(parts, out=out) is out and torch.equal(out, torch.cat(parts))
    rows = torch.tensor([0, 3, 1, 5, 0])
    assert not hostops.any_outside(rows, [4, 6], [3, 2])
    assert hostops.any_outside(rows, [3, 6], [3, 2])
    assert hostops.any_outside(torch.tensor([0, -1]), [4], [2])


@pytest.mark.parametrize(
    "kwargs",
    [{"gather_ctas": 0}, {"gather_warps": 3}, {"gather_warps": 64}, {"gather_tile_words": 1},
     {"gather_tile_words": 96}, {"gather_tile_words": 1 << 16}, {"recall_priority": "low"},
     {"gather_warps": True}],
)
def test_bad_gather_settings_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TransferRuntime("cpu", **kwargs)


def test_gather_settings_changed_between_calls_are_checked() -> None:
    rt = TransferRuntime("cpu", gather_warps=2, gather_tile_words=512, recall_priority="normal")
    rt.offload("x", torch.arange(8.0).view(4, 2))
    out = torch.empty(2, 2)
    rt.recall("x", torch.tensor([3, 0]), out)
    assert torch.equal(out, torch.tensor([[6.0, 7.0], [0.0, 1.0]]))
    rt.gather_tile_words = 100
    with pytest.raises(ValueError, match="gather_tile_words"):
        rt.recall("x", torch.tensor([0]), torch.empty(1, 2), mode="zero_copy")
    rt.gather_tile_words, rt.recall_priority = 512, "urgent"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="recall_priority"):
        rt.recall("x", torch.tensor([0]), torch.empty(1, 2))


def test_multi_request_range_check_names_the_bad_request() -> None:
    rt = TransferRuntime("cpu")
    rt.offload("long", torch.zeros(50, 2))
    rt.offload("short", torch.zeros(5, 2))
    good = (torch.tensor([49, 0]), torch.empty(2, 2))
    with pytest.raises(ValueError, match=r"'short'.*\[0, 5\)"):  # 7 < 50 but >= 5
        rt.recall_many([("long", *good), ("short", torch.tensor([7]), torch.empty(1, 2))])
    rt.recall_many([("long", *good), ("short", torch.tensor([4]), torch.empty(1, 2))])
