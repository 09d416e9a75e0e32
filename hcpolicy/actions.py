"""Cache actions: the data a policy returns and a backend executes.

Every token index in an action is a *logical position* (0 = first prompt token), never a
slot in some backend's storage, so the same action means the same thing on every backend
and after earlier evictions. Per-head sets are ragged; they travel padded as
``indices [B, H, K]`` with ``lengths [B, H]``: entries at or past a head's length are
padding and carry no meaning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TypeAlias

import attrs
import torch

from hcpolicy._device import upload
from hcpolicy._validate import non_negative, optional_tensor, tensor


def _heads(value: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(int(h) for h in value)


def _check_heads(_inst: object, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must name at least one KV head")
    if min(value) < 0:
        raise ValueError(f"{attribute.name} must be non-negative, got {value}")
    if len(set(value)) != len(value):
        raise ValueError(f"{attribute.name} has duplicates: {value}")


@attrs.frozen
class Selection:
    """A set of logical positions per (sequence, KV head), ascending, padded.

    indices: [B, H, K] int64; lengths: [B, H] int64 with 0 <= lengths <= K; host_lengths:
    optional CPU copy of ``lengths``, for a policy that knows them on the host (budgets that
    are host numbers): a backend then sizes its storage without reading the device.
    """

    indices: torch.Tensor = attrs.field(validator=tensor(ndim=3, dtype=torch.int64))
    lengths: torch.Tensor = attrs.field(validator=tensor(ndim=2, dtype=torch.int64))
    host_lengths: torch.Tensor | None = attrs.field(
        default=None, eq=False, validator=optional_tensor(ndim=2, dtype=torch.int64)
    )

    def __attrs_post_init__(self) -> None:
        if tuple(self.lengths.shape) != tuple(self.indices.shape[:2]):
            raise ValueError(
                f"lengths shape {tuple(self.lengths.shape)} must equal indices' leading dims "
                f"{tuple(self.indices.shape[:2])}"
            )
        host = self.host_lengths
        if host is not None:
            if host.device.type != "cpu" or host.shape != self.lengths.shape:
                raise ValueError(f"host_lengths must be a CPU tensor of shape {tuple(self.lengths.shape)}, "
                                 f"got {tuple(host.shape)} on {host.device}")  # fmt: skip
            if host.numel() and not 0 <= int(host.min()) <= int(host.max()) <= self.indices.shape[2]:
                raise ValueError(f"host_lengths must be in [0, {self.indices.shape[2]}], got {host.tolist()}")

    @property
    def num_heads(self) -> int:
        return self.indices.shape[1]

    def head(self, i: int) -> "Selection":
        """The selection of its ``i``-th head alone: [B, 1, K]."""
        host = None if self.host_lengths is None else self.host_lengths[:, i : i + 1]
        return Selection(indices=self.indices[:, i : i + 1], lengths=self.lengths[:, i : i + 1], host_lengths=host)

    def valid(self) -> torch.Tensor:
        """[B, H, K] bool: which entries are real (not padding)."""
        k = torch.arange(self.indices.shape[2], device=self.indices.device)
        return k < self.lengths.unsqueeze(-1)

    def as_lists(self) -> list[list[list[int]]]:
        """Host copy as nested lists (syncs; for tests, reports and host-side backends)."""
        lengths = self.lengths.tolist()
        rows = self.indices.tolist()
        return [[row[:n] for row, n in zip(rb, lb)] for rb, lb in zip(rows, lengths)]


def _selection_heads_match(inst: "Select | Recall | Attend", _a: attrs.Attribute, value: Selection) -> None:
    if value.num_heads != len(inst.heads):
        raise ValueError(
            f"selection covers {value.num_heads} heads but heads names {len(inst.heads)}: {inst.heads}"
        )


@attrs.frozen
class Select:
    """Keep exactly these positions of ``heads`` on the device; the rest leave the device.

    Positions a backend had offloaded (see ``Offload``) stay recallable from the host.
    """

    layer: int = attrs.field(validator=non_negative)
    heads: tuple[int, ...] = attrs.field(converter=_heads, validator=_check_heads)
    selection: Selection = attrs.field(validator=_selection_heads_match)


@attrs.frozen
class Offload:
    """Copy the full current KV of ``heads`` to the host store (before a Select drops any)."""

    layer: int = attrs.field(validator=non_negative)
    heads: tuple[int, ...] = attrs.field(converter=_heads, validator=_check_heads)


@attrs.frozen
class Recall:
    """Replace the offloaded positions ``heads`` hold on the device with ``selection``.

    Every recalled position must be in the host copy made by ``Offload``. Tokens that were
    never offloaded (generated after it) stay on the device untouched.
    """

    layer: int = attrs.field(validator=non_negative)
    heads: tuple[int, ...] = attrs.field(converter=_heads, validator=_check_heads)
    selection: Selection = attrs.field(validator=_selection_heads_match)


@attrs.frozen
class Attend:
    """For the current decode step only, attend ``heads`` to these device positions.

    Nothing is evicted: this is query-aware sparse attention (Quest). Positions must be
    on the device.
    """

    layer: int = attrs.field(validator=non_negative)
    heads: tuple[int, ...] = attrs.field(converter=_heads, validator=_check_heads)
    selection: Selection = attrs.field(validator=_selection_heads_match)


Action: TypeAlias = Select | Offload | Recall | Attend
ACTION_TYPES: tuple[type, ...] = (Select, Offload, Recall, Attend)


class ActionError(ValueError):
    """An action that cannot be executed against the current cache state."""


def consecutive(heads: Sequence[int]) -> slice | None:
    """``heads`` as a slice when they are consecutive and ascending, else None. Backends index
    device tensors with it: a slice is a view, while a Python list index copies the list to
    the device from pageable memory, which waits for the stream."""
    if heads and all(b == a + 1 for a, b in zip(heads, heads[1:])):
        return slice(heads[0], heads[0] + len(heads))
    return None


def head_index(heads: Sequence[int], device: torch.device, memo: dict[tuple[int, ...], torch.Tensor]) -> slice | torch.Tensor:
    """An index of ``heads`` for dim 1 of device tensors that costs no host sync: the
    ``consecutive`` slice, else a device tensor made once and kept in ``memo``."""
    cut = consecutive(heads)
    if cut is not None:
        return cut
    key = tuple(heads)
    if key not in memo:
        memo[key] = upload(key, device)
    return memo[key]


def check_address(action: Action, num_layers: int, num_kv_heads: int) -> None:
    """Raise ActionError if ``action`` names a layer or KV head the model does not have."""
    if action.layer >= num_layers:
        raise ActionError(f"layer {action.layer} out of range ({num_layers} layers)")
    if max(action.heads) >= num_kv_heads:
        raise ActionError(f"head {max(action.heads)} out of range ({num_kv_heads} KV heads)")


class ActionExecutor(ABC):
    """How a backend's cache takes actions: ``apply`` checks each one (``check``) and
    dispatches it to the method for its type. A backend implements the methods of the
    actions its capabilities declare; the others raise ActionError."""

    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            self.check(action)
            if isinstance(action, Select):
                self.select(action)
            elif isinstance(action, Offload):
                self.offload(action)
            elif isinstance(action, Recall):
                self.recall(action)
            elif isinstance(action, Attend):
                self.attend_view(action)
            else:
                raise ActionError(f"unknown action {action!r}")

    def check(self, action: Action) -> None:
        """Raise ActionError for an action addressed to a layer or head that does not exist."""

    @abstractmethod
    def select(self, action: Select) -> None: ...

    def offload(self, action: Offload) -> None:
        raise ActionError(f"{type(self).__name__} cannot execute Offload")

    def recall(self, action: Recall) -> None:
        raise ActionError(f"{type(self).__name__} cannot execute Recall")

    def attend_view(self, action: Attend) -> None:
        raise ActionError(f"{type(self).__name__} cannot execute Attend")
