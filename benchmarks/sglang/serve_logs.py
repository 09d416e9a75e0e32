"""SGLang's own view of a measurement, read from its scheduler's log lines.

With ``log_level="info"`` the scheduler logs, every ``decode_log_interval`` decode steps,

    Decode batch, #running-req: 12, #token: 393600, token usage: 0.97, ..., gen throughput (token/s): 301.17, #queue-req: 4

(``metrics_reporter.report_decode_stats``; SGLang's own ``debug_utils/log_parser.py`` reads
the same fields). ``#running-req`` is the size of the batch the scheduler decodes: after
its admission control (memory reservation for every running request's remaining tokens)
let requests in. ``gen throughput`` is decode tokens over the wall time since the previous
such line, so a window that held a prefill reads low: ``decode_stats`` drops the first
line of each stretch at a given batch size. The Engine's scheduler is a spawned process
that writes to the benchmark process's stderr; the worker points that at a file and reads
the part of it one measurement wrote.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any

_DECODE = re.compile(
    r"Decode batch[^,]*, #running-req: (?P<running>\d+),.*?"
    r"token usage: (?P<usage>[0-9.]+),.*?"
    r"gen throughput \(token/s\): (?P<tput>[0-9.]+), #queue-req: (?P<queue>\d+)"
)
_PREFILL = re.compile(r"Prefill batch[^,]*, #new-seq: (?P<new>\d+),.*?#running-req: (?P<running>\d+), #queue-req: (?P<queue>\d+)")


@dataclass(frozen=True)
class DecodeLine:
    running: int
    usage: float
    tput: float
    queue: int


def decode_lines(text: str) -> list[DecodeLine]:
    return [
        DecodeLine(int(m["running"]), float(m["usage"]), float(m["tput"]), int(m["queue"]))
        for m in _DECODE.finditer(text)
    ]


def prefill_batches(text: str) -> int:
    return sum(1 for _ in _PREFILL.finditer(text))


def steady(lines: list[DecodeLine], running: int) -> list[float]:
    """Throughputs of lines at batch ``running``, the first of each consecutive stretch
    dropped (its window may hold the prefill that brought the batch to that size)."""
    out, prev = [], None
    for line in lines:
        if line.running == running and prev == running:
            out.append(line.tput)
        prev = line.running
    return out


def decode_stats(text: str, running: int | None = None) -> dict[str, Any]:
    """SGLang's largest decode batch in ``text`` and its steady decode tokens/s at
    ``running`` (default: that largest batch)."""
    lines = decode_lines(text)
    if not lines:
        return {"lines": 0, "max_running": None, "gen_tok_s": None, "prefill_batches": prefill_batches(text)}
    peak = max(line.running for line in lines)
    at = peak if running is None else running
    tputs = steady(lines, at)
    return {
        "lines": len(lines), "max_running": peak, "batch": at, "steady_lines": len(tputs),
        "gen_tok_s": statistics.median(tputs) if tputs else None,
        "max_token_usage": max(line.usage for line in lines), "prefill_batches": prefill_batches(text),
    }  # fmt: skip
