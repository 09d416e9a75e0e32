"""Recall requests, validated, and how a batch of them becomes gathers.

A batch is split by row size into groups. Each group is one window (one flat view over
its blocks) and is gathered in *units*: when every request's rows come in runs of ``u``
consecutive rows (16-token pages, say), a unit is such a run and one gather moves
u * rowbytes contiguous bytes per index instead of rowbytes. That is the coalescing step:
8192 scattered 8 KiB pages become 8192 index entries, not 131072. Groups serve the host,
staged and torch zero-copy gathers; the triton gather needs no units (its kernel reads the
row indices on the device) and takes one ``request_table`` per row size instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
import torch

from hcpolicy.runtime.store import HostBlock
from hcpolicy.runtime.window import Window, word_for

MAX_UNIT_BYTES = 32 << 10
"""Largest coalesced unit; bigger runs are gathered as several units."""


@attrs.frozen(eq=False)
class RecallRequest:
    """Gather ``block`` rows ``rows`` into ``out``: out[i] = block[rows[i]].

    rows: [n] int64 on the CPU or on the runtime's device; out: [n, *row_shape], contiguous.
    """

    block: HostBlock
    rows: torch.Tensor
    out: torch.Tensor
    n: int = attrs.field(init=False)  # rows.shape[0], read several times per request

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "n", self.rows.shape[0])

    @property
    def nbytes(self) -> int:
        return self.n * self.block.rowbytes

    def out_words(self, word: torch.dtype) -> torch.Tensor:
        """``out`` as a flat tensor of ``word`` (bit-exact copies: never a float dtype)."""
        return self.out.view(-1).view(torch.uint8).view(word)


@attrs.frozen(eq=False)
class GatherGroup:
    """Requests of one row size gathered through one window, ``unit`` rows at a time.

    host_rows: [N] every request's rows concatenated, when all of them are on the CPU.
    """

    window: Window
    requests: tuple[RecallRequest, ...]
    unit: int
    host_rows: Optional[torch.Tensor]

    @property
    def rows(self) -> int:
        return sum(r.n for r in self.requests)

    @property
    def units(self) -> int:
        return self.rows // self.unit

    @property
    def unit_bytes(self) -> int:
        return self.unit * self.window.rowbytes

    @property
    def unit_words(self) -> int:
        return self.unit_bytes // self.window.word_bytes

    @property
    def nbytes(self) -> int:
        return self.rows * self.window.rowbytes

    @property
    def direct(self) -> bool:
        """Whether a slot-indexed gather can write straight into the single ``out``."""
        return len(self.requests) == 1

    def slot_index(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[U] window slot of each unit's first row, in request order.

        On the CPU when the rows are (``out``: optional [U] CPU buffer, e.g. pinned), else
        on the device, built there so that no index has to be uploaded.
        """
        w = self.window
        if self.host_rows is None:
            device = next(r.rows.device for r in self.requests if r.rows.device.type != "cpu")
            return torch.cat([
                r.rows.to(device, non_blocking=True) * w.slots_per_row + w.first_slot(r.block)
                for r in self.requests
            ])  # unit == 1 here
        firsts = self.host_rows[:: self.unit]  # [U] first row of each unit
        result = torch.mul(firsts, w.slots_per_row, out=out) if out is not None else firsts * w.slots_per_row
        return result.add_(self._per_unit([w.first_slot(r.block) for r in self.requests]))

    def _per_unit(self, values: list[int]) -> torch.Tensor:
        """[U] each request's value repeated over its units."""
        counts = torch.tensor([r.n // self.unit for r in self.requests])
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.int64), counts)

    def destination(self, device: torch.device) -> torch.Tensor:
        """[U, unit_words] of the window's word to gather into: the single request's ``out``,
        or scratch (allocated on the current stream) that ``scatter`` distributes."""
        w = self.window
        if self.direct:
            return self.requests[0].out_words(w.word).view(self.units, self.unit_words)
        return torch.empty((self.units, self.unit_words), dtype=w.word, device=device)

    def scatter(self, gathered: torch.Tensor) -> None:
        """Copy a scratch ``[U, unit_words]`` into each request's ``out`` (no-op if direct)."""
        if self.direct:
            return
        # Integer words: a float copy would canonicalise NaN payloads and break bit-exactness.
        _, word, _ = word_for(self.window.rowbytes, *(r.out.data_ptr() for r in self.requests))
        flat = gathered.view(-1).view(torch.uint8)  # [N * rowbytes]
        dsts, srcs, start = [], [], 0
        for r in self.requests:
            dsts.append(r.out_words(word))
            srcs.append(flat[start : start + r.nbytes].view(word))
            start += r.nbytes
        torch._foreach_copy_(dsts, srcs)  # one multi-tensor kernel instead of R copies


def run_unit(requests: Sequence[RecallRequest], host_rows: torch.Tensor, rowbytes: int, max_bytes: int) -> int:
    """Largest power of two u <= 64 such that the rows are runs of u consecutive rows that
    start every u rows (so no unit straddles two runs or two requests), with
    u * rowbytes <= max_bytes; 1 if there is none."""
    u = 64
    while u > 1 and u * rowbytes > max_bytes:
        u //= 2
    for r in requests:
        u = min(u, r.n & -r.n)  # largest power of two dividing the request's length
    if u > 1:
        starts = torch.nonzero(host_rows[1:] - host_rows[:-1] != 1).flatten() + 1  # [B] new runs
        if starts.numel():
            u = min(u, int((starts & -starts).min()))  # every run must start on a unit
    return max(u, 1)


def by_row_size(requests: Sequence[RecallRequest]) -> dict[int, list[RecallRequest]]:
    """Non-empty requests split by row size, in first-seen order."""
    by_size: dict[int, list[RecallRequest]] = {}
    for r in requests:
        if r.n:
            by_size.setdefault(r.block.rowbytes, []).append(r)
    return by_size


def request_table(requests: Sequence[RecallRequest], out_ptrs: Sequence[int], base: int, lowest: int,
                  word_bytes: int) -> list[int]:
    """[3R] what the triton gather needs per request (see ``_triton_gather``): its first
    row in the batch, its block's start in words past ``base`` (the window's), its out's
    start in words past ``lowest`` (the lowest out). O(R) Python, nothing per row."""
    firsts, at = [], 0
    for r in requests:
        firsts.append(at)
        at += r.n
    return [*firsts, *[(r.block.ptr - base) // word_bytes for r in requests],
            *[(p - lowest) // word_bytes for p in out_ptrs]]


def group_requests(requests: Sequence[RecallRequest], max_unit_bytes: int = MAX_UNIT_BYTES) -> list[GatherGroup]:
    """Split non-empty requests by row size (first-seen order) and find each group's unit."""
    groups = []
    for rowbytes, reqs in by_row_size(requests).items():
        blocks = list({id(r.block): r.block for r in reqs}.values())
        # Gathers write words straight into ``out`` tensors: their addresses must align too.
        window = Window.over(blocks, [r.out.data_ptr() for r in reqs])
        host_rows, unit = None, 1
        if all(r.rows.device.type == "cpu" for r in reqs):
            host_rows = torch.cat([r.rows for r in reqs]) if len(reqs) > 1 else reqs[0].rows  # [N]
            unit = run_unit(reqs, host_rows, rowbytes, max_unit_bytes)
        groups.append(GatherGroup(window, tuple(reqs), unit, host_rows))
    return groups


def runs(rows: torch.Tensor) -> list[tuple[int, int, int]]:
    """Coalesce [n] CPU rows into maximal runs of consecutive rows, in order:
    (first out index, first source row, length); out[i:i+len] = src[row:row+len]."""
    if rows.numel() == 0:
        return []
    step = rows[1:] - rows[:-1]  # [n-1]
    breaks = torch.nonzero(step != 1).flatten() + 1  # out indices where a new run starts
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])  # [runs]
    ends = torch.cat([breaks, torch.tensor([rows.numel()])])  # [runs]
    firsts = rows[starts]
    return list(zip(starts.tolist(), firsts.tolist(), (ends - starts).tolist()))
