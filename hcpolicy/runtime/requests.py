"""Validation of what callers hand the runtime: ValueError (or KeyError) before any copy."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

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
    """Check everything but the range of ``rows`` (see ``check_ranges``)."""
    key = block.key
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.ndim != 1:
        got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"rows for {key!r} must be a 1-D int64 tensor, got {got}")
    if rows.device.type != "cpu" and rows.device != device:
        raise ValueError(f"rows for {key!r} are on {rows.device}; use the CPU or {device}")
    want = (rows.shape[0], *block.row_shape)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out for {key!r} must be a torch.Tensor, got {type(out).__name__}")
    if out.device != device or out.dtype != block.dtype or tuple(out.shape) != want:
        raise ValueError(f"out for {key!r} must be {block.dtype} {want} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out for {key!r} must be contiguous")
    return RecallRequest(block, rows, out)


def check_ranges(reqs: Sequence[RecallRequest], check_device_rows: bool) -> None:
    """ValueError unless every row is in [0, rows of its block): one vectorised pass per
    device. Device rows are checked only if ``check_device_rows``, at one host sync."""
    by_device: dict[torch.device, list[RecallRequest]] = {}
    for r in reqs:
        if r.n and (r.rows.device.type == "cpu" or check_device_rows):
            by_device.setdefault(r.rows.device, []).append(r)
    for device, group in by_device.items():
        if len(group) == 1:  # one pass, no concatenation
            lo, hi = torch.aminmax(group[0].rows)
            if lo.item() < 0 or hi.item() >= group[0].block.rows:
                _raise_range(group[0])
            continue
        rows = torch.cat([r.rows for r in group])  # [N]
        limits = torch.repeat_interleave(
            torch.tensor([r.block.rows for r in group], device=device),
            torch.tensor([r.n for r in group], device=device),
        )  # [N]
        # For device rows this .item() is the host sync that check_device_rows documents.
        if bool(((rows < 0) | (rows >= limits)).any().item()):
            _raise_range(next(r for r in group if bool(((r.rows < 0) | (r.rows >= r.block.rows)).any())))


def _raise_range(bad: RecallRequest) -> None:
    lo, hi = torch.aminmax(bad.rows)
    raise ValueError(f"rows for {bad.block.key!r} must be in [0, {bad.block.rows}), "
                     f"got min {lo.item()} max {hi.item()}")
