"""Where a HeteroCache recall step's time goes in the HF backend (GPU, diagnostic).

Same setup as ``hf_decode`` (Llama-3.1-8B shape, random bf16 weights and K/V, batch 1,
C = 0.5); decodes until a recall step, then times the pieces of one recall step with host
syncs around each (policy decode, recall execution, attention), then the same pieces' host
time without added syncs (launches plus the syncs they make themselves), writes a
torch.profiler table of the next recall step, and times both recall landing modes
(``reuse_resident`` off and on):

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.recall_step_profile --out $OUT/recall_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from typing import Any

import torch

from hcpolicy.bench.hf_decode import fill_compressed, llama8b_config, llama_like_profile, timed
from hcpolicy.policy.heterocache import HeteroCachePolicy


def host_timed(table: dict[str, list[float]], name: str, fn: Any, stamps: list[float] | None = None) -> Any:
    """``fn`` wrapped to append its host time in ms (no syncs added) to table[name], and
    its start time to ``stamps``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        if stamps is not None:
            stamps.append(t0)
        out = fn(*args, **kwargs)
        table[name].append((time.perf_counter() - t0) * 1e3)
        return out

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from transformers import LlamaForCausalLM

    from hcpolicy.backends.hf import HFBackend
    from hcpolicy.backends.hf import cache as cache_mod
    from hcpolicy.backends.hf.compat import cache_kwarg

    length = args.context
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama8b_config(length + 1024)).to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    backend = HFBackend(model)
    policy = HeteroCachePolicy(profile=llama_like_profile(backend.spec), compression=0.5)
    cache = backend.new_cache(policy, headroom=64)  # 55 decode steps below: no regrowth
    cache.prompt_length = length
    fill_compressed(cache, length)
    token = torch.tensor([[17]], device="cuda")

    def step(i: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(token, **{cache_kwarg(model): cache}, position_ids=torch.tensor([[length + i]], device="cuda"))
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    result: dict[str, Any] = {"context": length}
    with backend.attach():
        plain = [step(i) for i in range(10)]  # two recall steps (4 and 9) included, compiles kernels
        result["warm_steps_ms"] = plain
        pieces: dict[str, list[float]] = collections.defaultdict(list)
        original_decode, original_select = policy.decode, policy._satellite_selection
        original_recall = cache_mod.HeadwiseLayer.recall
        policy.decode = timed(pieces, "policy.decode", original_decode)
        policy._satellite_selection = timed(pieces, "policy._satellite_selection", original_select)
        cache_mod.HeadwiseLayer.recall = timed(pieces, "layer.recall", original_recall)
        instrumented = [step(10 + i) for i in range(5)]  # step 14 is a recall step
        policy.decode, policy._satellite_selection = original_decode, original_select
        cache_mod.HeadwiseLayer.recall = original_recall
        result["instrumented_steps_ms"] = instrumented
        host: dict[str, list[float]] = collections.defaultdict(list)
        stamps: list[float] = []  # host clock at each layer's policy.decode: per-layer intervals
        policy.decode = host_timed(host, "policy.decode", original_decode, stamps)
        policy._satellite_selection = host_timed(host, "policy._satellite_selection", original_select)
        cache_mod.HeadwiseLayer.recall = host_timed(host, "layer.recall", original_recall)
        result["host_steps_ms"] = [step(15 + i) for i in range(5)]  # step 19 is a recall step
        policy.decode, policy._satellite_selection = original_decode, original_select
        cache_mod.HeadwiseLayer.recall = original_recall
        result["host_pieces_ms_total"] = {k: sum(v) for k, v in host.items()}
        layers = len(cache.layers)
        for name, at in (("plain", 3), ("recall", 4)):  # steps 18 and 19 of the five
            t = stamps[at * layers : (at + 1) * layers]
            result[f"host_layer_intervals_ms_{name}_step"] = [round((b - a) * 1e3, 3) for a, b in zip(t, t[1:])]
        result["pieces_ms_total"] = {k: sum(v) for k, v in pieces.items()}
        result["pieces_calls"] = {k: len(v) for k, v in pieces.items()}
        from torch.profiler import ProfilerActivity, profile

        for i in range(20, 24):
            step(i)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result["profiled_step_ms"] = step(24)  # a recall step
        result["profile_cpu"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        result["profile_cuda"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)
        result["after_steps_ms"] = [step(25 + i) for i in range(10)]
        result["landing"] = {}
        for at, reuse in ((35, False), (45, True)):
            cache.reuse_resident = reuse
            bytes_before, recalls_before = cache.runtime.counters().h2d_bytes, cache.recalls
            times = [step(at + i) for i in range(10)]  # recall steps at + 4 and at + 9
            recalls = cache.recalls - recalls_before
            result["landing"]["reuse_resident" if reuse else "from_host"] = {
                "steps_ms": times, "recall_steps_ms": [times[4], times[9]],
                "h2d_bytes_per_recall": (cache.runtime.counters().h2d_bytes - bytes_before) / max(1, recalls),
            }  # fmt: skip
    result["recalls"] = cache.recalls
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("profile_")}, indent=1))
    print(result["profile_cpu"])
    print(result["profile_cuda"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
