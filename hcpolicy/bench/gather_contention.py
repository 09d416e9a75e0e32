"""What the async recall gather costs the decode steps it runs under, per launch shape.

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.gather_contention --output $OUT/gather_contention_h200.json

The victim is the reference engine's CUDA-graph decode step (Llama-3.1-8B shape, random
bf16 weights, full KV at --context, batch 1), memory-bound as HeteroCache's steps are. The
load is one share of a recall as ``_recall_triton.recall_rows_triton`` moves it: --heads
heads of --per-head entries, --host-fraction of them read from a pinned host store over
PCIe (zero-copy), the rest moved inside a device pool, rows of K+V at head_dim 128 in
bf16 (512 B). For each shape (programs, warps, words per pass):

- alone: the gather's time with the GPU otherwise idle, and its host-read rate;
- under decode: the same gather enqueued --repeat times back to back on a side stream of
  the default (lowest) priority while the engine decodes on a stream of --priority, the
  host waiting for each step; the median step while gathers run over the median step of
  the same engine without them, and the host-read rate the gathers kept meanwhile.

The 'dma' row replaces the gather by one pinned host-to-device copy of the same host
bytes (copy engines, no SMs): the floor of what PCIe traffic costs a decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.bench.recall import timed

GB = 1e9
ROW_WORDS = 64  # int64 words of one row: K + V, head_dim 128, bf16
SHAPES = ((16, 8, 4096), (8, 8, 4096), (16, 16, 16384), (8, 16, 16384), (4, 16, 16384), (4, 32, 32768),
          (2, 32, 32768), (8, 4, 2048))  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def share(heads: int, per_head: int, host_fraction: float, gen: torch.Generator) -> dict[str, Any]:
    """A recall share's row lists: dst (fresh rows, in order), pool_src (a held row, or -1)
    and host_rows (ascending within each head), with the pool and the pinned host store."""
    e = heads * per_head
    host_per_head = int(per_head * 1.2)
    host = torch.empty(heads * host_per_head * ROW_WORDS, dtype=torch.int64, pin_memory=True)
    host.view(torch.uint8)[:: 1 << 20] = 7  # touch every page once
    pool = torch.empty((3 * e + 1) * ROW_WORDS, dtype=torch.int64, device="cuda")
    dst = torch.arange(e, dtype=torch.int64, device="cuda")
    held = torch.rand(e, generator=gen, device="cuda") >= host_fraction
    pool_src = torch.where(held, e + torch.randperm(2 * e, generator=gen, device="cuda")[:e], -1)
    host_rows = torch.rand(heads, host_per_head, generator=gen, device="cuda").argsort(1)[:, :per_head]
    host_rows = host_rows.sort(1).values.flatten()
    starts = torch.arange(heads, dtype=torch.int64, device="cuda") * host_per_head * ROW_WORDS
    return {"host": host, "pool": pool, "dst": dst, "pool_src": pool_src, "host_rows": host_rows,
            "starts": starts, "per_head": per_head, "host_bytes": int((~held).sum()) * ROW_WORDS * 8,
            "pool_bytes": int(held.sum()) * ROW_WORDS * 8}  # fmt: skip


def gather_fn(s: dict[str, Any], shape: tuple[int, int, int]) -> Callable[[], None]:
    from hcpolicy.backends.torch_engine._recall_triton import recall_rows_triton

    from hcpolicy.runtime.window import _CudaPointer

    ctas, warps, tile = shape
    host = s["host"]  # a CUDA view of the pinned store, as the runtime's reading_rows gives
    flat = torch.as_tensor(_CudaPointer(host.data_ptr(), host.numel(), "<i8", (host,)), device="cuda")

    def run() -> None:
        recall_rows_triton(s["pool"], flat, s["dst"], s["pool_src"], s["host_rows"], s["starts"], s["per_head"],
                           ROW_WORDS, ctas, tile_words=tile, warps=warps)  # fmt: skip

    return run


def dma_fn(s: dict[str, Any]) -> Callable[[], None]:
    n = s["host_bytes"] // 8
    dst = s["pool"][:n]
    src = s["host"][:n]
    return lambda: dst.copy_(src, non_blocking=True)


def step_ms(engine: Engine, tok: torch.Tensor, stream: torch.cuda.Stream) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        a.record()
        engine.decode(tok)
        b.record()
    b.synchronize()
    return a.elapsed_time(b)


def measure(engine: Engine, tok: torch.Tensor, stream: torch.cuda.Stream, side: torch.cuda.Stream,
            fn: Callable[[], None], nbytes: int, repeat: int, max_steps: int) -> dict[str, Any]:  # fmt: skip
    with torch.cuda.stream(side):
        alone_ms = timed(fn, 1, warmup=2) * 1e3  # two runs compile and warm, then one timed
    start = torch.cuda.Event(enable_timing=True)
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    with torch.cuda.stream(side):
        start.record()
        for e in ends:
            fn()
            e.record()
    steps = []
    while not ends[-1].query() and len(steps) < max_steps:
        steps.append(step_ms(engine, tok, stream))
    done = [e for e in ends if e.query()]
    torch.cuda.synchronize()
    under = steps[:-1]  # the last step may have outlived the gathers
    rate = len(done) * nbytes / (start.elapsed_time(done[-1]) / 1e3) / GB if done else None
    return {"alone_ms": alone_ms, "alone_gb_s": nbytes / (alone_ms / 1e3) / GB, "steps_under": len(under),
            "step_median_ms": statistics.median(under) if under else None, "steps_ms": steps,
            "under_gb_s": rate, "finished_within_steps": len(done) == repeat}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--per-head", type=int, default=65536)
    parser.add_argument("--host-fraction", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--priority", type=int, default=-1)
    parser.add_argument("--shapes", default=None, help="CTAS,WARPS,TILE_WORDS;... (default: SHAPES)")
    args = parser.parse_args()
    shapes = SHAPES if args.shapes is None else tuple(tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";"))
    if not torch.cuda.is_available():
        parser.error("this bench needs a CUDA device")
    path = Path(args.output)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    gen = torch.Generator(device="cuda").manual_seed(0)
    s = share(args.heads, args.per_head, args.host_fraction, gen)
    results.update(host_bytes=s["host_bytes"], pool_bytes=s["pool_bytes"])
    log(f"share: {s['host_bytes'] / GB:.2f} GB from the host, {s['pool_bytes'] / GB:.2f} GB inside the pool")
    config = ModelConfig.preset("llama-3.1-8b", max_position=args.context + 1024)
    model = random_model(config, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream(priority=args.priority) if args.priority else torch.cuda.current_stream()
    side = torch.cuda.Stream()
    steps = 12 + args.max_steps * (len(shapes) + 2)
    with torch.cuda.stream(stream):
        engine = Engine(model, EngineConfig(max_batch_size=1, max_seq_len=args.context + steps + 8))
        engine.prefill_random([args.context], None, max_new_tokens=steps + 4)
    tok = torch.zeros(1, dtype=torch.int64, device="cuda")
    plain = [step_ms(engine, tok, stream) for _ in range(12)][4:]
    results["plain_step_ms"] = statistics.median(plain)
    log(f"plain step {results['plain_step_ms']:.2f} ms")
    rows = {}
    variants = [("dma", dma_fn(s), s["host_bytes"])]
    variants += [(f"gather{c},{w},{t}", gather_fn(s, (c, w, t)), s["host_bytes"]) for c, w, t in shapes]
    for name, fn, nbytes in variants:
        try:
            row = measure(engine, tok, stream, side, fn, nbytes, args.repeat, args.max_steps)
            if row["step_median_ms"] is not None:
                row["step_over_plain"] = row["step_median_ms"] / results["plain_step_ms"]
            rows[name] = row
            log(f"{name}: alone {row['alone_gb_s']:.1f} GB/s host; under decode {row['under_gb_s']} GB/s, "
                f"step x{row.get('step_over_plain')} over {row['steps_under']} steps")
        except Exception as err:  # recorded: the other shapes still run
            rows[name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{name} failed: {err}")
        results["variants"] = rows
        save()
    results["plain_step_ms_after"] = statistics.median([step_ms(engine, tok, stream) for _ in range(8)])
    save()


if __name__ == "__main__":
    main()
