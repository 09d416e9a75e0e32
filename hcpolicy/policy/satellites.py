"""Satellites' recall sets from their pivots' scores, for many pivots at once.

HeteroCache's satellites never score their own attention: when a pivot drifts, each of its
satellites takes the pivot's top tokens. ``satellite_sets`` does it for P pivots in one
batch of sorts (a decision step where every layer's pivot fired issues a handful of kernel
launches, not a handful per pivot). Pivots with fewer satellites than the widest pad their
budgets with zeros; a pivot's rows of the result are its Selection.
"""

from __future__ import annotations

import torch

from hcpolicy.kernels.compact import top_positions
from hcpolicy.scores import topk_selection


def satellite_sets(scores: torch.Tensor, positions: torch.Tensor, budgets: torch.Tensor, width: int,
                   faithful: bool, ascending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """scores [P, B, L] (pivots' pooled attention); positions [B, L]; budgets [P, B, S]
    int64 (satellite i keeps l_i tokens; 0 pads a pivot's missing satellites); width: a
    host bound of the budgets. Returns indices [P, B, S, W] (ascending positions, 0 past
    each length) and lengths [P, B, S].

    Default: satellite i takes the top-l_i of the pivot's ranking (ties to the lower
    index): what ``topk_selection`` gives for S copies of the row, from one sort.
    ``faithful``: the reference code's rule, the top-max(l) candidates sorted by position,
    of which satellite i takes the first l_i.

    ``ascending``: the caller knows that ``positions`` ascend along L and that the scores are
    non-negative and finite (attention probabilities): the default sets then come from a
    radix select and a compaction per satellite (``kernels.compact.top_positions``), the
    same sets without the two sorts of [P, B, L]."""
    p, b, s = budgets.shape
    length = scores.shape[-1]
    w = min(width, length)
    lengths = budgets.to(scores.device).clamp(min=0, max=length).to(torch.int64)  # [P, B, S]
    if faithful:
        widest = lengths.max(dim=-1).values.view(p * b, 1)  # [P * B, 1]
        rows = scores.reshape(p * b, 1, length)
        pos = positions.unsqueeze(0).expand(p, b, length).reshape(p * b, 1, length)
        cand = topk_selection(rows, widest, pos, width=w)  # [P * B, 1, W]
        indices = cand.indices.view(p, b, 1, -1).expand(p, b, s, -1).contiguous()
        return indices, torch.minimum(lengths, cand.lengths.view(p, b, 1))
    if ascending:
        rows = scores.float().reshape(p * b, length)
        kept = top_positions(rows, lengths.clamp(max=w).flatten(), positions, s, w)  # [P * B * S, W]
        return kept.view(p, b, s, w), lengths
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :w]  # [P, B, W]
    picked, rank = torch.sort(positions.unsqueeze(0).expand(p, b, length).gather(-1, order), dim=-1)
    keep = rank.unsqueeze(2) < lengths.unsqueeze(-1)  # [P, B, S, W]: in satellite i's top l_i
    # each satellite's kept entries to its front, in position order: a stable compaction
    # (the running count of kept entries is each one's slot; the others go to a spare slot)
    slot = torch.where(keep, keep.cumsum(-1) - 1, w)
    indices = torch.zeros(p, b, s, w + 1, dtype=picked.dtype, device=picked.device)
    indices.scatter_(-1, slot, picked.unsqueeze(2).expand(p, b, s, w))
    return indices[..., :w], lengths
