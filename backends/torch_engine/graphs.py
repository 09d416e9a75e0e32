"""DecodeGraph: the engine's decode step captured as one CUDA graph and replayed.

The step reads only static tensors (token ids, positions, page tables, lengths, the pool),
sizes its attention grid by a host bound fixed at capture (prompt + tokens to come), and
never syncs the host, so it replays as is; page tables and lengths changed by actions
between steps are seen by the next replay because they are updated in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Engine
    from .monitor import DeviceMonitor


class DecodeGraph:
    def __init__(self, engine: "Engine", bound: int) -> None:
        if engine.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.engine = engine
        self.bound = bound
        self.graph = torch.cuda.CUDAGraph()
        saved = self._save()
        engine._in_graph, engine._bound = True, bound
        try:
            stream = torch.cuda.Stream(engine.device)
            stream.wait_stream(torch.cuda.current_stream(engine.device))
            with torch.cuda.stream(stream):
                engine._step_body()  # warm-up: triton compiles, cuBLAS picks its kernels
            torch.cuda.current_stream(engine.device).wait_stream(stream)
            self._restore(saved)  # the warm-up appended a token: undo it (its rows sit past the lengths)
            with torch.cuda.graph(self.graph):
                self.logits = engine._step_body()  # [B, 1, V], written by every replay
        finally:
            engine._in_graph = False
        self._restore(saved)

    def _save(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in self.engine.graph_state())

    def _restore(self, saved: tuple[torch.Tensor, ...]) -> None:
        for dst, src in zip(self.engine.graph_state(), saved):
            dst.copy_(src)

    def replay(self) -> torch.Tensor:
        self.engine._in_graph = True
        try:
            self.graph.replay()
        finally:
            self.engine._in_graph = False
        return self.logits.clone()


class DecisionGraph:
    """A DeviceMonitor's ``decide`` captured once (after a warm-up run that compiles its
    kernels) and replayed after each decision step's decode graph."""

    def __init__(self, monitor: "DeviceMonitor") -> None:
        self.monitor = monitor
        device = monitor.fired.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            monitor.decide()  # warm-up: reads the taps, writes only the monitor's outputs
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            monitor.decide()

    def replay(self) -> None:
        self.graph.replay()
