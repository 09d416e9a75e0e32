"""Where HeteroCache's extra prefill time goes in the reference engine (GPU, diagnostic):
Llama-3.1-8B shape, random bf16 weights, one 32K prompt of random ids, full vs HeteroCache
C = 0.5; the compress phase's pieces timed with host syncs around each.

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.engine_prefill_profile
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from typing import Any

import torch

from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.backends.torch_engine import executor as executor_mod
from hcpolicy.backends.torch_engine.prefill import Prefill
from hcpolicy.bench.hf_decode import llama_like_profile, timed
from hcpolicy.policy.heterocache import HeteroCachePolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=32768)
    args = parser.parse_args()
    config = ModelConfig.preset("llama-3.1-8b", max_position=args.context + 1024)
    model = random_model(config, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, args.context), device="cuda")
    out: dict[str, Any] = {}
    for name in ("full", "full", "heterocache", "heterocache"):
        policy = HeteroCachePolicy(profile=llama_like_profile(config.spec()), compression=0.5) if name != "full" else None
        engine = Engine(model, EngineConfig(max_seq_len=args.context + 8, prefill_chunk=8192))
        pieces: dict[str, list[float]] = collections.defaultdict(list)
        originals = {}
        if policy is not None:
            for cls, meth in ((executor_mod.PagedExecutor, "offload"), (executor_mod.PagedExecutor, "select"),
                              (Prefill, "_compress")):
                originals[(cls, meth)] = getattr(cls, meth)
                setattr(cls, meth, timed(pieces, meth, originals[(cls, meth)]))
            policy.prefill = timed(pieces, "policy.prefill", policy.prefill)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.prefill(ids, policy, max_new_tokens=8)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        for (cls, meth), fn in originals.items():
            setattr(cls, meth, fn)
        out.setdefault(name, []).append({"seconds": total, "pieces_ms": {k: sum(v) for k, v in pieces.items()}})
        print(name, round(total, 3), {k: round(sum(v), 1) for k, v in pieces.items()}, flush=True)
        engine.release()
        del engine
    print(json.dumps(out))


if __name__ == "__main__":
    main()
