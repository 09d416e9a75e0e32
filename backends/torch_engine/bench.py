"""Decode-latency sweeps for ``hc bench``: per backend, policy, context and batch, the median
ms per token beside the physical floor, (weights + KV bytes read per step) / bandwidth,
with the bandwidth measured in the same run (a large device-to-device copy).

The cache is filled with random K/V (``random_kv``; prefill time is not the point) or by a
real prefill of random token ids. Runs on CPU with the 'tiny' config (CI) and on CUDA with
'llama-3.1-8b' (random bf16 weights).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from hcpolicy.bench.hf_decode import llama_like_profile
from hcpolicy.spec import ModelSpec

from .config import ModelConfig
from .engine import Engine, EngineConfig
from .loading import random_model

Progress = Callable[[str], None]


@attrs.frozen
class BenchPlan:
    backend: str  # 'torch_engine' or 'hf'
    config: str  # a ModelConfig preset
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    policies: tuple[str, ...] = ("full", "heterocache")
    compression: float = 0.5
    steps: int = 8
    warmup: int = 6  # > the HeteroCache window (5), so a scoring step is warmed up
    random_kv: bool = True
    cuda_graphs: bool = True
    device: str = "cuda"
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.backend not in ("torch_engine", "hf"):
            raise ValueError(f"bench backends are torch_engine and hf, got {self.backend!r}")
        if not self.contexts or min(self.contexts) < 8 or not self.batches or min(self.batches) < 1:
            raise ValueError("contexts must be >= 8 tokens and batch sizes >= 1")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("steps must be >= 1 and warmup >= 0")


def make_policy(name: str, spec: ModelSpec, compression: float) -> Any:
    from hcpolicy.policy.factory import build_policy

    if name == "full":
        return None
    policy = build_policy(name, compression, profile=llama_like_profile(spec))
    # the engine decodes one token per step: a refresh on a chunk of new tokens (HeteroCache)
    # never fires here and would only park the anchors' full KV on the host
    if attrs.has(type(policy)) and "refresh" in {f.name for f in attrs.fields(type(policy))}:
        policy = attrs.evolve(policy, refresh=False)
    return policy


def bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy (median of 8 after 2)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = [_timed(device, lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * nbytes / (statistics.median(times[2:]) / 1e3)


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Milliseconds of ``fn`` (CUDA events on CUDA)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_engine(engine: Engine, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Per-step ms of ``warmup + steps`` decode steps after a prefill; (timed steps, all)."""
    tok = torch.zeros(engine.batch, dtype=torch.int64, device=engine.device)
    out: list[float] = []
    for _ in range(warmup + steps):
        out.append(_timed(engine.device, lambda: engine.decode(tok)))
    return out[warmup:], out


def run_engine(plan: BenchPlan, model: Any, context: int, batch: int, policy_name: str) -> dict[str, Any]:
    """One cell on the torch engine: fill, then time decode steps."""
    new = plan.warmup + plan.steps + 1
    engine = Engine(model, EngineConfig(max_batch_size=batch, max_seq_len=context + new, page_size=64,
                                        cuda_graphs=plan.cuda_graphs))  # fmt: skip
    policy = make_policy(policy_name, engine.spec, plan.compression)
    t0 = time.perf_counter()
    if plan.random_kv:
        engine.prefill_random([context] * batch, policy, max_new_tokens=new, seed=plan.seed)
    else:
        ids = torch.randint(0, engine.mc.vocab_size, (batch, context), generator=torch.Generator().manual_seed(plan.seed))
        engine.prefill(ids, policy, max_new_tokens=new)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prefill_s = time.perf_counter() - t0
    kv_read = engine.kv_bytes_read()
    timed, every = time_engine(engine, plan.steps, plan.warmup)
    row = {
        "ms_per_token": statistics.median(timed), "ms_mean": statistics.mean(timed), "ms_all": every,
        "kv_bytes_read": kv_read, "kv_bytes_device": engine.kv_bytes_device(), "kv_bytes_full": engine.kv_bytes_full(),
        "host_bytes": engine.host_bytes(), "recalls": engine.executor.recalls, "prefill_s": prefill_s,
        "graph_steps": engine.graph_steps, "eager_steps": engine.eager_steps,
    }  # fmt: skip
    if engine.device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    engine.release()
    del engine
    return row


def run_hf(plan: BenchPlan, model: Any, context: int, batch: int, policy_name: str) -> dict[str, Any]:
    """One cell on the HF backend (DynamicCache for 'full', a HeadwiseCache otherwise)."""
    from hcpolicy.backends.hf import HFBackend
    from hcpolicy.backends.hf.compat import cache_kwarg

    backend = HFBackend(model)
    device = backend.device
    spec = backend.spec
    gen = torch.Generator(device=device).manual_seed(plan.seed)
    dtype = next(model.parameters()).dtype
    shape = (batch, spec.num_kv_heads, context, spec.head_dim)
    policy = make_policy(policy_name, spec, plan.compression)
    t0 = time.perf_counter()
    if policy is None:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(spec.num_layers):
            cache.update(torch.randn(shape, generator=gen, device=device, dtype=dtype),
                         torch.randn(shape, generator=gen, device=device, dtype=dtype), layer)  # fmt: skip
        kv_read = sum(l.keys.numel() * 2 * l.keys.element_size() for l in cache.layers)
    else:
        cache = backend.new_cache(policy, headroom=plan.warmup + plan.steps + 1)
        cache.prompt_length = context
        for layer in cache.layers:
            layer.update(torch.randn(shape, generator=gen, device=device, dtype=dtype),
                         torch.randn(shape, generator=gen, device=device, dtype=dtype))  # fmt: skip
            layer.prefilled = True
            query = torch.randn(batch, spec.num_query_heads, 1, spec.head_dim, generator=gen, device=device, dtype=dtype)
            cache.compress(layer, query, torch.tensor([context - 1], device=device))
        kv_read = cache.kv_bytes_device()
    prefill_s = time.perf_counter() - t0
    token = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    step = [0]

    def one() -> None:
        position = torch.full((batch, 1), context + step[0], device=device)
        model(token, **{cache_kwarg(model): cache}, position_ids=position)
        step[0] += 1

    with torch.no_grad(), backend.attach():
        every = [_timed(device, one) for _ in range(plan.warmup + plan.steps)]
    timed = every[plan.warmup :]
    return {"ms_per_token": statistics.median(timed), "ms_mean": statistics.mean(timed), "ms_all": every,
            "kv_bytes_read": kv_read, "kv_bytes_device": kv_read, "prefill_s": prefill_s,
            "recalls": getattr(cache, "recalls", 0)}  # fmt: skip


def hf_model(config: ModelConfig, device: str, dtype: torch.dtype) -> Any:
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[config.family]  # fmt: skip
    hf_config = cls[0](
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, max_position_embeddings=config.max_position,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = cls[1](hf_config).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def run_sweep(plan: BenchPlan, progress: Progress = print) -> dict[str, Any]:
    """Every (policy, context, batch) cell; returns the JSON-ready results."""
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available (use --device cpu)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig.preset(plan.config, max_position=max(plan.contexts) + plan.warmup + plan.steps + 1)
    bw = bandwidth(device, (2 << 30) if device.type == "cuda" else (64 << 20))
    progress(f"bandwidth {bw / 1e9:.1f} GB/s (device-to-device copy, read + write)")
    if plan.backend == "torch_engine":
        model, runner = random_model(config, device=device, dtype=dtype, seed=plan.seed), run_engine
        weight_bytes = model.weight_bytes()
    else:
        model, runner = hf_model(config, plan.device, dtype), run_hf
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for policy in plan.policies:
        for context in plan.contexts:
            for batch in plan.batches:
                progress(f"{plan.backend} {policy} context {context} batch {batch}")
                row = runner(plan, model, context, batch, policy)
                row.update(policy=policy, context=context, batch=batch)
                row["floor_ms"] = (weight_bytes + row["kv_bytes_read"]) / bw * 1e3
                row["floor_ratio"] = row["ms_per_token"] / row["floor_ms"]
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"plan": attrs.asdict(plan), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "bandwidth_bytes_per_s": bw, "weight_bytes": weight_bytes,
            "rows": rows}  # fmt: skip


def write_outputs(results: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """results.json and latency.png (ms/token against context per policy and batch, floors dashed)."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / "bench.json", folder / "bench.png"
    json_path.write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in results["rows"]:
        series.setdefault((row["policy"], row["batch"]), []).append(row)
    for i, ((policy, batch), rows) in enumerate(sorted(series.items())):
        rows.sort(key=lambda r: r["context"])
        x = [r["context"] for r in rows]
        line = ax.plot(x, [r["ms_per_token"] for r in rows], "o-", label=f"{policy}, batch {batch}")[0]
        ax.plot(x, [r["floor_ms"] for r in rows], "--", color=line.get_color(), alpha=0.6,
                label=f"floor ({policy}, batch {batch})")  # fmt: skip
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per decoded token")
    plan = results["plan"]
    ax.set_title(f"{plan['backend']} decode, {plan['config']}, {results['device']}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
