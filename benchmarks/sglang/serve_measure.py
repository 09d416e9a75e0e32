"""The measurements, run against one live ``sglang.Engine`` inside a worker process.

Every request is streamed (``async_generate(stream=True)``) and the client stamps each
chunk's arrival with ``perf_counter``; a chunk carries the request's cumulative
``completion_tokens``. From those stamps:

- decode tokens/s (``client``): the window in which every request of the batch had its
  first token (so every prefill is over) and none had finished, and the tokens that arrived
  in it, over its length; no prefill time can enter it. Batch 1: its inverse is the mean
  per-token latency;
- concurrency (``client_max_overlap``): the most requests between their first and last
  token at one moment.

Beside them, SGLang's own numbers from its scheduler log (``serve_logs``): the largest
``#running-req`` it decoded (its admission) and its ``gen throughput`` at that batch.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from dataclasses import dataclass
from typing import Any

from serve_logs import decode_stats
from serve_plan import MODELS, Measure


@dataclass
class Trace:
    """One streamed request: chunk arrival times and cumulative tokens at each."""

    times: list[float]
    counts: list[int]
    output_ids: list[int]
    retractions: int

    def tokens_at(self, t: float) -> int:
        i = bisect.bisect_right(self.times, t)
        return self.counts[i - 1] if i else 0


def prompts(measure: Measure, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids, the same for every Engine given (seed, label); each request its own
    (no shared prefix for the radix cache to reuse)."""
    out = []
    for i, n in enumerate(measure.prompt_lens):
        rng = random.Random(f"{seed}/{measure.kind}/{measure.label}/{i}")
        out.append([rng.randrange(3, vocab) for _ in range(n)])
    return out


async def _stream(engine: Any, ids: list[int], sampling: dict[str, Any]) -> Trace:
    gen = await engine.async_generate(input_ids=ids, sampling_params=sampling, stream=True)
    times, counts, pieces, meta = [], [], [], {}
    async for chunk in gen:
        times.append(time.perf_counter())
        meta = chunk["meta_info"]
        counts.append(int(meta["completion_tokens"]))
        pieces.append(list(chunk["output_ids"]))
    total = counts[-1] if counts else 0
    # cumulative or incremental output_ids, depending on SGLang's streaming setting
    ids_out = pieces[-1] if pieces and len(pieces[-1]) == total else [t for p in pieces for t in p]
    return Trace(times, counts, ids_out, int(meta.get("num_retractions", 0) or 0))


def generate(engine: Any, requests: list[list[int]], max_new: int) -> tuple[list[Trace], float]:
    """All ``requests`` submitted at once, greedy, ``max_new`` tokens each (EOS ignored)."""
    sampling = {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}

    async def run_all() -> list[Trace]:
        return list(await asyncio.gather(*(_stream(engine, ids, sampling) for ids in requests)))

    t0 = time.perf_counter()
    traces = engine.loop.run_until_complete(run_all())
    return traces, time.perf_counter() - t0


def window_rate(traces: list[Trace], a: float, b: float) -> dict[str, Any]:
    tokens = sum(t.tokens_at(b) - t.tokens_at(a) for t in traces)
    span = b - a
    rate = tokens / span if span > 0 and tokens > 0 else None
    return {"window_s": span, "window_tokens": tokens, "tok_s": rate,
            "ms_per_step": 1e3 * span / (tokens / len(traces)) if rate else None}  # fmt: skip


def all_decoding(traces: list[Trace]) -> dict[str, Any]:
    """Decode rate while every request was between its first and last token."""
    a, b = max(t.times[0] for t in traces), min(t.times[-1] for t in traces)
    if b <= a:
        return {"window_s": 0.0, "window_tokens": 0, "tok_s": None, "ms_per_step": None,
                "note": "no moment with every request decoding"}  # fmt: skip
    return window_rate(traces, a, b)


def peak_overlap(traces: list[Trace]) -> tuple[int, dict[str, Any]]:
    """The most requests decoding at once, and the decode rate over the longest stretch
    that held that many."""
    events = sorted([(t.times[0], 1) for t in traces] + [(t.times[-1], -1) for t in traces], key=lambda e: (e[0], e[1]))
    level, peak, spans, start = 0, 0, [], None
    for when, step in events:
        level += step
        if level > peak:
            peak, spans, start = level, [], when
        elif step > 0 and level == peak:
            start = when
        elif step < 0 and level == peak - 1 and start is not None:
            spans.append((start, when))
            start = None
    a, b = max(spans, key=lambda s: s[1] - s[0]) if spans else (0.0, 0.0)
    return peak, window_rate(traces, a, b)


def measure(engine: Any, m: Measure, model: str, seed: int, log_tail: Any) -> dict[str, Any]:
    """Run one measurement; ``log_tail()`` returns the scheduler log written since the last call."""
    engine.flush_cache()
    log_tail()
    traces, wall = generate(engine, prompts(m, MODELS[model]["vocab_size"], seed), m.max_new)
    log = log_tail()
    row: dict[str, Any] = {
        "kind": m.kind, "label": m.label, "model": model, "requests": len(m.prompt_lens),
        "prompt_lens": sorted(set(m.prompt_lens)), "max_new": m.max_new, "wall_s": wall,
        "completed": sum(1 for t in traces if t.counts and t.counts[-1] == m.max_new),
        "retractions": sum(t.retractions for t in traces),
    }  # fmt: skip
    if m.kind == "exact":
        row["output_ids"] = [t.output_ids for t in traces]
    elif m.kind == "throughput":
        row["client"] = all_decoding(traces)
        row["server"] = decode_stats(log, running=len(traces))
    else:
        peak, rate = peak_overlap(traces)
        row["client_max_overlap"] = peak
        row["client"] = rate
        row["server"] = decode_stats(log)
        row["max_running"] = row["server"]["max_running"]
    return row
