"""The recall streams: one per CUDA priority, used in issue order."""

from __future__ import annotations

from typing import Literal, Optional

import torch

RecallPriority = Literal["high", "normal"]
RECALL_PRIORITIES: dict[str, int] = {"high": -1, "normal": 0}
"""CUDA stream priorities; 0 is both the default streams' and the lowest CUDA has."""


class RecallStreams:
    """Recall streams by priority, created on first use.

    Recalls run in issue order even when the priority changes between them: a stream that
    takes over waits for the previous recall's event, so a block's ``last_read`` event
    covers every earlier recall of it, as eviction assumes.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._last: Optional[tuple[torch.cuda.Stream, torch.cuda.Event]] = None

    def get(self, priority: int) -> torch.cuda.Stream:
        """The stream of ``priority``, ordered after the previous recall (no host wait)."""
        stream = self._streams.get(priority)
        if stream is None:
            stream = self._streams[priority] = torch.cuda.Stream(self.device, priority=priority)
        if self._last is not None and self._last[0] is not stream:
            stream.wait_event(self._last[1])
        return stream

    def issued(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        """Record the latest recall: ``event`` on ``stream`` follows everything it enqueued."""
        self._last = (stream, event)

    def synchronize(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()
