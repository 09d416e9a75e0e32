"""Window scores: a monitor's pooled attention rows from logits a decode step left behind.

Input: base-2 logits ``logits [R, G, L]`` (R rows of G query heads over L keys) and per
tile of keys the max and the sum of exp2(logit - max) (``stats [R, G, T, 2]``). Output
``[R, L]`` float32: each query head's softmax over the L keys, reduced over the G heads
('max', 'mean' or 'sum', as ``scores.group_reduce``), then averaged over a centred window
of ``pool`` keys counting only keys that exist (``scores.pool1d`` without a mask): what
HeteroCache scores a pivot's query with.

On CUDA with triton, one kernel (grid: key blocks x rows); elsewhere torch ops.
"""

from __future__ import annotations

import torch

from hcpolicy.kernels._triton import have_triton
from hcpolicy.scores import Reduce, group_reduce, pool1d

REDUCE = {"max": 0, "mean": 1, "sum": 2}


def softmax_sums(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile (max, sum of exp2) [..., T, 2] -> the row's max and sum [...] (base 2)."""
    top = stats[..., 0].amax(-1)
    total = (stats[..., 1] * torch.exp2(stats[..., 0] - top.unsqueeze(-1))).sum(-1)
    return top, total


def window_scores_reference(logits: torch.Tensor, stats: torch.Tensor, gqa: Reduce, pool: int) -> torch.Tensor:
    """Torch ops: [R, G, L] logits, [R, G, T, 2] stats -> [R, L]."""
    top, total = softmax_sums(stats)
    probs = torch.exp2(logits - top.unsqueeze(-1)) / total.unsqueeze(-1)  # [R, G, L]
    return pool1d(group_reduce(probs, 1, gqa)[:, 0], pool)


def window_scores(
    logits: torch.Tensor, stats: torch.Tensor, gqa: Reduce, pool: int, out: torch.Tensor | None = None,
    top_histogram: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """[R, G, L] logits and [R, G, T, 2] stats (float32, contiguous) -> [R, L] float32,
    written to ``out`` when given. top_histogram: a zeroed [R, 256] int32 that the Triton
    path fills with each output row's top-byte counts, for ``select.kth_largest`` (the
    torch path leaves it alone: pass it on only from CUDA). No host sync (CUDA-graph safe)."""
    if logits.ndim != 3 or stats.ndim != 4 or stats.shape[:2] != logits.shape[:2] or stats.shape[-1] != 2:
        raise ValueError(f"logits must be [R, G, L] and stats [R, G, T, 2], got {tuple(logits.shape)} and "
                         f"{tuple(stats.shape)}")  # fmt: skip
    if logits.dtype != torch.float32 or stats.dtype != torch.float32:
        raise ValueError(f"logits and stats must be float32, got {logits.dtype} and {stats.dtype}")
    if gqa not in REDUCE:
        raise ValueError(f"gqa must be one of {tuple(REDUCE)}, got {gqa!r}")
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"pool must be an odd window >= 1, got {pool}")
    r, _, length = logits.shape
    if out is None:
        out = torch.empty(r, length, dtype=torch.float32, device=logits.device)
    elif out.shape != (r, length) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{r}, {length}], got {tuple(out.shape)} {out.dtype}")
    if logits.is_cuda and have_triton():
        from hcpolicy.kernels._window_scores_triton import softmax_shift_triton, window_scores_triton

        shift = softmax_shift_triton(stats.contiguous())  # [R, G]
        window_scores_triton(logits.contiguous(), shift, REDUCE[gqa], pool, out, hist=top_histogram)
        return out
    out.copy_(window_scores_reference(logits, stats, gqa, pool))
    return out


def overlap_counts(scores: torch.Tensor, thresholds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """scores [R, L] float32, thresholds [R], masks [M, L] bool (row r is compared with
    mask row r % M) -> [R, 2] int64: mask members above the threshold, and equal to it.
    No host sync."""
    if scores.ndim != 2 or masks.ndim != 2 or masks.shape[1] != scores.shape[1] or scores.shape[0] % masks.shape[0]:
        raise ValueError(f"scores must be [R, L] and masks [M, L] with M dividing R, got {tuple(scores.shape)} and "
                         f"{tuple(masks.shape)}")  # fmt: skip
    if scores.is_cuda and have_triton():
        from hcpolicy.kernels._window_scores_triton import overlap_counts_triton

        return overlap_counts_triton(scores.contiguous(), thresholds.contiguous(), masks.contiguous()).long()
    member = masks.repeat(scores.shape[0] // masks.shape[0], 1)
    t = thresholds.unsqueeze(-1)
    return torch.stack([((scores > t) & member).sum(-1), ((scores == t) & member).sum(-1)], dim=-1)
