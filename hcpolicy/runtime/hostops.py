"""The few passes a recall makes over host-side row indices, on the calling thread.

torch runs CPU ops over more than 32768 elements on its OpenMP pool. For a recall's
passes over its host rows (a 64 MiB recall of 512-byte rows has 131072 of them, 1 MiB)
waking that pool costs more than the pass: tens of microseconds per op on an idle VM,
and a whole scheduler tick per op when the CPUs are shared (12 ms per op measured on a
2-CPU machine under load, against 20 us single-threaded). numpy runs them on the calling
thread. Without numpy (it is optional) torch does them.
"""

from __future__ import annotations

from typing import Sequence

import torch

_SERIAL = 32768
"""torch's parallel grain (at::internal::GRAIN_SIZE): an op over fewer elements runs serially."""

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with every supported setup we test
    np = None


def min_max(rows: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty 1-D int64 CPU tensor."""
    if np is None:
        lo, hi = torch.aminmax(rows)
        return int(lo), int(hi)
    a = rows.numpy()
    return int(a.min()), int(a.max())


def concat(parts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """1-D int64 CPU ``parts`` one after the other, into ``out`` (a contiguous 1-D int64
    CPU tensor of exactly their total size) or a new tensor."""
    if out is None:
        out = torch.empty(sum(p.numel() for p in parts), dtype=torch.int64)
    if np is None or max(p.numel() for p in parts) <= _SERIAL:
        return torch.cat(list(parts), out=out)  # copies of <= _SERIAL elements stay serial
    dst, at = out.numpy(), 0
    for p in parts:
        n = p.numel()
        np.copyto(dst[at : at + n], p.numpy())
        at += n
    return out


def any_outside(rows: torch.Tensor, limits: Sequence[int], counts: Sequence[int]) -> bool:
    """Whether any of ``rows`` (1-D int64 CPU, ``counts[i]`` rows per request) is < 0 or
    >= its request's limit."""
    if np is None:
        lim = torch.repeat_interleave(torch.tensor(list(limits)), torch.tensor(list(counts)))
        return bool(((rows < 0) | (rows >= lim)).any())
    a = rows.numpy()
    return bool(((a < 0) | (a >= np.repeat(np.asarray(limits), np.asarray(counts)))).any())
