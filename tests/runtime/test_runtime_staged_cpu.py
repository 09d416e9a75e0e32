"""The staged recall path's host logic on the CPU: units gathered into the staging ring a
chunk at a time, each chunk copied to its place in the destination. CUDA's stream and
events are stand-ins (a CPU copy is done when issued); ``test_runtime_gpu`` runs the real
ones."""

from __future__ import annotations

import pytest
import torch

from hcpolicy.runtime.counters import Tally
from hcpolicy.runtime.paths import StagedPath
from hcpolicy.runtime.plan import RecallRequest
from hcpolicy.runtime.staging import StagingRing
from hcpolicy.runtime.store import HostBlock


class DoneEvent:
    """torch.cuda.Event stand-in: a CPU copy has finished when it returns."""

    def record(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class HostMemory:
    """HostStore stand-in for the ring's buffers: plain (unpinned) CPU memory."""

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8)


@pytest.fixture
def cpu_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", DoneEvent)


@pytest.mark.parametrize("pages, requests", [(10, 1), (8, 1), (11, 3), (1, 1)])
def test_staged_path_moves_every_unit_of_every_chunk(cpu_streams: None, pages: int, requests: int) -> None:
    """Pages of 4 rows of 32 bytes: a unit is a page (128 bytes), a chunk holds 4 units.
    10 pages = two full chunks and a partial one; 8 = full chunks only; 3 requests go
    through scratch and the scatter; every byte lands, in order."""
    gen = torch.Generator().manual_seed(pages)
    arena = torch.randint(1, 256, (64 * 4 * 32,), dtype=torch.uint8, generator=gen)  # no zero byte
    block = HostBlock("kv", arena, torch.uint8, (32,), 64 * 4)
    firsts = torch.randperm(64, generator=gen)[:pages] * 4
    rows = (firsts[:, None] + torch.arange(4)).flatten()  # [pages * 4], runs of 4 on unit boundaries
    parts = [p.flatten() for p in rows.view(pages, 4).tensor_split(requests)]  # whole pages each
    reqs = [RecallRequest(block, r, torch.zeros(r.numel(), 32, dtype=torch.uint8)) for r in parts]
    ring = StagingRing(HostMemory(), total_bytes=2 * 4 * 128)  # 2 buffers x 4 units
    path = StagedPath(torch.device("cpu"), Tally(), ring)
    path.validate(reqs)
    path.issue(reqs)
    for r in reqs:
        assert torch.equal(r.out, block.typed()[r.rows])
    c = path.tally.snapshot()
    assert c.h2d_copies == -(-pages // 4) and c.h2d_bytes == rows.numel() * 32  # one copy per chunk
