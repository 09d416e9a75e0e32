"""Each row's top-n entries as ascending positions, without sorting.

A top-n by (score descending, index ascending) over a row whose positions ascend with the
index is, in position order, simply the entries kept by the threshold rule of
``select.kth_largest``: "above the n-th largest value v, plus the first ``ties`` copies of
v". ``top_positions`` finds v per row (the radix select) and compacts the kept entries in
index order; on CUDA the compaction is two Triton launches (``_compact_triton``), which
replaces the two sorts of [rows, L] a sort-based top-n takes. Elsewhere (and on CUDA
without triton) ``top_positions_reference`` does the same in torch ops.
"""

from __future__ import annotations

import torch

from hcpolicy.kernels._triton import have_triton
from hcpolicy.kernels.select import kth_largest


def top_positions(x: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor, group: int,
                  width: int) -> torch.Tensor:  # fmt: skip
    """x: [Q, L] float32 scores, non-negative and finite (not checked: that would sync);
    lengths: [Q * group] int64 on x's device, row r takes the top lengths[r] entries of
    score row r // group (ties to the lower index; 0 takes none); positions: [B, L] int64,
    ascending along L, score row q's are positions[q % B]; width: a host bound of
    ``lengths``. Returns [Q * group, width] int64: each row's kept positions, ascending,
    then zeros. Never syncs the host."""
    if x.ndim != 2 or x.dtype != torch.float32:
        raise ValueError(f"x must be [Q, L] float32, got {tuple(x.shape)} {x.dtype}")
    if positions.ndim != 2 or positions.shape[1] != x.shape[1] or x.shape[0] % positions.shape[0]:
        raise ValueError(f"positions must be [B, L] with B dividing Q, got {tuple(positions.shape)} for x "
                         f"{tuple(x.shape)}")  # fmt: skip
    if lengths.shape != (x.shape[0] * group,):
        raise ValueError(f"lengths must be [Q * group] = [{x.shape[0] * group}], got {tuple(lengths.shape)}")
    if not 0 <= width <= x.shape[1]:
        raise ValueError(f"width must be in [0, L] = [0, {x.shape[1]}], got {width}")
    rows = x.repeat_interleave(group, dim=0)  # [R, L]: one select per row
    kth = kth_largest(rows, lengths.clamp(min=1, max=x.shape[1]))
    values = torch.where(lengths > 0, kth.values, float("inf"))  # a row of length 0 keeps nothing
    if x.is_cuda and have_triton():
        from hcpolicy.kernels._compact_triton import top_positions_triton

        pos = positions if positions.stride(1) == 1 else positions.contiguous()
        return top_positions_triton(x.contiguous(), values, kth.ties, lengths, pos, group, width)
    return top_positions_reference(rows, values, kth.ties, lengths, positions, group, width)


def top_positions_reference(rows: torch.Tensor, values: torch.Tensor, ties: torch.Tensor, lengths: torch.Tensor,
                            positions: torch.Tensor, group: int, width: int) -> torch.Tensor:  # fmt: skip
    """The threshold rule in torch ops: rows [R, L] (row r's scores), values/ties [R] (its
    n-th largest value, +inf for a row of length 0, and the copies of it kept), lengths
    [R], positions [B, L] (row r's are those of score row r // group, modulo B)."""
    r = rows.shape[0]
    gt, eq = rows > values[:, None], rows == values[:, None]
    keep = gt | (eq & (eq.cumsum(-1) - 1 < ties[:, None]))  # [R, L]
    pos = positions[(torch.arange(r, device=rows.device) // group) % positions.shape[0]]  # [R, L]
    slot = torch.where(keep, keep.cumsum(-1) - 1, width).clamp(max=width)
    out = torch.zeros(r, width + 1, dtype=positions.dtype, device=rows.device)
    out.scatter_(1, slot, pos)
    return out[:, :width]
