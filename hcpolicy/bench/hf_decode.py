"""HF backend decode latency and memory: HeteroCache (C = 0.5) beside plain DynamicCache.

Llama-3.1-8B shape with random bf16 weights (speed does not depend on weight values), batch
1, caches filled with random K/V at each context length (prefill time is not the point):

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.hf_decode --out $OUT/hf_decode_h200.json

Per context it reports the median and mean per-token decode latency (CUDA events around
each forward; HeteroCache also the decision steps, where it scores and recalls, apart),
peak GPU memory during decode, device KV bytes, host bytes, recalls and the bytes they
moved over PCIe, and the floor: (weights + device KV bytes) / HBM bandwidth measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from hcpolicy.classify import build_profile
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.spec import ModelSpec


def llama8b_config(max_position: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=max_position, rope_theta=500000.0, tie_word_embeddings=False,
    )  # fmt: skip


def llama_like_profile(spec: ModelSpec, seed: int = 0) -> Any:
    """Roles in the proportions of the released Llama-3.1-8B classification: per layer one
    pivot (head 0) whose satellites are every head but the last, and one unique head,
    volatile in even layers and an anchor in odd ones (for 8 KV heads: 1 + 6 + 1). Shared
    by the HF and engine benches."""
    gen = torch.Generator().manual_seed(seed)
    h = spec.num_kv_heads
    stab = 0.3 + 0.6 * torch.rand(spec.num_layers, h, generator=gen)
    adj = torch.zeros(spec.num_layers, h, h, dtype=torch.bool)
    if h >= 3:
        stab[::2, h - 1], stab[1::2, h - 1] = 0.3, 0.8
        adj[:, 0, 1 : h - 1] = True
    else:
        adj[:, 0, 1:] = True
    return build_profile(spec, stab, adj, tau_stable=0.5, settings={"synthetic": "llama-3.1-8b-like roles"})


def timed(table: dict[str, list[float]], name: str, fn: Any) -> Any:
    """``fn`` wrapped to append its wall time in ms (host syncs around it) to table[name]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        table[name].append((time.perf_counter() - t0) * 1e3)
        return out

    return wrapper


def hbm_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * (2 << 30) / statistics.median(times[2:])


def random_kv(length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 8, length, 128)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    return k, v


def time_decode(step: Any, steps: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(i)
        b.record()
        torch.cuda.synchronize()
        if i >= warmup:
            out.append(a.elapsed_time(b))
    return out


def run_dynamic(model: Any, length: int, steps: int, warmup: int) -> dict[str, Any]:
    from transformers import DynamicCache

    from hcpolicy.backends.hf.compat import cache_kwarg

    gen = torch.Generator(device="cuda").manual_seed(1)
    cache = DynamicCache()
    for layer in range(32):
        cache.update(*random_kv(length, gen), layer)
    kv_bytes = sum(l.keys.numel() * 2 * 2 for l in cache.layers)
    torch.cuda.reset_peak_memory_stats()
    token = torch.tensor([[17]], device="cuda")

    def step(i: int) -> None:
        with torch.no_grad():
            model(token, **{cache_kwarg(model): cache}, position_ids=torch.tensor([[length + i]], device="cuda"))

    times = time_decode(step, steps, warmup)
    return {"ms_per_token": statistics.median(times), "ms_all": times, "kv_bytes_device": kv_bytes,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9}  # fmt: skip


def fill_compressed(cache: Any, length: int, seed: int = 1) -> None:
    """What a prefill does to a HeadwiseCache, layer by layer: store random K/V of ``length``
    tokens dense, then let the cache's policy compress it from a random last query."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for layer in cache.layers:
        k, v = random_kv(length, gen)
        layer.update(k, v)
        layer.prefilled = True
        query = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        cache.compress(layer, query, torch.tensor([length - 1], device="cuda"))
        del k, v


def run_heterocache(
    model: Any, length: int, steps: int, warmup: int, compression: float, reuse_resident: bool = True
) -> dict[str, Any]:
    from hcpolicy.backends.hf import HFBackend

    backend = HFBackend(model)
    policy = HeteroCachePolicy(profile=llama_like_profile(backend.spec), compression=compression)
    cache = backend.new_cache(policy, headroom=warmup + steps + 1, reuse_resident=reuse_resident)
    cache.prompt_length = length
    t0 = time.perf_counter()
    fill_compressed(cache, length)
    torch.cuda.synchronize()
    compress_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    token = torch.tensor([[17]], device="cuda")
    from hcpolicy.backends.hf.compat import cache_kwarg

    def step(i: int) -> None:
        with torch.no_grad():
            model(token, **{cache_kwarg(model): cache}, position_ids=torch.tensor([[length + i]], device="cuda"))

    with backend.attach():
        h2d_before = cache.runtime.counters().h2d_bytes
        times = time_decode(step, steps, warmup)
        h2d = cache.runtime.counters().h2d_bytes - h2d_before
    period = policy.trigger.period or 0  # decision steps: decode steps i with (i + 1) % period == 0
    decision = [t for i, t in enumerate(times, warmup) if period and (i + 1) % period == 0]
    other = [t for i, t in enumerate(times, warmup) if not (period and (i + 1) % period == 0)]
    return {
        "decision_steps_ms": decision, "other_steps_ms_mean": statistics.mean(other) if other else None,
        "h2d_bytes_timed": h2d,
        "ms_per_token": statistics.median(times), "ms_all": times, "kv_bytes_device": cache.kv_bytes_device(),
        "kv_bytes_full": cache.kv_bytes_full(2), "host_bytes": cache.host_bytes(), "recalls": cache.recalls,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "compress_s": compress_s,
        "min_compression": policy.profile.min_compression,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--steps", type=int, default=15)
    # longer than the trigger's window (5), so one scoring/recall step, and the compilation
    # of the recall gather kernel, happen before timing starts
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--compression", type=float, default=0.5)
    parser.add_argument("--no-reuse-resident", dest="reuse_resident", action="store_false",
                        help="recalls fetch every row from the host (default: rows a satellite already "
                        "holds move on the device)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import transformers
    from transformers import LlamaForCausalLM

    contexts = [int(c) for c in args.contexts.split(",")]
    bandwidth = hbm_bandwidth()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama8b_config(max(contexts) + 1024)).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "command": "PYTHONPATH=$PWD python3 -m hcpolicy.bench.hf_decode --out $OUT/hf_decode_h200.json"
        + ("" if args.reuse_resident else " --no-reuse-resident"),
        "hbm_bytes_per_s": bandwidth, "weight_bytes": weight_bytes, "reuse_resident": args.reuse_resident,
        "contexts": {},
    }  # fmt: skip
    print(f"HBM copy {bandwidth / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.1f} GB")
    for length in contexts:
        row: dict[str, Any] = {}
        for name, fn in (("dynamic", lambda: run_dynamic(model, length, args.steps, args.warmup)),
                         ("heterocache", lambda: run_heterocache(model, length, args.steps, args.warmup,
                                                                 args.compression, args.reuse_resident))):  # fmt: skip
            torch.cuda.empty_cache()
            r = fn()
            r["floor_ms"] = (weight_bytes + r["kv_bytes_device"]) / bandwidth * 1e3
            row[name] = r
            torch.cuda.empty_cache()
        row["speedup"] = row["dynamic"]["ms_per_token"] / row["heterocache"]["ms_per_token"]
        row["kv_ratio"] = row["heterocache"]["kv_bytes_device"] / row["dynamic"]["kv_bytes_device"]
        results["contexts"][str(length)] = row
        for r in (row["dynamic"], row["heterocache"]):
            r["ms_mean"] = statistics.mean(r["ms_all"])
        row["speedup_mean"] = row["dynamic"]["ms_mean"] / row["heterocache"]["ms_mean"]
        print(f"L={length}: dynamic {row['dynamic']['ms_per_token']:.1f} ms (mean {row['dynamic']['ms_mean']:.1f}), "
              f"heterocache {row['heterocache']['ms_per_token']:.1f} ms (mean {row['heterocache']['ms_mean']:.1f}, "
              f"max {max(row['heterocache']['ms_all']):.1f}) x{row['speedup']:.2f}, KV ratio {row['kv_ratio']:.3f}, "
              f"peak {row['dynamic']['peak_gb']:.1f} vs {row['heterocache']['peak_gb']:.1f} GB, "
              f"recalls {row['heterocache']['recalls']}, decision steps "
              f"{[round(t, 1) for t in row['heterocache']['decision_steps_ms']]} ms")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
