"""The host store: one host block per key, with the events that guard its memory."""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, Optional

import attrs
import torch

HostAlloc = Callable[[int], torch.Tensor]
"""``alloc(nbytes) -> uint8 [nbytes]`` CPU tensor (pinned when the runtime runs on CUDA)."""


class HostAllocationError(MemoryError):
    """A host block could not be allocated; the store is left as it was."""

    def __init__(self, requested: int, held_bytes: int, held_blocks: int, pinned: bool, reason: str):
        kind = "pinned host" if pinned else "host"
        super().__init__(
            f"could not allocate {requested} bytes of {kind} memory ({reason}); the store "
            f"already holds {held_bytes} bytes in {held_blocks} blocks"
        )
        self.requested = requested
        self.held_bytes = held_bytes
        self.held_blocks = held_blocks


def default_host_alloc(pinned: bool) -> HostAlloc:
    def alloc(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    return alloc


@attrs.define(eq=False)
class HostBlock:
    """The host copy of one offloaded tensor ``[rows, *row_shape]`` stored as raw bytes.

    seq: offload order; offloads run in order on one stream.
    ready: event of the offload that fills ``data`` (None once known complete, or on CPU).
    last_read: event of the latest recall that reads ``data``. Every recall runs on the one
        recall stream, so once this event completes all earlier recalls have too.
    """

    key: Hashable
    data: torch.Tensor  # [rows * rowbytes] uint8, CPU
    dtype: torch.dtype
    row_shape: tuple[int, ...]
    rows: int
    seq: int = 0
    ready: Optional[torch.cuda.Event] = None
    last_read: Optional[torch.cuda.Event] = None
    # Read per request on every recall: plain ints, not tensor calls each time.
    nbytes: int = attrs.field(init=False)
    rowbytes: int = attrs.field(init=False)
    ptr: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.nbytes = self.data.numel()
        self.rowbytes = self.nbytes // self.rows
        self.ptr = self.data.data_ptr()

    def typed(self) -> torch.Tensor:
        """[rows, *row_shape] view of ``data`` in the offloaded dtype."""
        return self.data.view(self.dtype).view(self.rows, *self.row_shape)

    def fences(self) -> list[torch.cuda.Event]:
        """Events of copies that still touch ``data`` (queries only, never blocks)."""
        if self.ready is not None and self.ready.query():
            self.ready = None
        if self.last_read is not None and self.last_read.query():
            self.last_read = None
        return [e for e in (self.ready, self.last_read) if e is not None]


def pending_offload(blocks: Iterable[HostBlock]) -> Optional[torch.cuda.Event]:
    """The event of the latest offload still writing any of ``blocks``, or None.

    Offloads complete in order, so that one event covers the others: a recall of 256
    blocks waits on one event, not 256. Ready events found complete are dropped.
    """
    pending = [(b.seq, b.ready, b) for b in blocks if b.ready is not None]
    if not pending:
        return None
    _, latest, _ = max(pending, key=lambda p: p[0])
    if latest.query():
        for _, _, b in pending:
            b.ready = None
        return None
    return latest


class HostStore:
    """Key -> HostBlock, plus evicted blocks whose memory waits for in-flight copies."""

    def __init__(self, alloc: HostAlloc, pinned: bool, limit_bytes: Optional[int]) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"host_limit_bytes must be >= 0 or None, got {limit_bytes}")
        self._alloc = alloc
        self._pinned = pinned
        self._limit = limit_bytes
        self._blocks: dict[Hashable, HostBlock] = {}
        self._retiring: list[HostBlock] = []

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A fresh uint8 [nbytes] host buffer, or HostAllocationError (nothing registered)."""
        held = self.held_bytes() + self.retiring_bytes()
        if self._limit is not None and held + nbytes > self._limit:
            raise self._error(nbytes, f"host_limit_bytes={self._limit} would be exceeded")
        try:
            data = self._alloc(nbytes)
        except (RuntimeError, MemoryError) as exc:  # torch reports pinned OOM as RuntimeError
            raise self._error(nbytes, f"{type(exc).__name__}: {exc}") from exc
        self._check_allocated(data, nbytes)
        return data

    def _check_allocated(self, data: object, nbytes: int) -> None:
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.device.type != "cpu":
            raise TypeError("host_alloc must return a uint8 CPU torch.Tensor")
        if data.numel() != nbytes or not data.is_contiguous():
            raise TypeError(f"host_alloc returned {data.numel()} bytes (contiguous={data.is_contiguous()}), asked {nbytes}")
        if self._pinned and not data.is_pinned():
            raise TypeError("host_alloc must return pinned memory when the runtime runs on CUDA")

    def _error(self, nbytes: int, reason: str) -> HostAllocationError:
        return HostAllocationError(nbytes, self.held_bytes(), len(self._blocks), self._pinned, reason)

    def add(self, block: HostBlock) -> None:
        if block.key in self._blocks:
            raise ValueError(f"key {block.key!r} is already in the store; evict it first")
        self._blocks[block.key] = block

    def get(self, key: Hashable) -> HostBlock:
        try:
            return self._blocks[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the host store (never offloaded, or evicted)") from None

    def remove(self, key: Hashable) -> HostBlock:
        """Unregister ``key``; its memory is kept until no copy touches it."""
        block = self.get(key)
        del self._blocks[key]
        if block.fences():
            self._retiring.append(block)
        return block

    def reap(self) -> None:
        """Release evicted blocks whose copies have completed (queries, no host sync)."""
        self._retiring = [b for b in self._retiring if b.fences()]

    def held_bytes(self) -> int:
        return sum(b.nbytes for b in self._blocks.values())

    def retiring_bytes(self) -> int:
        return sum(b.nbytes for b in self._retiring)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._blocks)
