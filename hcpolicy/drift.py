"""Drift triggers: decide when a monitored head's attention has moved enough to recall.

A trigger is fed, every decode step, the top-k set of a monitor head's newest query
(for HeteroCache: a pivot's attention over the prompt) and answers which sequences fire.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable

import attrs
import torch

from hcpolicy._validate import positive, unit_interval
from hcpolicy.scores import overlap


class DriftTrigger(ABC):
    """Extension point: subclass and implement ``observe``.

    ``period``: decisions come only every ``period`` steps (None: never), so a policy may
    buffer its monitor queries and score them together at the decision step.
    """

    period: int | None = 1

    def reset(self) -> None:
        """Forget all state (called at the start of every generation)."""

    def set_reference(self, key: Hashable, topk: torch.Tensor) -> None:
        """Record the reference set a monitor starts from. topk: [B, k] int64."""

    @abstractmethod
    def observe(self, key: Hashable, step: int, topk: torch.Tensor, universe: int) -> torch.Tensor | None:
        """Feed one step. topk: [B, k] int64 indices into [0, universe).

        Returns [B] bool (True = recall for that sequence now), or None when this step is
        not a decision point. Returning a device tensor keeps the step free of host syncs.
        """

    def observe_window(self, key: Hashable, first_step: int, topk: torch.Tensor, universe: int) -> torch.Tensor | None:
        """Feed W consecutive steps at once. topk: [B, W, k]. Returns the OR of what
        ``observe`` would return for each step (None if no step was a decision point).
        Override to batch the work (one launch per window instead of W)."""
        fired = None
        for w in range(topk.shape[1]):
            now = self.observe(key, first_step + w, topk[:, w], universe)
            if now is not None:
                fired = now if fired is None else fired | now
        return fired

    def observe_windows(self, keys: list[Hashable], first_step: int, topk: torch.Tensor, universe: int) -> torch.Tensor:
        """``observe_window`` for several monitors at once. topk: [P, B, W, k], one row per
        key. Returns [P, B] bool (False where a key had no decision point). Override to
        batch the work across monitors."""
        rows = []
        for key, sets in zip(keys, topk):
            fired = self.observe_window(key, first_step, sets, universe)
            rows.append(torch.zeros(topk.shape[1], dtype=torch.bool, device=topk.device) if fired is None else fired)
        return torch.stack(rows)


@attrs.define
class WindowedOverlap(DriftTrigger):
    """The paper's trigger: every ``window`` steps, the median over the buffered queries of
    the overlap with the reference set; below ``tau`` the monitor fires and the reference
    becomes the newest query's set.

    ``per_sequence=False`` reproduces the reference code, which averages the overlap over the
    batch so that all sequences fire together; True decides each sequence on its own.
    """

    window: int = attrs.field(default=5, validator=positive)
    tau: float = attrs.field(default=0.5, validator=unit_interval)
    per_sequence: bool = True

    @property
    def period(self) -> int:  # type: ignore[override]
        return self.window
    _reference: dict = attrs.field(factory=dict, init=False, repr=False)
    _buffer: dict = attrs.field(factory=dict, init=False, repr=False)

    def reset(self) -> None:
        self._reference.clear()
        self._buffer.clear()

    def set_reference(self, key: Hashable, topk: torch.Tensor) -> None:
        self._reference[key] = topk
        self._buffer[key] = []

    def observe(self, key: Hashable, step: int, topk: torch.Tensor, universe: int) -> torch.Tensor | None:
        if key not in self._reference:
            raise KeyError(f"monitor {key!r} has no reference set; call set_reference first")
        buffer = self._buffer[key]
        buffer.append(topk)
        if len(buffer) < self.window:
            return None
        reference = self._reference[key]
        scores = torch.stack([overlap(t, reference, universe) for t in buffer], dim=-1)  # [B, W]
        return self._decide([key], scores[None], buffer[-1][None])[0]

    def observe_window(self, key: Hashable, first_step: int, topk: torch.Tensor, universe: int) -> torch.Tensor | None:
        """One window exactly (the policy buffers to ``period``): all W overlaps in one go."""
        if key not in self._reference:
            raise KeyError(f"monitor {key!r} has no reference set; call set_reference first")
        if self._buffer[key] or topk.shape[1] != self.window:
            return super().observe_window(key, first_step, topk, universe)
        reference = self._reference[key]
        scores = overlap(topk, reference.unsqueeze(1), universe)  # [B, W]
        return self._decide([key], scores[None], topk[None, :, -1])[0]

    def observe_windows(self, keys: list[Hashable], first_step: int, topk: torch.Tensor, universe: int) -> torch.Tensor:
        """One window of every monitor in one go (a handful of launches for all of them)."""
        missing = [k for k in keys if k not in self._reference]
        if missing:
            raise KeyError(f"monitor {missing[0]!r} has no reference set; call set_reference first")
        if (any(self._buffer[k] for k in keys) or topk.shape[2] != self.window
                or len({self._reference[k].shape for k in keys}) != 1):  # fmt: skip
            return super().observe_windows(keys, first_step, topk, universe)
        scores = overlap(topk, self.references(keys).unsqueeze(2), universe)  # [P, B, W]
        return self._decide(keys, scores, topk[:, :, -1])

    def _decide(self, keys: list[Hashable], scores: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        """scores: [P, B, W] overlaps of each monitor's window with its reference; newest:
        [P, B, k] the last step's sets. Returns fired [P, B]; moves the references."""
        fired = self.fire(scores)
        self.move(keys, fired, newest)
        return fired

    def fire(self, scores: torch.Tensor) -> torch.Tensor:
        """Overlaps [P, B, W] of windows with their references -> fired [P, B] (device
        ops only, no state: backends may capture it in a CUDA graph)."""
        if not self.per_sequence:
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        # torch.median takes the lower middle for even W, as a sorted-list median index would
        return scores.median(dim=2).values < self.tau

    def move(self, keys: list[Hashable], fired: torch.Tensor, newest: torch.Tensor) -> None:
        """Where ``fired`` [P, B], the reference of ``keys[p]`` becomes ``newest`` [P, B, k];
        every key's window restarts."""
        for key, now, sets in zip(keys, fired, newest):
            self._reference[key] = torch.where(now.unsqueeze(-1), sets, self._reference[key])
            self._buffer[key] = []

    def references(self, keys: list[Hashable]) -> torch.Tensor:
        """The reference sets of ``keys``: [P, B, k]."""
        return torch.stack([self._reference[k] for k in keys])


@attrs.define
class EveryN(DriftTrigger):
    """Fire for every sequence on every ``n``-th step (steps counted from 0)."""

    n: int = attrs.field(default=5, validator=positive)

    @property
    def period(self) -> int:  # type: ignore[override]
        return self.n

    def observe(self, key: Hashable, step: int, topk: torch.Tensor, universe: int) -> torch.Tensor | None:
        if (step + 1) % self.n:
            return None
        return torch.ones(topk.shape[0], dtype=torch.bool, device=topk.device)


@attrs.define
class Never(DriftTrigger):
    """Never fire: a static selection."""

    period = None

    def observe(self, key: Hashable, step: int, topk: torch.Tensor, universe: int) -> torch.Tensor | None:
        return None
