"""Host values to the device without a host sync."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def upload(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """int64 ``values`` on ``device``. A plain ``torch.tensor(values, device=cuda)`` copies
    from pageable memory and waits for the stream; this goes through pinned memory, which
    torch's caching host allocator keeps until the copy is done, and never waits."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a CPU ``src``, the same way as ``upload``: on CUDA from a
    pinned snapshot, non-blocking (``src`` itself may change at once)."""
    if dst.device.type != "cuda":
        dst.copy_(src)
        return
    dst.copy_(src.pin_memory(), non_blocking=True)
