"""Tensor helpers shared by policies and the profiler: attention rows, pooling, top-k selection."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from hcpolicy.actions import Selection
from hcpolicy.observe import LayerCache

Reduce = Literal["mean", "max", "sum"]


def attention_weights(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    cache: LayerCache,
    *,
    chunk: int = 1024,
) -> torch.Tensor:
    """Softmax attention of queries over the cached keys, causal on logical positions.

    queries: [B, H_q, Q, D]; query_positions: [Q]. Returns float32 [B, H_q, Q, L]; padded and
    future keys get weight 0. Queries are processed ``chunk`` at a time to bound memory.
    """
    b, h_q, q_len, d = queries.shape
    h_kv = cache.num_kv_heads
    g = h_q // h_kv
    keys = cache.keys.float()  # [B, H_kv, L, D]
    valid = cache.valid()  # [B, H_kv, L]
    out = []
    for start in range(0, q_len, chunk):
        q = queries[:, :, start : start + chunk].float()  # [B, H_q, q, D]
        q = q.view(b, h_kv, g, q.shape[2], d)
        logits = torch.einsum("bhgqd,bhld->bhgql", q, keys) / math.sqrt(d)  # [B, H_kv, G, q, L]
        pos_q = query_positions[start : start + chunk].view(1, 1, 1, -1, 1)
        allowed = valid[:, :, None, None, :] & (cache.positions[:, :, None, None, :] <= pos_q)
        logits = logits.masked_fill(~allowed, float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no key are all -inf
        out.append(w.reshape(b, h_q, -1, w.shape[-1]))
    return torch.cat(out, dim=2)


def group_reduce(x: torch.Tensor, num_kv_heads: int, how: Reduce) -> torch.Tensor:
    """Fold the query heads of each GQA group: [B, H_q, ...] -> [B, H_kv, ...]."""
    b, h_q = x.shape[:2]
    grouped = x.reshape(b, num_kv_heads, h_q // num_kv_heads, *x.shape[2:])
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    if how == "sum":
        return grouped.sum(dim=2)
    raise ValueError(f"unknown reduction {how!r}; use 'mean', 'max' or 'sum'")


def pool1d(
    scores: torch.Tensor,
    kernel: int,
    how: Literal["avg", "max"] = "avg",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Smooth scores along the last dim with a centred window; same length out. [..., L].

    mask: [..., L] bool or None. Entries where it is False neither feed their neighbours
    nor change; every other entry pools over the unmasked entries of its window (so a mask
    edge is treated like the sequence edge).
    """
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    if mask is not None:
        return _masked_pool1d(scores, kernel, how, mask)
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if how == "avg":
        # count_include_pad=False keeps the edges comparable with the interior
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    elif how == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"unknown pooling {how!r}; use 'avg' or 'max'")
    return pooled.reshape(shape)


def _masked_pool1d(scores: torch.Tensor, kernel: int, how: str, mask: torch.Tensor) -> torch.Tensor:
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])  # [N, 1, L]
    keep = mask.expand(shape).reshape(-1, 1, shape[-1])  # [N, 1, L]
    pad = kernel // 2
    if how == "avg":
        # sum over kept neighbours / count of kept neighbours (avg_pool's 1/kernel cancels)
        total = F.avg_pool1d(x.masked_fill(~keep, 0.0), kernel, stride=1, padding=pad, count_include_pad=True)
        count = F.avg_pool1d(keep.to(x.dtype), kernel, stride=1, padding=pad, count_include_pad=True)
        pooled = total / count.clamp_min(torch.finfo(x.dtype).tiny)
    elif how == "max":
        pooled = F.max_pool1d(x.masked_fill(~keep, float("-inf")), kernel, stride=1, padding=pad)
    else:
        raise ValueError(f"unknown pooling {how!r}; use 'avg' or 'max'")
    return torch.where(keep, pooled, x).reshape(shape)


def topk_selection(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    width: int | None = None,
    host_budgets: torch.Tensor | None = None,
) -> Selection:
    """Per-head top-``budgets`` entries by score, returned as ascending logical positions.

    scores: [B, H, L] (higher = keep); budgets: [B, H] int64 (clamped to the valid count);
    positions: [B, H, L] logical positions of the entries; valid: [B, H, L] bool or None;
    width: a host-side upper bound of ``budgets`` that sizes the padding (None: read
    ``budgets.max()``, one host sync). Ties break towards the lower index.
    host_budgets: a CPU copy of ``budgets``, for a caller that knows each is within its
    head's valid count (a dense prefill cache holds L - starts[b] valid entries): it sizes
    the padding and travels as the selection's ``host_lengths``, so nothing is read.
    """
    b, h, length = scores.shape
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    counts = valid.sum(-1)
    budgets = torch.minimum(budgets.to(counts.device).clamp(min=0), counts)  # [B, H]
    masked = scores.float().masked_fill(~valid, float("-inf"))
    # stable descending sort: equal scores keep index order
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices  # [B, H, L]
    rank = torch.arange(length, device=scores.device)
    keep = rank < budgets.unsqueeze(-1)  # [B, H, L] in rank order
    picked = positions.gather(-1, order)  # [B, H, L]
    # push dropped entries to the end, then sort the kept ones by position
    sentinel = torch.iinfo(torch.int64).max
    picked = picked.masked_fill(~keep, sentinel)
    picked = torch.sort(picked, dim=-1).values
    if width is None and host_budgets is not None:
        width = int(host_budgets.max()) if host_budgets.numel() else 0
    if width is None:
        width = int(budgets.max()) if budgets.numel() else 0  # one host read per selection, not per token
    picked = picked[..., : min(width, length)]
    picked = picked.masked_fill(picked == sentinel, 0)
    return Selection(indices=picked.contiguous(), lengths=budgets.to(torch.int64), host_lengths=host_budgets)


def topk_sets(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Index sets of the k largest entries along the last dim: [..., L] -> [..., k] int64."""
    k = min(k, scores.shape[-1])
    return torch.topk(scores.float(), k, dim=-1, sorted=False).indices


def overlap(a: torch.Tensor, b: torch.Tensor, universe: int) -> torch.Tensor:
    """Overlap coefficient |A ∩ B| / min(|A|, |B|) of index sets.

    a: [..., k_a], b: [..., k_b] int64 indices in [0, universe), no duplicates within a set;
    leading dims broadcast. Returns float32 [...].
    """
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    a = a.expand(*lead, a.shape[-1])
    b = b.expand(*lead, b.shape[-1])
    member = torch.zeros(*lead, universe, dtype=torch.bool, device=a.device)
    member.scatter_(-1, a, True)
    inter = member.gather(-1, b).sum(-1).float()
    return inter / float(min(a.shape[-1], b.shape[-1]))
