"""Validation of what callers hand the runtime: ValueError (or KeyError) before any copy."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from hcpolicy.runtime import hostops
from hcpolicy.runtime.plan import RecallRequest
from hcpolicy.runtime.store import HostBlock, HostStore


def check_src(store: HostStore, device: torch.device, key: Hashable, src: object) -> None:
    """``src`` must be a [L >= 1, *row] tensor on ``device`` with a non-empty row."""
    if key in store:
        raise ValueError(f"key {key!r} is already in the store; evict it first")
    if not isinstance(src, torch.Tensor):
        raise ValueError(f"src must be a torch.Tensor, got {type(src).__name__}")
    if src.device != device:
        raise ValueError(f"src is on {src.device}, the runtime on {device}")
    if src.ndim < 1 or src.shape[0] < 1 or src[0].numel() < 1:
        raise ValueError(f"src must be [L >= 1, *row] with a non-empty row, got {tuple(src.shape)}")


def make_request(block: HostBlock, device: torch.device, rows: object, out: object) -> RecallRequest:
    """Check everything but the range of ``rows`` (see ``check_ranges``).

    Runs once per request of a batch (256 per recall_many for a layer's KV heads, say):
    cheap attribute reads first, messages built only on failure.
    """
    if not (isinstance(rows, torch.Tensor) and rows.dtype == torch.int64 and rows.ndim == 1):
        got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"rows for {block.key!r} must be a 1-D int64 tensor, got {got}")
    if not rows.is_cpu and rows.device != device:
        raise ValueError(f"rows for {block.key!r} are on {rows.device}; use the CPU or {device}")
    if not (isinstance(out, torch.Tensor) and out.dtype == block.dtype and out.device == device
            and out.shape == (rows.shape[0], *block.row_shape)):
        want = (rows.shape[0], *block.row_shape)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out for {block.key!r} must be a torch.Tensor, got {type(out).__name__}")
        raise ValueError(f"out for {block.key!r} must be {block.dtype} {want} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out for {block.key!r} must be contiguous")
    return RecallRequest(block, rows, out)


def check_ranges(reqs: Sequence[RecallRequest], check_device_rows: bool) -> None:
    """ValueError unless every row is in [0, rows of its block). Host rows: one pass on the
    calling thread (``hostops``). Device rows, only if ``check_device_rows``: one pass on
    the device and one host sync for the whole batch."""
    host = [r for r in reqs if r.rows.is_cpu and r.n]
    device = [r for r in reqs if not r.rows.is_cpu and r.n] if check_device_rows else []
    if host:
        rows = host[0].rows if len(host) == 1 else hostops.concat([r.rows for r in host])  # [N]
        lo, hi = hostops.min_max(rows)
        # Exact when every block has as many rows as the shortest; else look closer.
        if lo < 0 or hi >= min(r.block.rows for r in host):
            if len(host) == 1 or hostops.any_outside(rows, [r.block.rows for r in host], [r.n for r in host]):
                _raise_range(next(r for r in host if _outside(r)))
    if device:
        rows = device[0].rows if len(device) == 1 else torch.cat([r.rows for r in device])  # [N]
        limits = torch.tensor([r.block.rows for r in device], device=rows.device)  # [R]
        counts = torch.tensor([r.n for r in device], device=rows.device)
        per_row = torch.repeat_interleave(limits, counts, output_size=rows.numel())  # [N]
        # This .item() is the host sync that check_device_rows documents.
        if bool(((rows < 0) | (rows >= per_row)).any().item()):
            _raise_range(next(r for r in device if _outside(r)))


def _outside(r: RecallRequest) -> bool:
    return bool(((r.rows < 0) | (r.rows >= r.block.rows)).any())


def _raise_range(bad: RecallRequest) -> None:
    lo, hi = torch.aminmax(bad.rows)
    raise ValueError(f"rows for {bad.block.key!r} must be in [0, {bad.block.rows}), "
                     f"got min {lo.item()} max {hi.item()}")
