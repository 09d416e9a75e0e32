"""DeviceMonitor: a policy's window decisions (``hcpolicy.monitor.WindowPlan``) on the device.

Every decode step, the decode kernel leaves each monitored head's prompt logits and
per-tile softmax sums in slot ``step % window`` of a ring (a ``kernels.paged_decode.Tap``,
written where the keys are read anyway). After the step that completes a window, ``decide``
scores the whole window with a handful of kernels and no host sync: softmax rows, group
reduce and pooling (``kernels.window_scores``), the k-th largest score of each row
(``kernels.select``), each row's overlap with its monitor's reference set, and the
plan's ``fire``. Under CUDA graphs ``decide`` is captured once, as a second graph
replayed after the step's. ``act`` then reads which monitors fired (the one host read of
a decision step) and asks the plan for actions only if something did.

Serves batches whose prompts all have one length (the ring's key range is the prompt),
monitored heads that keep their whole prompt on the device, and the torch or Triton
decode kernels; ``monitor_for`` checks that after prefill (and says why not).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from hcpolicy._device import upload
from hcpolicy.actions import Action
from hcpolicy.kernels._triton import have_triton
from hcpolicy.kernels.paged_decode import Tap
from hcpolicy.kernels.select import kth_largest
from hcpolicy.kernels.window_scores import window_scores
from hcpolicy.monitor import WindowPlan, reference_masks, window_overlaps

if TYPE_CHECKING:
    from .engine import Engine

TORCH_TILE = 64  # tap tiles of the torch decode path (the Triton kernel's are its BLOCK_N)


def tap_tile(engine: "Engine") -> int:
    if engine.kernel != "triton":
        return TORCH_TILE
    from hcpolicy.kernels._ragged_decode_triton import block_d_of, tiling

    return tiling(engine.config.decode_config, block_d_of(engine.mc.head_dim), engine.kv.kv.element_size())[0]


class DeviceMonitor:
    def __init__(self, engine: "Engine", plan: WindowPlan, prompt: int) -> None:
        mc, device = engine.mc, engine.device
        p, w, b, g = len(plan.monitors), plan.window, engine.batch, mc.num_heads // mc.num_kv_heads
        if engine.observer.period != w:
            raise ValueError(f"the plan's window ({w}) differs from the observer's period ({engine.observer.period})")
        self.plan, self.prompt, self.k = plan, prompt, min(plan.k, prompt)
        self.tile = tap_tile(engine)
        self.logits = torch.zeros(w, p, b, g, prompt, dtype=torch.float32, device=device)
        self.stats = torch.zeros(w, p, b, g, -(-prompt // self.tile), 2, dtype=torch.float32, device=device)
        self.scores = torch.zeros(w, p, b, prompt, dtype=torch.float32, device=device)
        self.masks = reference_masks(plan.references().to(device), prompt)  # [P, B, L]
        self.positions = torch.arange(prompt, device=device).expand(b, prompt)
        self.fired = torch.zeros(p, b, dtype=torch.bool, device=device)
        self.taps: dict[int, Tap] = {}
        for layer in sorted({layer for layer, _ in plan.monitors}):
            pairs = tuple((i, h) for i, (l, h) in enumerate(plan.monitors) if l == layer)
            heads = torch.full((mc.num_kv_heads,), -1, dtype=torch.int32)
            for i, h in pairs:
                heads[h] = i
            self.taps[layer] = Tap(heads=heads.to(device), pairs=pairs, logits=self.logits, stats=self.stats,
                                   slot=engine.observer.slot, prompt=prompt, tile=self.tile)  # fmt: skip
        self.decisions = self.fires = 0
        self._fired_host: torch.Tensor | None = None
        self._todo: tuple | None = None  # (fired host lists, monitors still to act on, per call)
        self._staged: torch.cuda.Event | None = None

    def tap(self, layer: int) -> Tap | None:
        return self.taps.get(layer)

    def decide(self) -> None:
        """Score the window and set ``fired`` [P, B] (device ops only: capturable)."""
        w, p, b, g, n = self.logits.shape
        fused = self.logits.is_cuda and have_triton()  # the select's first pass rides on the scores kernel
        hist = torch.zeros(w * p * b, 256, dtype=torch.int32, device=self.logits.device) if fused else None
        scores = window_scores(self.logits.view(-1, g, n), self.stats.view(w * p * b, g, -1, 2), self.plan.gqa,
                               self.plan.pool_kernel, out=self.scores.view(-1, n), top_histogram=hist)  # fmt: skip
        thresholds, ties = kth_largest(scores, self.k, top_histogram=hist)
        overlaps = window_overlaps(self.scores, thresholds.view(w, p, b), ties.view(w, p, b), self.masks, self.k)
        self.fired.copy_(self.plan.fire(overlaps))

    def stage(self) -> None:
        """After ``decide``: start copying the decision to the host, without waiting, for an
        ``act`` while the next step runs."""
        if not self.fired.is_cuda:
            return
        if self._fired_host is None:
            self._fired_host = torch.empty(self.fired.shape, dtype=torch.bool, pin_memory=True)
        self._fired_host.copy_(self.fired, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record(torch.cuda.current_stream(self.fired.device))

    def act(self, stream: torch.cuda.Stream | None = None, spread: int = 1) -> dict[int, list[Action]]:
        """After ``decide`` ran: the plan's actions for the monitors that fired (one host
        read; after ``stage``, a wait for the decision alone). ``stream``: where the plan's
        device work runs (after the decision), e.g. off the compute stream. ``spread``: act
        on the fired monitors over that many calls, a share each (``pending`` says whether
        some wait); the next ``decide`` must come after the last."""
        if self._todo is None:
            self.decisions += 1
            staged, self._staged = self._staged, None
            if staged is not None:
                staged.synchronize()
                fired = self._fired_host.tolist()
            else:
                fired = self.fired.tolist()
            picked = [i for i, row in enumerate(fired) if any(row)]
            if not picked:
                return {}
            self.fires += len(picked)
            if stream is not None:
                stream.wait_event(staged) if staged is not None else stream.wait_stream(torch.cuda.current_stream())
            self._todo = (fired, picked, -(-len(picked) // max(1, spread)))
        fired, picked, share = self._todo
        now, rest = picked[:share], picked[share:]
        self._todo = (fired, rest, share) if rest else None
        chosen = set(now)
        fired = [row if i in chosen else [False] * len(row) for i, row in enumerate(fired)]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            actions = self.plan.act(self.fired, fired, self.scores[-1], self.positions)
            idx = upload(now, self.fired.device)
            self.masks[idx] = reference_masks(self.plan.references()[idx], self.prompt)  # the moved references
        return actions

    @property
    def pending(self) -> bool:
        """Fired monitors of the last decision not acted on yet (``act`` with ``spread``)."""
        return self._todo is not None


def monitor_for(engine: "Engine") -> DeviceMonitor | None:
    """After prefill: a DeviceMonitor when the policy offers a WindowPlan and the engine can
    score it (``EngineConfig.device_decisions``: None = when it can, True = or a ValueError,
    False = never)."""
    want, policy = engine.config.device_decisions, engine.policy
    if want is False or policy is None:
        return None
    plan = policy.window_plan()
    reasons = []
    if plan is None:
        reasons.append(f"{type(policy).__name__} offers no WindowPlan now")
    if not engine.deferred:
        reasons.append("observations are inline (device decisions run after the step: observe='deferred')")
    if engine.starts is not None:
        reasons.append("the prompts differ in length")
    if engine.query_hook is not None:
        reasons.append("a query_hook rewrites what the policy sees")
    if plan is not None and engine.observer.period != plan.window:
        reasons.append(f"observations come every {engine.observer.period} steps, the plan decides every "
                       f"{plan.window}")  # fmt: skip
    if plan is not None and not reasons:
        held = engine.kv.host_lengths[:, : engine.batch]  # [N, B, H] host
        short = [(l, h) for l, h in plan.monitors if bool((held[l, :, h] < engine.prompt_length).any())]
        if short:
            reasons.append(f"monitored heads {short[:3]} do not keep their whole prompt on the device")
    if reasons:
        if want:
            raise ValueError("device_decisions=True, but: " + "; ".join(reasons))
        return None
    engine.monitors_made += 1
    return DeviceMonitor(engine, plan, engine.prompt_length)
