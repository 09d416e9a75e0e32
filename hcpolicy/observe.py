"""Observations: what a backend hands a policy at each layer of prefill and decode."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

import attrs
import torch

from hcpolicy._validate import non_negative, positive, tensor


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@attrs.frozen
class LayerCache:
    """The device-resident KV of one layer, ragged per (sequence, KV head), padded.

    keys: [B, H_kv, L, D]; positions: [B, H_kv, L] int64 logical positions, ascending in
    the valid prefix; lengths: [B, H_kv] int64 valid entries per head; values: optional
    [B, H_kv, L, D]; starts: optional [B] int64 first real position of each sequence (the
    positions before it are left padding of a batch and are never valid); host_starts: the
    same on the host, where the backend knows them (``starts_list`` then reads nothing from
    the device). A dense (uncompressed) cache has lengths == L everywhere.
    """

    keys: torch.Tensor = attrs.field(validator=tensor(ndim=4))
    positions: torch.Tensor = attrs.field(validator=tensor(ndim=3, dtype=torch.int64))
    lengths: torch.Tensor = attrs.field(validator=tensor(ndim=2, dtype=torch.int64))
    values: torch.Tensor | None = attrs.field(default=None)
    starts: torch.Tensor | None = attrs.field(default=None)
    host_starts: tuple[int, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(lambda s: tuple(int(x) for x in s))
    )

    def __attrs_post_init__(self) -> None:
        b, h, length, _ = self.keys.shape
        if self.starts is not None and tuple(self.starts.shape) != (b,):
            raise ValueError(f"starts {tuple(self.starts.shape)} must be {(b,)}")
        if self.host_starts is not None and (self.starts is None or len(self.host_starts) != b):
            raise ValueError(f"host_starts {self.host_starts} need starts and must hold {b} values")
        if tuple(self.positions.shape) != (b, h, length):
            raise ValueError(f"positions {tuple(self.positions.shape)} must be {(b, h, length)}")
        if tuple(self.lengths.shape) != (b, h):
            raise ValueError(f"lengths {tuple(self.lengths.shape)} must be {(b, h)}")
        if self.values is not None and self.values.shape[:3] != self.keys.shape[:3]:
            raise ValueError(f"values {tuple(self.values.shape)} must match keys {tuple(self.keys.shape)}")

    @classmethod
    def dense(
        cls, keys: torch.Tensor, values: torch.Tensor | None = None, starts: torch.Tensor | None = None,
        host_starts: Sequence[int] | None = None,
    ) -> "LayerCache":  # fmt: skip
        """An uncompressed cache: every head holds positions 0..L-1. keys: [B, H_kv, L, D]."""
        b, h, length, _ = keys.shape
        positions = torch.arange(length, device=keys.device).expand(b, h, length)
        lengths = torch.full((b, h), length, dtype=torch.int64, device=keys.device)
        return cls(keys=keys, positions=positions, lengths=lengths, values=values, starts=starts,
                   host_starts=host_starts)  # fmt: skip

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    def starts_list(self) -> list[int] | None:
        """``starts`` on the host (None without left padding): ``host_starts`` when the
        backend gave them, else read from the device (one host sync)."""
        if self.starts is None:
            return None
        return list(self.host_starts) if self.host_starts is not None else self.starts.tolist()

    def valid(self) -> torch.Tensor:
        """[B, H_kv, L] bool: real entries (neither storage padding nor left padding)."""
        ar = torch.arange(self.keys.shape[2], device=self.keys.device)
        valid = ar < self.lengths.unsqueeze(-1)
        if self.starts is not None:
            valid &= self.positions >= self.starts.view(-1, 1, 1)
        return valid


@attrs.frozen
class Observation:
    """One layer's view at one step.

    queries: [B, H_q, Q, D] post-RoPE queries (prefill: the last Q prompt queries the policy
    asked for; decode: the new token, Q = 1); query_positions: [Q] int64 logical positions;
    prompt_length: tokens in the prompt (positions below it are compressible and, once
    offloaded, recallable); step: decode steps taken before this one (0 at prefill);
    heads: the KV heads ``cache`` covers, in order (None = all of them; a backend passes
    what ``Policy.observed_heads`` asked for).
    offloaded: decode only, where the backend offers it: ``offloaded(heads)`` -> a
    LayerCache of the full KV those heads of this layer had when they were offloaded (read
    back from the host store; KeyError for a head that was never offloaded). None: the
    backend cannot read its host store here.
    recorded: decode only: the queries were recorded over consecutive steps, each token
    already attended when its step ran (a backend calling the policy once per period);
    False: they are this forward's new tokens (one per step, or a chunk such as a question
    appended after prefill).
    """

    phase: Phase
    layer: int = attrs.field(validator=non_negative)
    queries: torch.Tensor = attrs.field(validator=tensor(ndim=4))
    query_positions: torch.Tensor = attrs.field(validator=tensor(ndim=1, dtype=torch.int64))
    cache: LayerCache
    prompt_length: int = attrs.field(validator=positive)
    step: int = attrs.field(default=0, validator=non_negative)
    heads: tuple[int, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    offloaded: Callable[[Sequence[int]], LayerCache] | None = attrs.field(default=None, eq=False, repr=False)
    recorded: bool = False

    def __attrs_post_init__(self) -> None:
        if self.heads is not None and len(self.heads) != self.cache.num_kv_heads:
            raise ValueError(f"heads names {len(self.heads)} heads but the cache holds {self.cache.num_kv_heads}")
        if self.queries.shape[2] != self.query_positions.shape[0]:
            raise ValueError(
                f"queries hold {self.queries.shape[2]} positions but query_positions has "
                f"{self.query_positions.shape[0]}"
            )
        if self.queries.shape[0] != self.cache.batch_size:
            raise ValueError("queries and cache disagree on batch size")
        if self.heads is None and self.queries.shape[1] % self.cache.num_kv_heads:
            raise ValueError(
                f"query heads ({self.queries.shape[1]}) must be a multiple of KV heads "
                f"({self.cache.num_kv_heads})"
            )

    def head_index(self, head: int) -> int:
        """Where KV head ``head`` sits in ``cache`` (ValueError if it was not observed)."""
        if self.heads is None:
            return head
        if head not in self.heads:
            raise ValueError(f"KV head {head} was not observed (observed: {self.heads})")
        return self.heads.index(head)
