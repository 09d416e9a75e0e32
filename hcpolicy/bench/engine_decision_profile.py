"""Where a reference-engine HeteroCache decision step's time goes (GPU, diagnostic): the
setting of ``engine_decode``'s part c (Llama-3.1-8B shape, random bf16, batch 1, C = 0.5,
random K/V at --context), one decision step under torch.profiler, and the policy's call
and the bench's query hook timed alone.

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.engine_decision_profile --out $OUT/decision_step_profile.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.bench.engine_decode import RandomWalkQueries, hetero
from hcpolicy.bench.hf_decode import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=229376)
    parser.add_argument("--drift", choices=("random", "realistic"), default="realistic")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = ModelConfig.preset("llama-3.1-8b", max_position=args.context + 1024)
    model = random_model(config, device="cuda", dtype=torch.bfloat16)
    engine = Engine(model, EngineConfig(max_seq_len=args.context + 64))
    if args.drift == "realistic":
        engine.query_hook = RandomWalkQueries(0.05)
    policy = hetero(config.spec(), 0.5)
    engine.prefill_random([args.context], policy, max_new_tokens=48)
    tok = torch.zeros(1, dtype=torch.int64, device="cuda")
    pieces: dict[str, list[float]] = {"decode_layers": [], "query_hook": [], "observations": []}
    original_layers, original_hook = policy.decode_layers, engine.query_hook
    original_obs = engine._observation

    steps = []
    for i in range(30):
        if i == 20:
            policy.decode_layers = timed(pieces, "decode_layers", original_layers)
            engine._observation = timed(pieces, "observations", original_obs)
            if original_hook is not None:
                engine.query_hook = timed(pieces, "query_hook", original_hook)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        due = engine.observer.due(engine.step)
        engine.decode(tok)
        torch.cuda.synchronize()
        steps.append({"ms": (time.perf_counter() - t0) * 1e3, "decision": due})
    policy.decode_layers, engine._observation, engine.query_hook = original_layers, original_obs, original_hook
    while not engine.observer.due(engine.step):
        engine.decode(tok)
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.decode(tok)
        torch.cuda.synchronize()
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    table_cuda = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    print(table_cpu)
    print(table_cuda)
    out = {"context": args.context, "drift": args.drift, "steps": steps, "pieces_ms": pieces,
           "profile_cpu": table_cpu, "profile_cuda": table_cuda}  # fmt: skip
    print(json.dumps({"steps": steps, "pieces_ms": pieces}, indent=0))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
