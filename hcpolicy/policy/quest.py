"""Quest: query-aware sparse attention over pages of the device KV (nothing is evicted).

Every decode step, each KV head's device entries are cut into pages of ``page_size``
consecutive entries; a page's element-wise min and max key bound q . k for any key in it,
and the step attends only to the pages with the highest bound. Memory does not drop, the
bytes read per step do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
import torch.nn.functional as F

from hcpolicy._validate import is_compression, integer
from hcpolicy.actions import Action, Attend, Selection
from hcpolicy.capabilities import Requirements
from hcpolicy.observe import LayerCache, Observation
from hcpolicy.policy.base import Policy
from hcpolicy.spec import ModelSpec


def page_bounds(cache: LayerCache, page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Element-wise min and max key of each page, and which pages hold entries.

    Returns lo, hi: float32 [B, H_kv, N, D] with N = ceil(L / page_size) (0 for empty pages)
    and page_valid: bool [B, H_kv, N].
    """
    b, h, length, d = cache.keys.shape
    n = math.ceil(length / page_size)
    valid = cache.valid().unsqueeze(-1)  # [B, H_kv, L, 1]
    keys = cache.keys.float()  # [B, H_kv, L, D]
    pad = (0, 0, 0, n * page_size - length)  # pad L up to whole pages
    lo = F.pad(keys.masked_fill(~valid, math.inf), pad, value=math.inf)
    hi = F.pad(keys.masked_fill(~valid, -math.inf), pad, value=-math.inf)
    lo = lo.view(b, h, n, page_size, d).amin(dim=3)  # [B, H_kv, N, D]
    hi = hi.view(b, h, n, page_size, d).amax(dim=3)
    first = torch.arange(n, device=keys.device) * page_size  # [N] entry index of each page start
    page_valid = first < cache.lengths.unsqueeze(-1)  # [B, H_kv, N]
    empty = ~page_valid.unsqueeze(-1)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0), page_valid


def page_scores(queries: torch.Tensor, cache: LayerCache, page_size: int) -> torch.Tensor:
    """Quest's upper bound of q . k per page: sum_d max(q_d * min_d, q_d * max_d).

    queries: [B, H_q, D] (one decode token). Returns float32 [B, H_kv, N]; pages without
    entries score -inf. GQA: the max over the group's query heads, so the score stays an
    upper bound for every head that will read the chosen pages (a mean would not).
    """
    lo, hi, page_valid = page_bounds(cache, page_size)  # [B, H_kv, N, D] x2, [B, H_kv, N]
    b, h_q, d = queries.shape
    q = queries.float().view(b, cache.num_kv_heads, h_q // cache.num_kv_heads, d)  # [B, H_kv, G, D]
    # max(q*lo, q*hi) is q*hi where q >= 0 and q*lo where q < 0 (lo <= hi): two matmuls, no
    # [.., N, D] product tensor
    bound = torch.einsum("bhgd,bhnd->bhgn", q.clamp(min=0), hi) + torch.einsum(
        "bhgd,bhnd->bhgn", q.clamp(max=0), lo
    )  # [B, H_kv, G, N]
    return bound.amax(dim=2).masked_fill(~page_valid, -math.inf)


@attrs.define(kw_only=True)
class Quest(Policy):
    """Quest: each decode step attends only to the KV pages with the highest query-aware bound.

    Per head, it keeps the page holding the newest token plus the top-scoring full pages that
    fit in ``compression`` of the head's device entries (always at least that one page).
    """

    compression: float = attrs.field(default=0.5, validator=is_compression)
    page_size: int = attrs.field(default=16, validator=integer(1))
    _spec: ModelSpec | None = attrs.field(default=None, init=False, repr=False)

    def requirements(self) -> Requirements:
        return Requirements(actions={Attend}, decode_observations=True)

    def reset(self, spec: ModelSpec, batch_size: int) -> None:
        self._spec = spec

    def prefill(self, obs: Observation) -> Sequence[Action]:
        self._require_reset(self._spec)
        return ()

    def decode(self, obs: Observation) -> Sequence[Action]:
        self._require_reset(self._spec)
        cache = obs.cache
        scores = page_scores(obs.queries[:, :, -1], cache, self.page_size)  # [B, H_kv, N]
        pages = self._pick_pages(scores, cache.lengths)  # [B, H_kv, N] bool
        selection = self._positions(pages, cache)
        return [Attend(layer=obs.layer, heads=range(cache.num_kv_heads), selection=selection)]

    def _pick_pages(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Which pages each head attends to. scores: [B, H_kv, N]; lengths: [B, H_kv]."""
        p = self.page_size
        n_pages = (lengths + p - 1) // p  # [B, H_kv]
        newest = ((lengths - 1) // p).clamp(min=0)  # page of the last (newest) entry
        newest_size = lengths - newest * p  # 1..P entries in that page
        allowed = (lengths.double() * self.compression).floor().long()  # token budget
        # the other pages are all full, so this many of them fit beside the newest page
        extra = torch.minimum((allowed - newest_size).clamp(min=0) // p, n_pages - 1)
        count = torch.where(lengths > 0, extra + 1, 0)  # [B, H_kv]
        scores = scores.scatter(-1, newest.unsqueeze(-1), math.inf)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [B, H_kv, N]
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        return rank < count.unsqueeze(-1)

    def _positions(self, pages: torch.Tensor, cache: LayerCache) -> Selection:
        """Logical positions of the entries in the chosen pages, ascending, padded."""
        length = cache.keys.shape[2]
        keep = pages.repeat_interleave(self.page_size, dim=-1)[..., :length] & cache.valid()  # [B, H_kv, L]
        # A head picks at most max(page_size, floor(C * L)) entries (see _pick_pages), so the
        # padding width comes from host-known shapes: no device->host sync per step.
        width = min(length, max(self.page_size, math.floor(self.compression * length)))
        slot = torch.where(keep, keep.cumsum(dim=-1) - 1, width)  # dropped entries -> spare slot
        out = torch.zeros(*keep.shape[:2], width + 1, dtype=torch.int64, device=keep.device)
        out.scatter_(-1, slot, cache.positions)  # entries are ascending, so slots are too
        return Selection(indices=out[..., :width], lengths=keep.sum(dim=-1))
