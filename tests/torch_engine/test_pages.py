"""PageAllocator's quarantine: pages freed behind a copy's event are not handed out until
the event completes, or until the pool runs short, and then only behind a device-side wait.
CUDA events and streams cannot exist on this machine: small stand-ins record the calls."""

import pytest
import torch

from hcpolicy.backends.torch_engine.pages import OutOfPages, PageAllocator


class FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class FakeStream:
    def __init__(self) -> None:
        self.waited: list[FakeEvent] = []

    def wait_event(self, event: FakeEvent) -> None:
        self.waited.append(event)


@pytest.fixture
def stream(monkeypatch):
    s = FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: s)
    return s


def test_quarantined_pages_wait_for_their_event(stream):
    alloc = PageAllocator(8)
    first = alloc.allocate(4)
    event = FakeEvent()
    alloc.free(first, after=event)
    assert alloc.free_pages == 4  # still being read: not free
    second = alloc.allocate(4)  # the other four, no wait needed
    assert set(second.tolist()).isdisjoint(first.tolist()) and stream.waited == []
    event.done = True
    third = alloc.allocate(4)  # reaped without a wait once the copy is done
    assert sorted(third.tolist()) == sorted(first.tolist()) and stream.waited == []


def test_short_pool_releases_the_oldest_behind_a_device_wait(stream):
    alloc = PageAllocator(6)
    a, b = alloc.allocate(3), alloc.allocate(3)
    ea, eb = FakeEvent(), FakeEvent()
    alloc.free(a, after=ea)
    alloc.free(b, after=eb)
    got = alloc.allocate(2)  # needs 2: only the oldest quarantine is released
    assert stream.waited == [ea] and set(got.tolist()) <= set(a.tolist())
    with pytest.raises(OutOfPages):
        alloc.allocate(7)
    alloc.drain()
    assert stream.waited == [ea, eb] and alloc.free_pages == 4


def test_completed_event_frees_at_once_and_double_free_is_caught():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    done = FakeEvent()
    done.done = True
    alloc.free(pages, after=done)
    assert alloc.free_pages == 4
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages)


def test_non_contiguous_allocation_scans_from_a_cursor_and_wraps():
    """``contiguous=False`` hands out distinct free pages from where the last such call
    stopped, wraps around the pool once, and keeps the free count and double-free checks."""
    alloc = PageAllocator(100)
    held = alloc.allocate(60)  # pages 0-59
    alloc.free(held[::3])  # 20 holes below 60
    a = alloc.allocate(30, contiguous=False)  # from the cursor (0): the 20 holes, then 60-69
    assert a.tolist() == held[::3].tolist() + list(range(60, 70))
    b = alloc.allocate(25, contiguous=False)  # 70-99 has 30 free: 70-94
    assert b.tolist() == list(range(70, 95))
    alloc.free(a[:10])
    c = alloc.allocate(12, contiguous=False)  # 95-99, then wraps: the 10 freed, none taken twice
    assert c.tolist() == list(range(95, 100)) + sorted(a[:10].tolist())[:7]
    assert len(set(c.tolist()) | set(b.tolist()) | set(a[10:].tolist())) == 12 + 25 + 20
    assert alloc.free_pages == 100 - 60 + 20 - 30 - 25 + 10 - 12
    with pytest.raises(OutOfPages):
        alloc.allocate(alloc.free_pages + 1, contiguous=False)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(c[:1].repeat(2))


def test_a_page_named_twice_in_one_free_is_caught_and_nothing_is_freed():
    alloc = PageAllocator(6)
    pages = alloc.allocate(4)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(torch.tensor([1, 2, 1]))
    assert alloc.free_pages == 2  # pages 1 and 2 are still allocated
    alloc.free(pages)
    assert alloc.free_pages == 6
