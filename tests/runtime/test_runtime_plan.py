"""Coalescing into runs, and gathers through a window over several blocks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcpolicy.runtime.plan import RecallRequest, group_requests, runs
from hcpolicy.runtime.store import HostBlock
from hcpolicy.runtime.window import word_for


def test_runs_merge_consecutive_rows_in_request_order() -> None:
    rows = torch.tensor([4, 5, 6, 9, 10, 2, 2, 3])
    assert runs(rows) == [(0, 4, 3), (3, 9, 2), (5, 2, 1), (6, 2, 2)]
    assert runs(torch.empty(0, dtype=torch.int64)) == []


@given(st.lists(st.integers(0, 50), max_size=40))
def test_runs_reconstruct_the_rows(rows: list) -> None:
    rebuilt = [row + i for _, row, n in runs(torch.tensor(rows, dtype=torch.int64)) for i in range(n)]
    assert rebuilt == rows


def test_word_is_the_widest_divisor() -> None:
    assert word_for(512, 4096)[1] == torch.int64
    assert word_for(12, 8)[1] == torch.int32
    assert word_for(30)[1] == torch.int16
    assert word_for(8, 3)[1] == torch.uint8


def _blocks_in(arena: torch.Tensor, offsets: list[int], rows: int, rowbytes: int) -> list[HostBlock]:
    """Blocks of ``rows`` rows placed back to back after the given gaps inside ``arena``."""
    blocks, at = [], 0
    for i, gap in enumerate(offsets):
        at += gap
        blocks.append(HostBlock(i, arena[at : at + rows * rowbytes], torch.uint8, (rowbytes,), rows))
        at += rows * rowbytes
    return blocks


def _arena_bytes(offsets: list[int], rows: int, rowbytes: int) -> int:
    return sum(offsets) + len(offsets) * rows * rowbytes


def _requests(blocks: list[HostBlock], picks: list, unit: int, rowbytes: int, outs: torch.Tensor | None = None):
    """Requests of whole runs of ``unit`` rows; outs carved from ``outs`` when given."""
    reqs, used = [], 0
    for b in blocks:
        firsts = [(r // unit) * unit for i, r in picks if i % len(blocks) == b.key]
        if not firsts:
            continue
        rows = torch.tensor([f + j for f in firsts for j in range(unit)], dtype=torch.int64)
        if outs is None:
            out = torch.empty(len(rows), rowbytes, dtype=torch.uint8)
        else:
            out = outs[used : used + len(rows)]
            used += len(rows) + 1  # leave a gap row between outs
        reqs.append(RecallRequest(b, rows, out))
    return reqs


_layouts = dict(
    rowbytes=st.sampled_from([1, 6, 8, 30, 512]),
    offsets=st.lists(st.integers(0, 400), min_size=1, max_size=4),
    picks=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 15)), min_size=1, max_size=30),
    unit=st.sampled_from([1, 2, 4]),
)


@settings(max_examples=40, deadline=None)
@given(**_layouts)
def test_window_gather_matches_per_block_indexing(rowbytes: int, offsets: list, picks: list, unit: int) -> None:
    """Blocks at arbitrary addresses, runs coalesced into units, one gather for all."""
    rows = 16
    arena = torch.randint(0, 256, (_arena_bytes(offsets, rows, rowbytes),), dtype=torch.uint8)
    reqs = _requests(_blocks_in(arena, offsets, rows, rowbytes), picks, unit, rowbytes)
    (group,) = group_requests(reqs)
    assert group.unit % unit == 0 or group.unit * rowbytes > 32 << 10
    dst = group.destination(torch.device("cpu"))
    torch.index_select(group.window.host_view(group.unit_bytes), 0, group.slot_index(), out=dst)
    group.scatter(dst)
    for r in reqs:
        assert torch.equal(r.out, r.block.typed()[r.rows])


def test_runs_of_pages_are_gathered_as_pages() -> None:
    block = HostBlock("k", torch.zeros(64 * 512, dtype=torch.uint8), torch.uint8, (512,), 64)
    pages = torch.tensor([3, 0, 2])
    rows = (pages[:, None] * 16 + torch.arange(16)).flatten()
    (group,) = group_requests([RecallRequest(block, rows, torch.empty(48, 512, dtype=torch.uint8))])
    assert group.unit == 16 and group.units == 3 and group.unit_bytes == 8192
    scattered = torch.tensor([5, 6, 9, 10])
    (group,) = group_requests([RecallRequest(block, scattered, torch.empty(4, 512, dtype=torch.uint8))])
    assert group.unit == 2
    (group,) = group_requests([RecallRequest(block, scattered, torch.empty(4, 512, dtype=torch.uint8))], 512)
    assert group.unit == 1


def test_direct_path_copies_one_run_at_a_time() -> None:
    """DirectPath only issues tensor copies, so its bookkeeping runs on the CPU too."""
    from hcpolicy.runtime.counters import Tally
    from hcpolicy.runtime.paths import DirectPath

    src = torch.arange(20 * 6, dtype=torch.int16).view(20, 2, 3)
    block = HostBlock("k", src.view(-1).view(torch.uint8).clone(), torch.int16, (2, 3), 20)
    rows = torch.tensor([4, 5, 6, 0, 19, 18])
    out = torch.empty(6, 2, 3, dtype=torch.int16)
    tally = Tally()
    DirectPath(torch.device("cpu"), tally).issue([RecallRequest(block, rows, out)])
    assert torch.equal(out, src[rows])
    c = tally.snapshot()
    assert c.h2d_copies == 4 and c.h2d_bytes == 6 * 12
