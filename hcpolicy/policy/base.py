"""The Policy extension point and the scored-selection template most baselines use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import attrs
import torch

from hcpolicy._validate import is_compression
from hcpolicy.actions import Action, Select, Selection
from hcpolicy.budget import Allocator, UniformAllocator, sequence_budgets
from hcpolicy.capabilities import Requirements
from hcpolicy.observe import Observation
from hcpolicy.scores import topk_selection
from hcpolicy.spec import ModelSpec

if TYPE_CHECKING:
    from hcpolicy.monitor import WindowPlan


class Policy(ABC):
    """Reads observations, returns actions; never touches a cache, module or stream.

    A backend calls ``reset`` once per generation, ``prefill`` once per layer after the
    prompt's KV is computed, and (if ``requirements().decode_observations``) ``decode``
    once per layer per generated token. Only ``prefill`` is required.
    """

    name: ClassVar[str] = ""

    def requirements(self) -> Requirements:
        return Requirements()

    def reset(self, spec: ModelSpec, batch_size: int) -> None:
        """Start a generation for ``batch_size`` sequences of a ``spec``-shaped model."""

    @abstractmethod
    def prefill(self, obs: Observation) -> Sequence[Action]:
        """Actions for one layer once the prompt is cached."""

    def decode(self, obs: Observation) -> Sequence[Action]:
        """Actions for one layer at one decode step (default: none)."""
        return ()

    def decode_layers(self, observations: Sequence[Observation]) -> list[Sequence[Action]]:
        """``decode`` for several layers of one step at once (observations in layer order),
        as a backend that sees a whole step together calls it (the engine's CUDA-graph step).
        Returns each layer's actions. Override to batch the layers' work; the default calls
        ``decode`` layer by layer."""
        return [self.decode(obs) for obs in observations]

    def window_plan(self) -> "WindowPlan | None":
        """Optional: the decode decisions as a ``hcpolicy.monitor.WindowPlan``, asked after
        prefill, so that a backend can score them on the device (None: call ``decode``)."""
        return None

    def observed_heads(self, layer: int) -> Sequence[int] | None:
        """KV heads whose device KV ``decode`` reads at ``layer`` (None = all; empty = none,
        and then ``decode`` is not called for that layer). Narrowing it saves backends
        from gathering heads the policy never looks at."""
        return None

    def _require_reset(self, spec: ModelSpec | None) -> ModelSpec:
        """The spec ``reset`` stored (pass it in), or a clear error if a backend skipped reset."""
        if spec is None:
            raise RuntimeError(
                f"{type(self).__name__}.reset(spec, batch_size) must be called before prefill or decode"
            )
        return spec


@attrs.define(kw_only=True)
class ScoredPolicy(Policy):
    """Keep each head's top tokens by ``score``, with per-head budgets from ``allocator``.

    Subclasses implement one method, ``score``; return +inf for tokens that must stay.
    ``select`` may be overridden when what must stay depends on the budgets (H2O's recent
    window). ``compression`` is the fraction of the prompt's KV kept on the device.
    """

    compression: float = attrs.field(default=0.5, validator=is_compression)
    allocator: Allocator = attrs.field(factory=UniformAllocator)
    _spec: ModelSpec | None = attrs.field(default=None, init=False, repr=False)
    _batch_size: int = attrs.field(default=1, init=False, repr=False)

    def requirements(self) -> Requirements:
        return Requirements(
            actions={Select}, per_head_lengths=not self.allocator.equal_across_heads, query_window=1
        )

    def reset(self, spec: ModelSpec, batch_size: int) -> None:
        self._spec = spec
        self._batch_size = batch_size

    @abstractmethod
    def score(self, obs: Observation) -> torch.Tensor:
        """Importance of each cached token: [B, H_kv, L], higher = keep."""

    def select(self, obs: Observation, scores: torch.Tensor, budgets: torch.Tensor) -> Selection:
        """Each head's top ``budgets`` tokens by ``scores`` ([B, H_kv, L]; budgets [B, H_kv])."""
        return topk_selection(scores, budgets, obs.cache.positions, obs.cache.valid())

    def prefill(self, obs: Observation) -> Sequence[Action]:
        spec = self._require_reset(self._spec)
        scores = self.score(obs)  # [B, H_kv, L]
        budgets = sequence_budgets(
            self.allocator, spec, obs.layer, self.compression, obs.prompt_length, scores, obs.cache.starts
        )  # [B, H_kv]
        selection = self.select(obs, scores, budgets)
        return [Select(layer=obs.layer, heads=range(obs.cache.num_kv_heads), selection=selection)]
