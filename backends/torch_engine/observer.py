"""DecodeObserver: when and with which queries the policy sees the decode steps.

A policy that acts only every ``period`` decode steps (``Requirements.decode_period``;
HeteroCache's drift window) is called once per period with all the period's queries
(``[B, H_q, period, D]``, ``Observation.step`` = the step of the first), not once per step
per layer: between its decisions a step costs no Python at all.

Each step writes its post-RoPE queries into slot ``step % period`` of a per-layer ring,
chosen by a device-side counter (``index_copy_`` at ``slot``, then ``slot = (slot + 1) %
period``): no host sync, fixed shapes, so the recording is captured inside the decode graph
and replays as is. The counter restarts at 0 each generation, so at a decision step slots
0..period-1 hold the period's queries in order.

Two modes (``EngineConfig.observe``):
- 'inline': the policy sees a layer inside the step, after the new token is stored and
  before attention (the HF backend's order: a recall serves that very attention);
- 'deferred': the policy sees the recorded queries after the step; its actions serve the
  next step. CUDA graphs need it; it also runs on CPU (the tests run it there).
"""

from __future__ import annotations

import torch

from hcpolicy.capabilities import Requirements

MODES = ("auto", "inline", "deferred")


class DecodeObserver:
    def __init__(self, num_layers: int, max_batch: int, h_q: int, d: int, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.shape = (num_layers, max_batch, h_q, d)
        self.device, self.dtype = device, dtype
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)  # ring slot of this step
        self.ring: torch.Tensor | None = None  # [N, B, H_q, period, D]
        self.active = False
        self.period = 1

    def start(self, needs: Requirements, batched: bool) -> None:
        """A new generation: record if the policy observes decode steps, ``decode_period``
        steps per call when ``batched`` (else one per call)."""
        self.active = needs.decode_observations
        self.period = needs.decode_period if batched else 1
        if self.active and (self.ring is None or self.ring.shape[3] != self.period):
            n, b, h, d = self.shape
            self.ring = torch.zeros(n, b, h, self.period, d, dtype=self.dtype, device=self.device)
        self.slot.zero_()

    def record(self, layer: int, q: torch.Tensor) -> None:
        """q: [B, H_q, 1, D] -> ring slot ``slot`` of ``layer`` (device-only)."""
        self.ring[layer, : q.shape[0]].index_copy_(2, self.slot, q)  # type: ignore[index]

    def advance(self) -> None:
        """End of a step (device-only)."""
        self.slot.add_(1).remainder_(self.period)

    def due(self, step: int) -> bool:
        """Whether decode step ``step`` (from 0) completes a period: the policy is called."""
        return self.active and (step + 1) % self.period == 0

    def first_step(self, step: int) -> int:
        return step + 1 - self.period

    def queries(self, batch: int, layer: int | None = None) -> torch.Tensor:
        """A copy of the period's queries: [B, H_q, period, D] of ``layer``, or [N, B, H_q,
        period, D] of every layer (the ring is overwritten by the next steps)."""
        ring = self.ring[:, :batch] if layer is None else self.ring[layer, :batch]  # type: ignore[index]
        return ring.clone()
