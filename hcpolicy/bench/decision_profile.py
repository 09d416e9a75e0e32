"""Where a HeteroCache decision step's GPU time goes (diagnostic): the pieces of scoring one
window of W queries for P pivots over L prompt keys, each timed alone with CUDA events.

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.decision_profile --out $OUT/decision_profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hcpolicy.observe import LayerCache
from hcpolicy.scores import attention_weights, group_reduce, overlap, pool1d, topk_sets


def timeit(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median ms of ``fn`` over ``reps`` runs (CUDA events) after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=229376)
    parser.add_argument("--pivots", type=int, default=8)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--k-fraction", type=float, default=0.379)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    p, w, length, g, d = args.pivots, args.window, args.context, 4, 128
    k = int(args.k_fraction * length)
    dev = "cuda"
    keys = torch.randn(p, 1, length, d, device=dev, dtype=torch.bfloat16)
    q = torch.randn(p, g, w, d, device=dev, dtype=torch.bfloat16)
    positions = torch.arange(length, device=dev).expand(p, 1, length).contiguous()
    lengths = torch.full((p, 1), length, device=dev)
    cache = LayerCache(keys=keys, positions=positions, lengths=lengths)
    last = torch.full((w,), length, device=dev)
    out: dict[str, float] = {}
    out["keys_float"] = timeit(lambda: keys.float())
    weights = attention_weights(q, last, cache)
    out["attention_weights"] = timeit(lambda: attention_weights(q, last, cache))
    reduced = group_reduce(weights, 1, "max")[:, 0]
    out["group_reduce"] = timeit(lambda: group_reduce(weights, 1, "max"))
    scores = pool1d(reduced, 5)
    out["pool1d"] = timeit(lambda: pool1d(reduced, 5))
    out["topk_sets"] = timeit(lambda: topk_sets(scores, k))
    out["topk_sorted"] = timeit(lambda: torch.topk(scores, k, dim=-1, sorted=True))
    out["sort"] = timeit(lambda: torch.sort(scores, dim=-1, descending=True))
    out["kthvalue"] = timeit(lambda: torch.kthvalue(scores, length - k + 1, dim=-1))
    flat = scores.reshape(-1, length)
    out["topk_per_row_loop"] = timeit(lambda: [torch.topk(flat[i], k, sorted=False) for i in range(flat.shape[0])])
    sets = topk_sets(scores, k)
    ref = sets[:, 0]
    out["overlap"] = timeit(lambda: overlap(sets, ref.unsqueeze(1), length))
    thr = torch.kthvalue(scores, length - k + 1, dim=-1).values
    out["threshold_mask"] = timeit(lambda: scores >= thr.unsqueeze(-1))
    result = {"context": length, "pivots": p, "window": w, "k": k, "ms": out}
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
