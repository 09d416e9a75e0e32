"""Flat views over several host blocks, so one gather serves a whole recall batch.

A recall batch touches many blocks (one per KV head, say). Issuing one gather per block
costs a launch (GPU) or a call (host) each, which dominates for small blocks. Instead we
view the address range from the lowest to the highest block as one tensor of row slots and
translate (block, row) into a slot index. The gather reads only the slots it is given, so
memory between the blocks is never touched. On the GPU this view is a CUDA tensor over
pinned host memory: under unified virtual addressing a pinned host pointer is a valid
device pointer, and a GPU gather through it reads the host over PCIe without a DMA copy.
"""

from __future__ import annotations

import ctypes
import math
from collections import OrderedDict
from typing import Any, Sequence

import attrs
import torch

from hcpolicy.runtime.store import HostBlock

# (bytes, dtype, __cuda_array_interface__ typestr), widest first: wider words mean fewer
# elements for the gather kernel to address.
_WORDS: tuple[tuple[int, torch.dtype, str], ...] = (
    (8, torch.int64, "<i8"),
    (4, torch.int32, "<i4"),
    (2, torch.int16, "<i2"),
    (1, torch.uint8, "|u1"),
)


def word_for(*values: int) -> tuple[int, torch.dtype, str]:
    """The widest word (bytes, dtype, typestr) that divides every value (addresses, sizes)."""
    g = 0
    for v in values:
        g = math.gcd(g, v)
    for word in _WORDS:
        if g % word[0] == 0:
            return word
    raise AssertionError("unreachable: 1 divides everything")


class _CudaPointer:
    """Exposes a pinned host range as a device array (``__cuda_array_interface__`` v3)."""

    def __init__(self, ptr: int, nwords: int, typestr: str, owners: tuple[torch.Tensor, ...]):
        self.__cuda_array_interface__ = {
            "shape": (nwords,),
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }
        self._owners = owners  # the tensor built from us keeps us, hence the blocks, alive


@attrs.frozen(eq=False)
class Window:
    """Blocks of one row size seen as ``[slots, rowbytes / word]`` rows of ``word``.

    Row r of block b is slot ``(b.ptr - base + r * rowbytes) / slot_bytes``. Slots are
    ``slot_bytes`` apart; when the blocks are not spaced in whole rows, slot_bytes <
    rowbytes and consecutive slot rows overlap, which a gather (read-only) allows.
    """

    blocks: tuple[HostBlock, ...]
    rowbytes: int
    base: int
    span: int
    slot_bytes: int
    word_bytes: int
    word: torch.dtype
    typestr: str
    # device -> [span / word] CUDA view; building one costs an array-interface import
    _flats: dict = attrs.field(factory=dict, repr=False)

    @classmethod
    def over(cls, blocks: Sequence[HostBlock], align: Sequence[int] = ()) -> "Window":
        """A window over ``blocks`` (all of one row size); ``align``: other addresses the
        word must divide (destinations the gather writes into as words)."""
        rowbytes = blocks[0].rowbytes
        if any(b.rowbytes != rowbytes for b in blocks):
            raise ValueError("a window needs blocks of one row size")
        base = min(b.ptr for b in blocks)
        span = max(b.ptr + b.nbytes for b in blocks) - base
        slot_bytes = rowbytes
        for b in blocks:
            slot_bytes = math.gcd(slot_bytes, b.ptr - base)
        size, dtype, typestr = word_for(base, slot_bytes, *align)
        return cls(tuple(blocks), rowbytes, base, span, slot_bytes, size, dtype, typestr)

    @property
    def slot_words(self) -> int:
        return self.slot_bytes // self.word_bytes

    @property
    def slots_per_row(self) -> int:
        return self.rowbytes // self.slot_bytes

    def first_slot(self, block: HostBlock) -> int:
        return (block.ptr - self.base) // self.slot_bytes

    def _units_of(self, flat: torch.Tensor, unit_bytes: int) -> torch.Tensor:
        # flat: [span / word] -> [slots, unit_bytes / word], one slot every slot_bytes
        slots = (self.span - unit_bytes) // self.slot_bytes + 1
        return flat.as_strided((slots, unit_bytes // self.word_bytes), (self.slot_words, 1))

    def host_flat(self) -> torch.Tensor:
        """[span / word] CPU view of the whole range; valid while the blocks are alive."""
        raw: Any = (ctypes.c_uint8 * self.span).from_address(self.base)
        return torch.frombuffer(raw, dtype=self.word)

    def host_view(self, unit_bytes: int) -> torch.Tensor:
        """[slots, unit_bytes / word] CPU view: slot s = the unit starting s slots past base."""
        return self._units_of(self.host_flat(), unit_bytes)

    def device_flat(self, device: torch.device) -> torch.Tensor:
        """[span / word] CUDA view of the pinned range (zero-copy reads over PCIe), made once
        per window and device (the view holds the blocks' memory alive)."""
        flat = self._flats.get(device)
        if flat is None:
            flat = self._flats[device] = self._make_device_flat(device)
        return flat

    def _make_device_flat(self, device: torch.device) -> torch.Tensor:
        owners = tuple(b.data for b in self.blocks)
        flat = torch.as_tensor(_CudaPointer(self.base, self.span // self.word_bytes, self.typestr, owners))
        if flat.device != device:
            raise RuntimeError(
                f"pinned host memory maps to {flat.device}, not {device}; allocate the store "
                f"with {device} current (torch.cuda.set_device) for zero-copy recall"
            )
        return flat

    def device_view(self, device: torch.device, unit_bytes: int) -> torch.Tensor:
        """[slots, unit_bytes / word] CUDA view, as ``host_view``."""
        return self._units_of(self.device_flat(device), unit_bytes)


class WindowCache:
    """Windows of recently recalled block sets, least recently used dropped first.

    A serving loop recalls from the same blocks step after step; reusing their window skips
    the scan over the blocks and the CUDA view's construction. Keys are offload sequence
    numbers, never reused, so a key cannot name a later block at a recycled address; an
    evicted block's windows are dropped at once (``drop``), so the cache never holds the
    memory of an evicted block alive.
    """

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._windows: OrderedDict[tuple[int, ...], Window] = OrderedDict()

    def get(self, blocks: Sequence[HostBlock]) -> Window:
        """The window over ``blocks`` (one row size, in this order; at least one)."""
        key = tuple(b.seq for b in blocks)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = Window.over(blocks)
            if len(self._windows) > self._size:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return window

    def drop(self, block: HostBlock) -> None:
        """Forget every window that covers ``block``."""
        for key in [k for k in self._windows if block.seq in k]:
            del self._windows[key]

    def __len__(self) -> int:
        return len(self._windows)
