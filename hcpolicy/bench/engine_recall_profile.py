"""Where the host spends an async recall step and its landing (the engine bench's cell).

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.engine_recall_profile --output $OUT/engine_recall_profile_h200.json

Builds part c's HeteroCache cell of ``engine_decode`` (224K, C = 0.5, realistic drift,
async recalls, device decisions) and decodes to the first decision. Then 2 x ``--steps``
steps are timed with wall-clock wrappers around the engine's recall and decision functions
(``TIMED``: host ms per function, nothing else added to the step), and ``--steps`` more
are profiled with cProfile, recording every host sync torch reports
(``torch.cuda.set_sync_debug_mode('warn')``) with the Python frames that caused it;
``--trace F`` also writes those steps' torch.profiler trace (gzipped Chrome JSON).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gzip
import importlib
import io
import json
import os
import pstats
import time
import traceback
import warnings
from typing import Any

import torch

from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.bench.engine_decode import StepRandomWalk, hetero, warm_up
from hcpolicy.runtime import TransferRuntime


def profiled_step(engine: Engine, tok: torch.Tensor) -> dict[str, Any]:
    syncs: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        frames = [f for f in traceback.extract_stack()[:-1] if "/hcpolicy/" in f.filename or "/backends/" in f.filename]
        where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}:{f.name}" for f in frames[-4:][::-1])
        syncs[where] = syncs.get(where, 0) + 1

    rec = engine.executor.recaller
    before = (rec.recalls, rec.landed)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    prof = cProfile.Profile()
    old = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            a.record()
            prof.enable()
            engine.decode(tok)
            prof.disable()
            b.record()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(35)
    tot = io.StringIO()
    pstats.Stats(prof, stream=tot).sort_stats("tottime").print_stats(20)
    return {"ms": a.elapsed_time(b), "recalls": rec.recalls - before[0], "landed": rec.landed - before[1],
            "in_flight": len(rec.inflight), "syncs": syncs, "cumulative": out.getvalue().splitlines()[:60],
            "tottime": tot.getvalue().splitlines()[:40]}  # fmt: skip


TIMED = [  # (module, owner, attribute): the host work of a recall step, timed by wrappers
    ("hcpolicy.backends.torch_engine.async_recall", "AsyncRecalls", "_issue"),
    ("hcpolicy.backends.torch_engine.async_recall", "AsyncRecalls", "land"),
    ("hcpolicy.backends.torch_engine.async_recall", "AsyncRecalls", "_copy_tails"),
    ("hcpolicy.backends.torch_engine.async_recall", "AsyncRecalls", "_fresh_pages"),
    ("hcpolicy.backends.torch_engine.async_recall", "AsyncRecalls", "reap"),
    ("hcpolicy.backends.torch_engine.async_recall", None, "plan_batch"),
    ("hcpolicy.backends.torch_engine.async_recall", None, "recall_rows"),
    ("hcpolicy.backends.torch_engine.kv", "PagedKV", "set_pages_many"),
    ("hcpolicy.backends.torch_engine.pages", "PageAllocator", "allocate"),
    ("hcpolicy.backends.torch_engine.pages", "PageAllocator", "free"),
    ("hcpolicy.backends.torch_engine.monitor", "DeviceMonitor", "act"),
    ("hcpolicy.backends.torch_engine.monitor", "DeviceMonitor", "decide"),
    ("hcpolicy.backends.torch_engine.monitor", "DeviceMonitor", "stage"),
    ("hcpolicy.policy.heterocache", "HeteroCachePolicy", "_recalls"),
    ("hcpolicy.policy.heterocache", None, "satellite_sets"),
    ("hcpolicy.backends.torch_engine.engine", "Engine", "_act"),
    ("hcpolicy.backends.torch_engine.executor", "PagedExecutor", "apply"),
    ("hcpolicy.backends.torch_engine.graphs", "DecodeGraph", "replay"),
]


def wrap_all(entries: list[tuple[str, str | None, str]], wrapper: Any) -> None:
    """Replace each (module, owner or None, attribute) by ``wrapper(fn, label)``."""
    for module, owner, name in entries:
        mod = importlib.import_module(module)
        holder = getattr(mod, owner) if owner else mod
        fn = getattr(holder, name)
        setattr(holder, name, functools.wraps(fn)(wrapper(fn, f"{owner}.{name}" if owner else name)))


def install_timers() -> dict[str, float]:
    """Wrap each of TIMED so that its wall time (ms, host) adds up in the returned dict."""
    totals: dict[str, float] = {}

    def timer(fn: Any, label: str) -> Any:
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + (time.perf_counter() - t0) * 1e3

        return timed

    wrap_all(TIMED, timer)
    return totals


def timed_step(engine: Engine, tok: torch.Tensor, totals: dict[str, float]) -> dict[str, Any]:
    """One step with the wrappers only: its CUDA-event ms, host ms and each wrapped time."""
    totals.clear()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    t0 = time.perf_counter()
    engine.decode(tok)
    host = (time.perf_counter() - t0) * 1e3
    b.record()
    b.synchronize()
    return {"ms": a.elapsed_time(b), "host_ms": host, "parts_ms": dict(sorted(totals.items(), key=lambda x: -x[1]))}


MARKED = [  # (module, owner, attribute): what a decode call enqueues on the compute stream
    ("hcpolicy.backends.torch_engine.graphs", "DecodeGraph", "replay"),
    ("hcpolicy.backends.torch_engine.graphs", "DecisionGraph", "replay"),
    ("hcpolicy.backends.torch_engine.recall", "Recaller", "wait_all"),
    ("hcpolicy.backends.torch_engine.recall", "Recaller", "pace"),
    ("hcpolicy.backends.torch_engine.recall", "Recaller", "land_ready"),
    ("hcpolicy.backends.torch_engine.executor", "PagedExecutor", "apply"),
    ("hcpolicy.backends.torch_engine.engine", "Engine", "_act"),
    ("hcpolicy.backends.torch_engine.engine", "Engine", "_observe_recorded"),
]


def install_markers(marks: list[tuple[int, str, torch.cuda.Event]], step: list[int]) -> Any:
    """Wrap each of MARKED so that it records a timing event on the compute stream before
    and after it (no host wait): the device intervals between marks show where the compute
    stream waits on other streams when the host does not wait for each step. Returns the
    ``mark(label)`` they call (an event of step ``step[0]``)."""

    def mark(label: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((step[0], label, event))

    def marker(fn: Any, label: str) -> Any:
        def marked(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            mark("<" + label)
            out = fn(*args, **kwargs)
            mark(">" + label)
            return out

        return marked

    wrap_all(MARKED, marker)
    return mark


def unsynced_marks(engine: Engine, tok: torch.Tensor, steps: int) -> list[dict[str, Any]]:
    """``steps`` decode calls without host waits between them, with ``install_markers``:
    per step its host ms and the device ms between consecutive marks (label pairs)."""
    marks: list[tuple[int, str, torch.cuda.Event]] = []
    step = [0]
    mark = install_markers(marks, step)
    host = []
    torch.cuda.synchronize()
    for i in range(steps):
        step[0] = i
        mark("<decode")
        t0 = time.perf_counter()
        engine.decode(tok)
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    out = [{"step": i, "host_ms": h, "intervals": []} for i, h in enumerate(host)]
    for (i, a, ea), (_, b, eb) in zip(marks, marks[1:]):
        out[i]["intervals"].append([a, b, round(ea.elapsed_time(eb), 3)])
    for row in out:
        row["device_ms"] = sum(x[2] for x in row["intervals"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--context", type=int, default=229376)
    parser.add_argument("--drift-sigma", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=8, help="steps profiled after the first decision")
    parser.add_argument("--unsynced", type=int, default=0,
                        help="then this many steps without host waits, with device marks (unsynced_marks)")
    parser.add_argument("--trace", help="also write a gzipped Chrome trace of the steps (torch.profiler) here")
    args = parser.parse_args()
    config = ModelConfig.preset("llama-3.1-8b", max_position=args.context + 1024)
    model = random_model(config, device="cuda", dtype=torch.bfloat16)
    warm = argparse.Namespace(drift="realistic", drift_sigma=args.drift_sigma, fused="auto", recall_landing="async",
                              per_step_observations=False, device_decisions="auto", compression=0.5,
                              recall_step_mb=EngineConfig().async_recall_step_bytes / (1 << 20),
                              gather_shape=TransferRuntime("cpu").gather_shape())  # fmt: skip
    warm_up(model, config, warm)  # compiles what the first recall would
    new = 3 * args.steps + args.unsynced + 16
    engine = Engine(model, EngineConfig(max_seq_len=args.context + new, recall_landing="async"))
    engine.step_query_hook = StepRandomWalk(args.drift_sigma, new + 2, config.num_layers)
    engine.prefill_random([args.context], hetero(config.spec(), 0.5), max_new_tokens=new)
    tok = torch.zeros(1, dtype=torch.int64, device="cuda")
    while not engine.observer.due(engine.step):  # up to the first decision step (graphs captured)
        engine.decode(tok)
    engine.decode(tok)
    torch.cuda.synchronize()
    totals = install_timers()
    timed = [timed_step(engine, tok, totals) for _ in range(2 * args.steps)]
    if args.trace:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as trace:  # fmt: skip
            steps = [profiled_step(engine, tok) for _ in range(args.steps)]
        plain = args.trace.removesuffix(".gz")
        trace.export_chrome_trace(plain)
        with open(plain, "rb") as src, gzip.open(args.trace, "wb") as dst:
            dst.write(src.read())
        os.remove(plain)
    else:
        steps = [profiled_step(engine, tok) for _ in range(args.steps)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
              "timed": timed, "steps": steps}  # fmt: skip
    if args.unsynced:
        result["unsynced"] = unsynced_marks(engine, tok, args.unsynced)
        for row in result["unsynced"]:
            worst = max(row["intervals"], key=lambda x: x[2])
            print(f"unsynced {row['step']}: device {row['device_ms']:.2f} ms host {row['host_ms']:.2f}, longest "
                  f"{worst}")  # fmt: skip
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    for t in timed:
        print(f"{t['ms']:.2f} ms host {t['host_ms']:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in t["parts_ms"].items()))
    for s in steps:
        print(f"{s['ms']:.2f} ms recalls {s['recalls']} landed {s['landed']} syncs {sum(s['syncs'].values())}")


if __name__ == "__main__":
    main()
