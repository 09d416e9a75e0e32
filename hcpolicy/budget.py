"""Allocators: how many prompt tokens each KV head keeps on the device.

An allocator sees one layer at a time and returns budgets [B, H_kv]. ``compression`` is
always the fraction of the full prompt KV kept on the device (C in the paper).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from hcpolicy._validate import fraction, non_negative, positive, unit_interval
from hcpolicy.spec import ModelSpec

if TYPE_CHECKING:
    from hcpolicy.profile import HeadProfile


@attrs.frozen
class BudgetRequest:
    """One layer's question to an allocator.

    length: prompt tokens L; batch_size: B; scores: [B, H_kv, L] importance (needed by
    score-driven allocators such as Ada, else None).
    """

    spec: ModelSpec
    layer: int = attrs.field(validator=non_negative)
    length: int = attrs.field(validator=positive)
    compression: float = attrs.field(validator=fraction)
    batch_size: int = attrs.field(default=1, validator=positive)
    scores: torch.Tensor | None = None
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"), converter=torch.device)

    def __attrs_post_init__(self) -> None:
        if self.layer >= self.spec.num_layers:
            raise ValueError(f"layer {self.layer} out of range for {self.spec.num_layers} layers")

    def fill(self, per_head: torch.Tensor | int) -> torch.Tensor:
        """Broadcast per-head budgets ([H_kv] or a scalar) to int64 [B, H_kv]."""
        t = torch.as_tensor(per_head, dtype=torch.int64, device=self.device)
        return t.expand(self.batch_size, self.spec.num_kv_heads).clone()


class Allocator(ABC):
    """Extension point: subclass and implement ``budgets``.

    ``equal_across_heads`` tells backends whether a layer's heads always get one budget
    (then a cache without per-head lengths can serve it).
    """

    equal_across_heads: ClassVar[bool] = False

    @abstractmethod
    def budgets(self, request: BudgetRequest) -> torch.Tensor:
        """Tokens to keep per head: int64 [B, H_kv], each in [0, L]."""


@attrs.frozen
class UniformAllocator(Allocator):
    """Every head keeps round(C * L) tokens."""

    equal_across_heads: ClassVar[bool] = True

    def budgets(self, request: BudgetRequest) -> torch.Tensor:
        return request.fill(min(request.length, round(request.compression * request.length)))


@attrs.frozen
class PyramidAllocator(Allocator):
    """PyramidKV: budgets fall linearly from the first layer to the last, averaging C * L.

    The last layer keeps avg / beta; the first keeps 2 * avg - avg / beta. When that first
    budget would exceed L it is capped at L and the last raised to 2 * avg - L, so the mean
    stays C * L (and C = 1 keeps everything).
    """

    equal_across_heads: ClassVar[bool] = True

    beta: float = attrs.field(default=20.0, validator=positive)

    def budgets(self, request: BudgetRequest) -> torch.Tensor:
        avg = request.compression * request.length
        n = request.spec.num_layers
        if n == 1:
            return request.fill(min(request.length, max(1, round(avg))))
        low = avg / self.beta
        high = 2 * avg - low
        if high > request.length:
            high = request.length
            low = 2 * avg - high
        frac = request.layer / (n - 1)
        per_layer = high - (high - low) * frac
        return request.fill(min(request.length, max(1, round(per_layer))))


@attrs.frozen
class AdaAllocator(Allocator):
    """Ada-KV: a layer's budget C * L * H_kv goes to the globally highest scores across heads.

    Each head is first guaranteed ``floor(safeguard * C * L)`` of its own top tokens, so no
    head is starved; the rest is the global top over the remaining entries.
    """

    safeguard: float = attrs.field(default=0.2, validator=unit_interval)

    def budgets(self, request: BudgetRequest) -> torch.Tensor:
        if request.scores is None:
            raise ValueError("AdaAllocator needs importance scores [B, H_kv, L]")
        scores = request.scores.float()  # [B, H_kv, L]
        b, h, length = scores.shape
        per_head = min(length, round(request.compression * length))
        total = per_head * h
        floor = min(per_head, math.floor(self.safeguard * per_head))
        ranked = torch.sort(scores, dim=-1, descending=True, stable=True).values  # [B, H, L]
        rest = ranked[..., floor:].reshape(b, -1)  # entries not already guaranteed
        extra = total - floor * h
        budgets = torch.full((b, h), floor, dtype=torch.int64, device=scores.device)
        if extra > 0:
            top = torch.topk(rest, extra, dim=-1, sorted=False).indices  # [B, extra]
            head_of = torch.div(top, length - floor, rounding_mode="floor")
            budgets += torch.zeros_like(budgets).scatter_add_(1, head_of, torch.ones_like(head_of))
        return budgets


@attrs.frozen
class InverseStabilityAllocator(Allocator):
    """HeteroCache: full heads keep L; anchor and satellite head h keeps min(base * r_h, L).

    base = (C * H - F) * L / (H - F) with H the KV heads of the whole model and F the full
    (pivot + volatile) heads, so that C is the fraction of the full KV kept on the device.
    """

    profile: "HeadProfile"

    def base(self, compression: float, length: int) -> float:
        h = self.profile.total_heads
        f = self.profile.num_full_heads
        if compression * h <= f:
            raise ValueError(
                f"compression {compression:g} is too low for this profile: its {f} full heads "
                f"of {h} already hold {f / h:.4f} of the KV; choose compression > {f / h:.4f}"
            )
        return (compression * h - f) * length / (h - f)

    def budgets(self, request: BudgetRequest) -> torch.Tensor:
        if request.compression >= 1.0:
            # base = L there, and min(L * r_h, L) would cut every head with r_h < 1: C = 1
            # must mean the full KV
            return request.fill(request.length)
        base = self.base(request.compression, request.length)
        per_head = [
            request.length if ratio is None else min(request.length, math.floor(base * ratio))
            for ratio in self.profile.ratios[request.layer]
        ]
        return request.fill(torch.tensor(per_head))


def sequence_budgets(
    allocator: Allocator,
    spec: ModelSpec,
    layer: int,
    compression: float,
    prompt_length: int,
    scores: torch.Tensor | None,
    starts: torch.Tensor | Sequence[int] | None,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Budgets [B, H_kv] where each sequence's budget follows its own real length.

    Left padding (``starts`` [B]) makes sequences of one batch shorter than
    ``prompt_length``; each is then budgeted as a prompt of ``prompt_length - starts[b]``
    tokens (scores: [B, H_kv, L] or None). Without padding this is one request.
    Host ``starts`` (ints) cost no sync, a device tensor one read. Without scores (an
    allocator that reads none) the budgets are made on the CPU for ``batch_size``
    sequences (default: one per start, else 1): host numbers, read for free.
    """
    device = scores.device if scores is not None else torch.device("cpu")
    if starts is None:
        b = scores.shape[0] if scores is not None else batch_size or 1
        return allocator.budgets(BudgetRequest(
            spec=spec, layer=layer, length=prompt_length, compression=compression, batch_size=b,
            scores=scores, device=device,
        ))  # fmt: skip
    rows = []
    host_starts = starts.tolist() if isinstance(starts, torch.Tensor) else starts  # a device tensor: one host read
    for b, start in enumerate(host_starts):
        if start >= prompt_length:
            raise ValueError(f"sequence {b} of the batch is all padding (it starts at {start} of a "
                             f"{prompt_length}-token prompt): drop it or give it at least one token")  # fmt: skip
        row_scores = scores[b : b + 1, :, start:prompt_length] if scores is not None else None
        rows.append(allocator.budgets(BudgetRequest(
            spec=spec, layer=layer, length=prompt_length - start, compression=compression, batch_size=1,
            scores=row_scores, device=device,
        )))  # fmt: skip
    return torch.cat(rows, dim=0)
