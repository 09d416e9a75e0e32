"""Reference engine acceptance bench on one GPU: Llama-3.1-8B shape, random bf16 weights.

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.engine_decode --output $OUT/engine_decode_h200.json

Parts (``--parts``, comma list; default all; split them over several calls if needed):
  a  HBM bandwidth (device-to-device copy, read + write)
  b  full-KV engine decode at --full-context (128K) batch 1: ms/token, floor, ratio
  c  HeteroCache C=0.5 at --long-context (224K) batch 1 (synthetic profile in the released
     Llama-3.1-8B proportions) vs its floor and the full-KV engine at 224K
  c_hf  HF transformers DynamicCache and StaticCache + torch.compile at 224K (few steps)
  d  per-step kinds of c's HeteroCache run (plain / decision / landing, below) with their
     medians and recall bytes; prefill time with HeteroCache vs full at --prefill-context
     (a real chunked prefill of random tokens)
  e  capacity at 128K: concurrent sequences that fit with full KV vs HeteroCache C=0.3
     (satellites on the host), and tokens/s of each from a measured batched decode

Step kinds (``decode_times``): 'decision' steps end a drift window (every decode_period
steps): the engine scores it on the device (--device-decisions off: the policy does) and
recalls follow at once, or with --recall-landing async during the next step ('recall');
``recalls`` / ``h2d_bytes`` / ``recalled_rows`` / ``moved_rows`` say what moved; 'landing'
steps start with a recall pending (next_step: the replay waits for it; async: finished
copies switch pages; eager_step: the step runs eagerly); 'in_flight' steps run while async
copies do; the rest 'plain'. ``unsynced``: the mean step over as many steps again with no
host sync between them, as a serving loop runs (``run_ms``).

--drift: what the policy's monitor queries look like (only HeteroCache's decisions change,
not the step's cost; with device decisions the walk below replaces the step's own queries,
``StepRandomWalk``, since the decode kernel taps them; otherwise only what the policy sees):
  random     the model's own queries over random K/V (today's bench): nearly every window
             fires and ~60% of a satellite's rows change per recall;
  realistic  per layer, the first decode query q_0 is the model's; after it each step's
             query is q_t = q_{t-1} + sigma * rms(q_{t-1}) * e_t, e_t ~ N(0, I) drawn per
             (sequence, query head, dim) from a seeded generator (sigma = --drift-sigma,
             0.05), i.e. a slow random walk: the first window fires (the prefill's random
             reference is unrelated), later ones rarely, and recalls move few new rows.

Floors are (weight bytes + KV bytes read per step) / the bandwidth of part a (measured
again when a is not selected). Each part prints progress and writes into the JSON as it
finishes (a part that fails records its error and the others still run).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.backends.torch_engine.bench import bandwidth, hf_model
from hcpolicy.bench.hf_decode import llama_like_profile
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.runtime import TransferRuntime

PARTS = ("a", "b", "c", "c_hf", "d", "e")
KINDS = ("plain", "decision", "recall", "in_flight", "landing")  # see decode_times
GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class RandomWalkQueries:
    """``Engine.query_hook`` for --drift realistic (see the module docstring). Once every
    layer has started its walk, the first call of a window walks all layers together (one
    noise draw, a few launches per step), so the hook adds little host time to the
    decision step it is measured in."""

    def __init__(self, sigma: float, seed: int = 0) -> None:
        self.sigma = sigma
        self.gen = torch.Generator(device="cuda").manual_seed(seed)
        self.last: dict[int, torch.Tensor] = {}  # layer -> [B, H_q, D] float32
        self._walked: dict[int, torch.Tensor] = {}  # layer -> this window's queries
        self._window = -1  # first step of the window in _walked

    def __call__(self, layer: int, first_step: int, queries: torch.Tensor) -> torch.Tensor:
        if layer not in self.last:  # the walk starts from the model's first decode query
            self.last[layer] = queries[:, :, 0].float()
            rest = self._walk(self.last[layer].unsqueeze(0), queries.shape[2] - 1)[0]  # [B, H_q, N-1, D]
            self.last[layer] = rest[:, :, -1] if rest.shape[2] else self.last[layer]
            return torch.cat([queries[:, :, :1], rest.to(queries.dtype)], dim=2)
        if first_step != self._window or layer not in self._walked:
            self._window = first_step
            layers = sorted(self.last)
            walked = self._walk(torch.stack([self.last[i] for i in layers]), queries.shape[2])  # [n, B, H_q, N, D]
            for i, w in zip(layers, walked):
                self.last[i], self._walked[i] = w[:, :, -1], w.to(queries.dtype)
        return self._walked.pop(layer)

    def _walk(self, prev: torch.Tensor, steps: int) -> torch.Tensor:
        """prev [n, B, H_q, D] float32 -> the next ``steps`` queries [n, B, H_q, steps, D]."""
        noise = torch.randn((steps, *prev.shape), generator=self.gen, device=prev.device)
        out = []
        for e in noise:
            prev = prev + self.sigma * prev.pow(2).mean(-1, keepdim=True).sqrt() * e
            out.append(prev)
        return torch.stack(out, dim=3) if out else prev.new_zeros((*prev.shape[:3], 0, prev.shape[3]))


class StepRandomWalk:
    """``Engine.step_query_hook`` for --drift realistic when the engine decides on the device
    (its decode kernel taps the pivots' logits inside the captured step, so the walk must
    be the step's own query): the same walk as ``RandomWalkQueries``, precomputed per layer
    from the model's first decode query (at the graph's warm-up, outside any timing) for
    ``steps`` steps. Inside the graph, layer 0 copies the step's queries of every layer
    into one buffer (one launch) and each layer attends with its row of it. Attention runs
    on the walked queries (random weights: the step costs the same)."""

    def __init__(self, sigma: float, steps: int, layers: int, seed: int = 0) -> None:
        self.walk = RandomWalkQueries(sigma, seed)
        self.steps, self.layers = steps, layers
        self.walks: dict[int, torch.Tensor] = {}  # layer -> [steps, B, H_q, 1, D], until the bank is built
        self.bank: torch.Tensor | None = None  # [steps, layers, B, H_q, 1, D]
        self.now: torch.Tensor | None = None  # [layers, B, H_q, 1, D]: this step's queries
        self.counter: torch.Tensor | None = None

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if self.bank is None:  # eager: the graph's warm-up step, before capture
            first = q[:, :, 0].float()
            rest = self.walk._walk(first.unsqueeze(0), self.steps - 1)[0]  # [B, H_q, steps - 1, D]
            walk = torch.cat([first.unsqueeze(2), rest], dim=2).to(q.dtype)  # [B, H_q, steps, D]
            self.walks[layer] = walk.permute(2, 0, 1, 3).unsqueeze(3)
            if len(self.walks) < self.layers:
                return self.walks[layer][0]
            self.bank = torch.stack([self.walks[i] for i in range(self.layers)], dim=1)
            self.now = self.bank[0].clone()
            self.counter = torch.ones(1, dtype=torch.int64, device=q.device)
            self.walks.clear()
            return self.now[layer]
        if layer == 0:
            torch.index_select(self.bank, 0, self.counter, out=self.now.unsqueeze(0))
            self.counter.add_(1).clamp_(max=self.steps - 1)
        return self.now[layer]


def decode_times(engine: Engine, steps: int) -> list[dict[str, Any]]:
    """Per decode step: ms (CUDA events around ``decode``, the host waiting for the compute
    stream after each step, so host work inside a step counts), its kind and what its recalls moved (host
    bytes and rows, device-moved rows). Kinds: 'decision' (a window is scored), 'recall'
    (recalls issued: at once after a decision, or with async landing during the next
    step), 'landing' (in-place recalls waited for, or async ones switched in), 'in_flight'
    (async copies running under the step), 'plain'."""
    tok = torch.zeros(engine.batch, dtype=torch.int64, device="cuda")
    exe, rec = engine.executor, engine.executor.recaller
    out = []
    for _ in range(steps):
        before = (exe.recalls, exe.recalled_rows, exe.moved_rows, rec.landed, engine.eager_steps,
                  engine.runtime.counters().h2d_bytes)  # fmt: skip
        decision = engine.observer.due(engine.step)
        pending, flying = bool(exe.pending), bool(rec.inflight)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        engine.decode(tok)
        host_ms = (time.perf_counter() - t0) * 1e3  # until decode returned (the host's own work)
        b.record()
        b.synchronize()  # the compute stream only: async copies run on under the next steps
        after = (exe.recalls, exe.recalled_rows, exe.moved_rows, rec.landed, engine.eager_steps,
                 engine.runtime.counters().h2d_bytes)  # fmt: skip
        d = [x - y for x, y in zip(after, before)]
        if decision:
            kind = "decision"
        elif d[0]:
            kind = "recall"
        elif pending or d[3]:
            kind = "landing"
        else:
            kind = "in_flight" if flying else "plain"
        out.append({"ms": a.elapsed_time(b), "host_ms": host_ms, "kind": kind, "eager": d[4] > 0, "recalls": d[0],
                    "recalled": d[0] > 0, "recalled_rows": d[1], "moved_rows": d[2], "landed": d[3],
                    "h2d_bytes": d[5], "in_flight": len(rec.inflight)})  # fmt: skip
    return out


def by_kind(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and max ms per step kind, each median over the plain steps' median, and the
    median host time of the kind's steps (``decode`` until it returned)."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for s in steps:
        kinds.setdefault(s["kind"], []).append(s)
    plain = statistics.median(s["ms"] for s in kinds["plain"]) if "plain" in kinds else None
    out = {}
    for kind, group in kinds.items():
        ms = [s["ms"] for s in group]
        out[kind] = {"n": len(ms), "median_ms": statistics.median(ms), "max_ms": max(ms),
                     "median_over_plain": statistics.median(ms) / plain if plain else None,
                     "host_median_ms": statistics.median(s.get("host_ms", float("nan")) for s in group)}  # fmt: skip
    return out


def run_ms(engine: Engine, steps: int) -> dict[str, Any]:
    """``steps`` steps with no host sync between them (the host runs ahead as a serving loop
    does): the mean ms per step until the compute stream has produced the last token
    (async copies still running then are not waited for), and the recalls in the window.
    ``steps_ms``: the compute stream's time from one step's start to the next (events
    recorded without waiting: idle gaps where the host fell behind count); ``host_ms``:
    each ``decode`` call until it returned; ``mallocs``: device segments (cudaMalloc) and
    pinned host blocks (cudaHostAlloc) each call made: both are implicit synchronisations,
    so work issued after one waits for all work issued before on every stream."""
    tok = torch.zeros(engine.batch, dtype=torch.int64, device="cuda")
    exe, rec = engine.executor, engine.executor.recaller
    before = (exe.recalls, rec.landed, engine.runtime.counters().h2d_bytes)
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    host, mallocs = [], []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        marks[i].record()
        t = time.perf_counter()
        had = allocations()
        engine.decode(tok)
        host.append((time.perf_counter() - t) * 1e3)
        mallocs.append([x - y for x, y in zip(allocations(), had)])
    marks[-1].record()
    torch.cuda.current_stream().synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    torch.cuda.synchronize()
    after = (exe.recalls, rec.landed, engine.runtime.counters().h2d_bytes)
    return {"ms_mean": ms, "steps": steps, "recalls": after[0] - before[0], "landed": after[1] - before[1],
            "h2d_bytes": after[2] - before[2], "steps_ms": [a.elapsed_time(b) for a, b in zip(marks, marks[1:])],
            "host_ms": host, "mallocs": mallocs}  # fmt: skip


def allocations() -> tuple[int, int]:
    """(device segments, pinned host blocks) allocated so far by torch's caching allocators."""
    device = torch.cuda.memory_stats().get("segment.all.allocated", 0)
    host = getattr(torch.cuda, "host_memory_stats", lambda: {})().get("num_host_alloc", 0)
    return int(device), int(host)


def engine_cell(model: Any, context: int, batch: int, policy: Any, steps: int, warmup: int, bw: float,
                num_pages: int | None = None, args: argparse.Namespace | None = None) -> dict[str, Any]:  # fmt: skip
    new = 2 * steps + warmup + 1  # timed steps with a host sync each, then as many without
    options = {} if args is None else engine_options(args)
    engine = Engine(model, EngineConfig(max_batch_size=batch, max_seq_len=context + new, num_pages=num_pages,
                                        **options))  # fmt: skip
    if args is not None:  # the async recall gathers launch as the engine's runtime says
        rt = engine.runtime
        rt.gather_ctas, rt.gather_warps, rt.gather_tile_words = args.gather_shape
    if args is not None and args.drift == "realistic" and policy is not None:
        if engine.config.device_decisions is False:
            engine.query_hook = RandomWalkQueries(args.drift_sigma)
        else:
            engine.step_query_hook = StepRandomWalk(args.drift_sigma, new + 2, model.config.num_layers)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.prefill_random([context] * batch, policy, max_new_tokens=new)
    torch.cuda.synchronize()
    fill_s = time.perf_counter() - t0
    kv_read = engine.kv_bytes_read()
    every = decode_times(engine, warmup + steps)
    unsynced = run_ms(engine, steps)
    timed = every[warmup:]
    ms = [s["ms"] for s in timed]
    floor = (model.weight_bytes() + kv_read) / bw * 1e3
    plain = [s["ms"] for s in timed if s["kind"] == "plain"]
    row = {
        "context": context, "batch": batch, "ms_per_token": statistics.median(ms), "ms_mean": statistics.mean(ms),
        "ms_plain_median": statistics.median(plain) if plain else None, "steps": every, "floor_ms": floor,
        "ratio_to_floor": statistics.median(ms) / floor, "kv_bytes_read": kv_read,
        "kv_bytes_device": engine.kv_bytes_device(), "kv_bytes_full": engine.kv_bytes_full(),
        "host_bytes": engine.host_bytes(), "recalls": engine.executor.recalls,
        "recalled_rows": engine.executor.recalled_rows, "moved_rows": engine.executor.moved_rows,
        "h2d_bytes": sum(s["h2d_bytes"] for s in every), "fused_kernels": engine.ops.fused,
        "observe_period": engine.observer.period, "fill_s": fill_s,
        "device_decisions": engine.monitor is not None,
        "monitor_fires": engine.monitor.fires if engine.monitor is not None else None,
        "peak_gb": torch.cuda.max_memory_allocated() / GB, "pool_gb": engine.kv.pool_bytes() / GB,
        "tokens_per_s": batch * 1e3 / statistics.mean(ms),
        "by_kind": by_kind(every[1:]), "unsynced": unsynced,
    }  # fmt: skip
    engine.release()
    del engine
    gc.collect()  # the engine, its graphs and executor refer to each other: free the pool now
    torch.cuda.empty_cache()
    return row


def warm_up(model: Any, config: ModelConfig, args: argparse.Namespace) -> None:
    """A short HeteroCache run at 16K through a decision and its recalls, discarded: the
    kernels a first recall or decision compiles (Triton JIT, CUDA graph capture of the
    decision) are then ready, as in a serving process past its first request."""
    engine_cell(model, 16384, 1, hetero(config.spec(), args.compression), 4, 6, 1.0, args=args)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    fused = {"auto": None, "on": True, "off": False}[args.fused]
    step = None if args.recall_step_mb == 0 else int(args.recall_step_mb * (1 << 20))
    return {"fused_kernels": fused, "recall_landing": args.recall_landing, "async_recall_step_bytes": step,
            "batch_observations": not args.per_step_observations,
            "device_decisions": {"auto": None, "on": True, "off": False}[args.device_decisions]}  # fmt: skip


def hetero(spec: Any, compression: float) -> HeteroCachePolicy:
    """The engine decodes one token per step, so HeteroCache's question-time refresh (which
    needs a chunk of new tokens) never fires there: without it only satellites go to the host."""
    return HeteroCachePolicy(profile=llama_like_profile(spec), compression=compression, refresh=False)


def part_c_hf(args: argparse.Namespace, config: ModelConfig, bw: float) -> dict[str, Any]:
    """HF transformers at --long-context: DynamicCache eager, StaticCache + torch.compile."""
    import transformers
    from transformers import DynamicCache, StaticCache

    from hcpolicy.backends.hf.compat import cache_kwarg

    model = hf_model(config, "cuda", torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    length, spec = args.long_context, config.spec()
    gen = torch.Generator(device="cuda").manual_seed(1)
    shape = (1, spec.num_kv_heads, length, spec.head_dim)
    out: dict[str, Any] = {"transformers": transformers.__version__}
    kv_bytes = 2 * spec.num_layers * spec.num_kv_heads * length * spec.head_dim * 2
    token = torch.tensor([[17]], device="cuda")
    for name in ("dynamic", "static_compiled"):
        try:
            log(f"c_hf: {name} at {length}")
            if name == "dynamic":
                cache = DynamicCache()
                for layer in range(spec.num_layers):
                    cache.update(torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16),
                                 torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16), layer)  # fmt: skip
                forward = model
            else:
                cache = StaticCache(config=model.config, max_cache_len=length + args.hf_steps + 4)
                for layer in range(spec.num_layers):
                    cache.update(torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16),
                                 torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16), layer,
                                 {"cache_position": torch.arange(length, device="cuda")})  # fmt: skip
                forward = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            times = []
            for i in range(args.hf_steps + 2):
                pos = torch.tensor([[length + i]], device="cuda")
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                with torch.no_grad():
                    forward(token, **{cache_kwarg(model): cache}, position_ids=pos, cache_position=pos[0])
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            out[name] = {"ms_all": times, "ms_per_token": statistics.median(times[2:]),
                         "floor_ms": (weight_bytes + kv_bytes) / bw * 1e3}  # fmt: skip
            log(f"c_hf: {name} {out[name]['ms_per_token']:.1f} ms/token")
        except Exception as err:  # recorded: the engine parts must not be lost to an HF failure
            out[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
            log(f"c_hf: {name} failed: {err}")
        cache = None
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return out


def part_d_prefill(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Real chunked prefill of random tokens: full vs HeteroCache (compress + offload)."""
    out = {}
    length = args.prefill_context
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    for name, policy in (("full", None), ("heterocache", hetero(model.config.spec(), args.compression))):
        engine = Engine(model, EngineConfig(max_seq_len=length + 8, prefill_chunk=args.prefill_chunk,
                                            **engine_options(args)))  # fmt: skip
        runs = []
        for _ in range(2):  # the first run warms up kernels
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.prefill(ids, policy, max_new_tokens=8)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        out[name] = {"seconds": runs[-1], "warmup_seconds": runs[0], "kv_bytes_device": engine.kv_bytes_device(),
                     "host_bytes": engine.host_bytes()}  # fmt: skip
        log(f"d: prefill {length} {name}: {runs[-1]:.2f} s")
        engine.release()
        del engine
        torch.cuda.empty_cache()
    out["heterocache_over_full"] = out["heterocache"]["seconds"] / out["full"]["seconds"]
    return out


def part_e(model: Any, args: argparse.Namespace, bw: float) -> dict[str, Any]:
    """Sequences of --full-context that fit: device KV per sequence vs free memory; host
    bytes per sequence vs --host-gb; then a batched decode at the fitting batch (capped)."""
    config, length = model.config, args.full_context
    per_token = 2 * config.head_dim * 2 * config.num_layers * config.num_kv_heads
    free = torch.cuda.mem_get_info()[0] - args.headroom_gb * GB
    spec = config.spec()
    policy = hetero(spec, args.capacity_compression)
    probe = Engine(model, EngineConfig(max_seq_len=16384 + 8))  # long enough that page rounding is noise
    probe.prefill_random([16384], policy, max_new_tokens=8)
    kept_fraction = probe.kv_bytes_device() / probe.kv_bytes_full()
    host_fraction = probe.host_bytes() / probe.kv_bytes_full()
    probe.release()
    del probe
    full_seq = length * per_token
    hc_seq = full_seq * kept_fraction
    out = {"free_gb": free / GB, "full_seq_gb": full_seq / GB, "heterocache_seq_gb": hc_seq / GB,
           "heterocache_host_seq_gb": full_seq * host_fraction / GB, "host_gb": args.host_gb,
           "fit_full": int(free // full_seq),
           "fit_heterocache_device": int(free // hc_seq),
           "fit_heterocache": int(min(free // hc_seq, args.host_gb * GB // max(1, full_seq * host_fraction)))}  # fmt: skip
    log(f"e: fit at {length}: full {out['fit_full']}, heterocache {out['fit_heterocache']} "
        f"(device-bound {out['fit_heterocache_device']}, host-bound by {args.host_gb} GB)")
    for name, pol, fit in (("full", None, out["fit_full"]), ("heterocache", policy, out["fit_heterocache"])):
        batch = max(1, min(fit, args.capacity_max_batch))
        try:
            # the pool holds what the batch keeps plus one layer at full length (the random fill
            # compresses layer by layer), with a partial page per head; the rest stays free for
            # the policy's scoring buffers
            page_bytes = 64 * per_token / (config.num_layers * config.num_kv_heads)
            need = batch * (hc_seq + full_seq / config.num_layers) * 1.05
            pages = int(need // page_bytes) + batch * config.num_layers * config.num_kv_heads if pol else None
            row = engine_cell(model, length, batch, hetero(spec, args.capacity_compression) if pol else None,
                              args.steps, args.warmup, bw, num_pages=pages, args=args)  # fmt: skip
            row["steps"] = [s["ms"] for s in row["steps"]]
            out[name] = row
            log(f"e: {name} batch {batch}: {row['ms_per_token']:.1f} ms/step, {row['tokens_per_s']:.0f} tokens/s")
        except Exception as err:
            out[name] = {"batch": batch, "error": f"{type(err).__name__}: {err}"}
            log(f"e: {name} batch {batch} failed: {err}")
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--full-context", type=int, default=131072)
    parser.add_argument("--long-context", type=int, default=229376)  # 224K
    parser.add_argument("--prefill-context", type=int, default=32768)
    parser.add_argument("--prefill-chunk", type=int, default=8192)
    parser.add_argument("--compression", type=float, default=0.5)
    parser.add_argument("--capacity-compression", type=float, default=0.3)
    parser.add_argument("--capacity-max-batch", type=int, default=8, help="largest batch actually decoded in e")
    parser.add_argument("--host-gb", type=float, default=80.0, help="pinned host memory e may count on")
    parser.add_argument("--headroom-gb", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--hf-steps", type=int, default=3)
    parser.add_argument("--drift", choices=("random", "realistic"), default="random",
                        help="monitor queries of c/d's HeteroCache run (see the module docstring)")
    parser.add_argument("--drift-sigma", type=float, default=0.05)
    parser.add_argument("--recall-landing", choices=("next_step", "eager_step", "async"), default="next_step")
    parser.add_argument("--fused", choices=("auto", "on", "off"), default="auto", help="fused elementwise kernels")
    parser.add_argument("--device-decisions", choices=("auto", "on", "off"), default="auto",
                        help="HeteroCache's drift windows scored on the device (EngineConfig.device_decisions)")
    parser.add_argument("--gather", default=None, metavar="CTAS,WARPS,TILE_WORDS",
                        help="the engines' runtime gather launch, which the async recall gathers use "
                             "(default: TransferRuntime's)")
    parser.add_argument("--recall-step-mb", type=float, default=EngineConfig().async_recall_step_bytes / (1 << 20),
                        help="MiB the async recall gathers write per decode step (0: whole batches at once)")
    parser.add_argument("--priority", type=int, default=0,
                        help="CUDA stream priority the engines run on (lower is higher; 0: the default stream's)")
    parser.add_argument("--per-step-observations", action="store_true",
                        help="call the policy every step (not once per decode_period)")
    args = parser.parse_args()
    try:  # the runtime's defaults, or the given launch checked as the runtime checks it
        names = ("gather_ctas", "gather_warps", "gather_tile_words")
        given = {} if args.gather is None else dict(zip(names, (int(x) for x in args.gather.split(",")), strict=True))
        args.gather_shape = TransferRuntime("cpu", **given).gather_shape()
    except ValueError as err:
        parser.error(f"--gather: {err}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {PARTS}")
    if not torch.cuda.is_available():
        parser.error("this bench needs a CUDA device")
    path, g = Path(args.output), args.gather_shape
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "args": vars(args), "command": "python3 -m hcpolicy.bench.engine_decode " +
                               f"--parts {args.parts} --drift {args.drift} --drift-sigma {args.drift_sigma} "
                               f"--recall-landing {args.recall_landing} --steps {args.steps} --fused {args.fused} "
                               f"--priority {args.priority} --gather {g[0]},{g[1]},{g[2]} "
                               f"--recall-step-mb {args.recall_step_mb:g} "
                               f"--output {path.name}"}  # fmt: skip

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))

    def run(name: str, fn: Callable[[], Any]) -> None:
        log(f"part {name}")
        stream = torch.cuda.Stream(priority=args.priority) if args.priority else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                results[name] = fn()
        except Exception as err:
            results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
            log(f"part {name} failed: {err}")
        save()

    bw = bandwidth(torch.device("cuda"), 2 << 30)
    results["a"] = {"hbm_bytes_per_s": bw}
    log(f"a: HBM copy {bw / 1e12:.2f} TB/s")
    save()
    config = ModelConfig.preset("llama-3.1-8b", max_position=max(args.long_context, args.full_context) + 1024)
    needs_engine = any(p in parts for p in ("b", "c", "d", "e"))
    model = random_model(config, device="cuda", dtype=torch.bfloat16) if needs_engine else None
    if model is not None:
        results["weight_bytes"] = model.weight_bytes()
        log(f"weights {model.weight_bytes() / GB:.1f} GB")
    if "b" in parts:
        run("b", lambda: engine_cell(model, args.full_context, 1, None, args.steps, args.warmup, bw, args=args))
        log(f"b: full {args.full_context}: {results['b'].get('ms_per_token', float('nan')):.2f} ms/token, "
            f"floor {results['b'].get('floor_ms', float('nan')):.2f}")
    if "c" in parts or "d" in parts:
        def part_c() -> dict[str, Any]:
            warm_up(model, config, args)
            hc = engine_cell(model, args.long_context, 1, hetero(config.spec(), args.compression), args.steps,
                             args.warmup, bw, args=args)  # fmt: skip
            log(f"c: heterocache {args.long_context}: {hc['ms_per_token']:.2f} ms/token (plain "
                f"{hc['ms_plain_median']}), floor {hc['floor_ms']:.2f}, recalls {hc['recalls']}")
            full = engine_cell(model, args.long_context, 1, None, args.steps, args.warmup, bw, args=args)
            log(f"c: full {args.long_context}: {full['ms_per_token']:.2f} ms/token, floor {full['floor_ms']:.2f}")
            return {"heterocache": hc, "full": full, "speedup_vs_full": full["ms_mean"] / hc["ms_mean"]}

        run("c", part_c)
    if "d" in parts and "heterocache" in results.get("c", {}):
        steps = results["c"]["heterocache"]["steps"][args.warmup :]
        results["d_steps"] = {"drift": args.drift, "recall_landing": args.recall_landing}
        for kind in KINDS:
            group = [s for s in steps if s["kind"] == kind]
            ms = [s["ms"] for s in group]
            results["d_steps"][kind] = {
                "median_ms": statistics.median(ms) if ms else None, "count": len(group),
                "with_recalls": sum(s["recalls"] > 0 for s in group),
                "h2d_bytes_median": statistics.median([s["h2d_bytes"] for s in group]) if group else None,
                "recalled_rows": sum(s["recalled_rows"] for s in group), "moved_rows": sum(s["moved_rows"] for s in group),
            }  # fmt: skip
        plain = results["d_steps"]["plain"]["median_ms"]
        for kind in KINDS[1:]:
            ms = results["d_steps"][kind]["median_ms"]
            results["d_steps"][kind]["over_plain"] = ms / plain if ms and plain else None
        log(f"d: step medians {json.dumps(results['d_steps'])}")
        save()
    if "d" in parts:
        run("d", lambda: part_d_prefill(model, args))
    if "e" in parts:
        run("e", lambda: part_e(model, args, bw))
    if "c_hf" in parts:
        del model
        model = None
        torch.cuda.empty_cache()
        run("c_hf", lambda: part_c_hf(args, config, bw))
    save()
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
