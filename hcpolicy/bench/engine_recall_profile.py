"""Where the host spends an async recall step and its landing (the engine bench's cell).

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.engine_recall_profile --output $OUT/engine_recall_profile_h200.json

Builds part c's HeteroCache cell of ``engine_decode`` (224K, C = 0.5, realistic drift,
async recalls, device decisions), decodes to the first decision, then profiles each later
step with cProfile and records every host sync torch reports
(``torch.cuda.set_sync_debug_mode('warn')``) with the Python frames that caused it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import traceback
import warnings
from typing import Any

import torch

from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.bench.engine_decode import StepRandomWalk, hetero, warm_up


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--context", type=int, default=229376)
    parser.add_argument("--drift-sigma", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=8, help="steps profiled after the first decision")
    args = parser.parse_args()
    config = ModelConfig.preset("llama-3.1-8b", max_position=args.context + 1024)
    model = random_model(config, device="cuda", dtype=torch.bfloat16)
    warm = argparse.Namespace(drift="realistic", drift_sigma=args.drift_sigma, fused="auto", recall_landing="async",
                              per_step_observations=False, device_decisions="auto", compression=0.5)  # fmt: skip
    warm_up(model, config, warm)  # compiles what the first recall would
    new = args.steps + 16
    engine = Engine(model, EngineConfig(max_seq_len=args.context + new, recall_landing="async"))
    engine.step_query_hook = StepRandomWalk(args.drift_sigma, new + 2, config.num_layers)
    engine.prefill_random([args.context], hetero(config.spec(), 0.5), max_new_tokens=new)
    tok = torch.zeros(1, dtype=torch.int64, device="cuda")
    while not engine.observer.due(engine.step):  # up to the first decision step (graphs captured)
        engine.decode(tok)
    engine.decode(tok)
    torch.cuda.synchronize()
    steps = [profiled_step(engine, tok) for _ in range(args.steps)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
              "steps": steps}  # fmt: skip
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    for s in steps:
        print(f"{s['ms']:.2f} ms recalls {s['recalls']} landed {s['landed']} syncs {sum(s['syncs'].values())}")


if __name__ == "__main__":
    main()
