"""Where a reference-engine decode step's time goes (GPU, diagnostic): full KV, batch 1,
Llama-3.1-8B shape with random bf16 weights and K/V; eager step under torch.profiler.

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.engine_step_profile --context 131072
"""

from __future__ import annotations

import argparse
import time

import torch

from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--graphs", action="store_true")
    args = parser.parse_args()
    config = ModelConfig.preset("llama-3.1-8b", max_position=args.context + 1024)
    model = random_model(config, device="cuda", dtype=torch.bfloat16)
    engine = Engine(model, EngineConfig(max_seq_len=args.context + 32, cuda_graphs=args.graphs))
    engine.prefill_random([args.context], None, max_new_tokens=30)
    tok = torch.zeros(1, dtype=torch.int64, device="cuda")
    for _ in range(5):
        engine.decode(tok)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.decode(tok)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    print("kernel", engine.kernel, "graphs", engine.graphs_enabled, "ms", [round(t, 2) for t in times])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.decode(tok)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
