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
