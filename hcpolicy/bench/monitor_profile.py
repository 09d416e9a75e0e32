"""The device-side decision step's pieces at the engine bench's shape (CUDA only).

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.monitor_profile --output $OUT/monitor_profile_h200.json

Window W = 5 queries x P = 32 pivots x G = 4 query heads over L = 224K prompt keys (batch
1, Llama-3.1-8B shape with one pivot per layer): random base-2 logits stand in for the
decode kernel's tap. Times (CUDA events, median of --reps) each piece of
``DeviceMonitor.decide`` and the whole of it captured as a graph, against its floor: the
bytes it must move (read the logits once, write and re-read the pooled scores per pass)
over the HBM bandwidth measured in the same run. Also ``torch.topk`` for the select.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hcpolicy.backends.torch_engine.bench import bandwidth
from hcpolicy.bench.decision_profile import timeit
from hcpolicy.drift import WindowedOverlap
from hcpolicy.kernels.select import kth_largest
from hcpolicy.kernels.window_scores import window_scores
from hcpolicy.monitor import window_overlaps


def timed(fn, reps: int) -> float:
    return timeit(fn, reps, warmup=2)


def tap_cost(n: int, reps: int) -> dict[str, float]:
    """One layer's decode kernel (8 KV heads x n entries, G = 4, bf16) without and with a
    tap on head 0: what the tap adds to every decode step, per layer."""
    from hcpolicy.kernels._paged_decode_triton import paged_decode_triton
    from hcpolicy.kernels.paged_decode import Tap
    from hcpolicy.kernels._ragged_decode_triton import block_d_of, tiling
    from hcpolicy.kernels.ragged_decode import DecodeConfig

    page, h, g, d = 64, 8, 4, 128
    pages = h * n // page
    kv = torch.randn(pages * page, 2, d, device="cuda", dtype=torch.bfloat16)  # the engine's pool layout
    k, v = kv[:, 0], kv[:, 1]  # [R, D] each, row stride 2D
    table = torch.arange(pages, device="cuda").view(1, h, -1)
    lengths = torch.full((1, h), n, device="cuda")
    q = torch.randn(1, h * g, d, device="cuda", dtype=torch.bfloat16)
    config = DecodeConfig()
    tile = tiling(config, block_d_of(d), 2)[0]
    prompt = n - 64
    tap = Tap(heads=torch.tensor([0] + [-1] * (h - 1), dtype=torch.int32, device="cuda"), pairs=((0, 0),),
              logits=torch.empty(1, 1, 1, g, prompt, device="cuda"),
              stats=torch.empty(1, 1, 1, g, -(-prompt // tile), 2, device="cuda"),
              slot=torch.zeros(1, dtype=torch.int64, device="cuda"), prompt=prompt, tile=tile)  # fmt: skip
    plain = timed(lambda: paged_decode_triton(q, k, v, table, lengths, page, d**-0.5, n, config), reps)
    tapped = timed(lambda: paged_decode_triton(q, k, v, table, lengths, page, d**-0.5, n, config, tap=tap), reps)
    return {"plain_ms": plain, "tapped_ms": tapped, "ratio": tapped / plain, "entries": n}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--length", type=int, default=229376)
    parser.add_argument("--pivots", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    w, p, b, g, n = 5, args.pivots, 1, 4, args.length
    k = round(0.379 * n)  # HeteroCache's monitor k at C = 0.5 for the Llama-like profile
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(w * p * b, g, n, device="cuda", generator=gen) * 3
    tile = 64
    tiles = logits.unflatten(-1, (n // tile, tile))
    top = tiles.amax(-1)
    stats = torch.stack([top, torch.exp2(tiles - top[..., None]).sum(-1)], -1).contiguous()
    scores = torch.empty(w * p * b, n, device="cuda")
    masks = torch.rand(p, b, n, device="cuda", generator=gen) < 0.379
    trigger = WindowedOverlap()
    thresholds, ties = kth_largest(scores, k)

    def decide() -> None:  # as DeviceMonitor.decide
        hist = torch.zeros(w * p * b, 256, dtype=torch.int32, device="cuda")
        window_scores(logits, stats, "max", 5, out=scores, top_histogram=hist)
        t, c = kth_largest(scores, k, top_histogram=hist)
        trigger.fire(window_overlaps(scores.view(w, p, b, n), t.view(w, p, b), c.view(w, p, b), masks, k))

    bw = bandwidth(torch.device("cuda"), 2 << 30)
    out = {"shape": {"W": w, "P": p, "B": b, "G": g, "L": n, "k": k}, "hbm_gbps": bw / 1e9}
    out["window_scores_ms"] = timed(lambda: window_scores(logits, stats, "max", 5, out=scores), args.reps)
    out["kth_largest_ms"] = timed(lambda: kth_largest(scores, k), args.reps)
    out["topk_values_ms"] = timed(lambda: torch.topk(scores, k, dim=-1, sorted=False).values, args.reps)
    sv = scores.view(w, p, b, n)
    out["overlaps_ms"] = timed(lambda: window_overlaps(sv, thresholds.view(w, p, b), ties.view(w, p, b), masks, k),
                               args.reps)  # fmt: skip
    graph = torch.cuda.CUDAGraph()
    decide()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        decide()
    out["decide_graph_ms"] = timed(graph.replay, args.reps)
    # floor: logits read once; scores written once and read by 4 select passes and the overlap
    moved = logits.numel() * 4 + scores.numel() * 4 * 6 + masks.numel() * 1
    out["floor_bytes"] = moved
    out["floor_ms"] = moved / bw * 1e3
    out["tap"] = tap_cost(n, args.reps)
    from hcpolicy.kernels._window_scores_triton import window_scores_triton
    from hcpolicy.kernels.window_scores import softmax_sums

    top, total = softmax_sums(stats)
    shift = (top + torch.log2(total)).contiguous()
    want = scores.clone()
    sweep = {}
    for two_pass in (False, True):
        for block in (512, 1024, 2048, 4096):
            for warps in (4, 8):
                name = f"{'two' if two_pass else 'one'}_pass_b{block}_w{warps}"
                sweep[name] = timed(lambda: window_scores_triton(logits, shift, 0, 5, scores, block, warps, two_pass),
                                    args.reps)  # fmt: skip
                sweep[name + "_maxerr"] = float(((scores - want).abs() / want).max())
    out["window_scores_sweep"] = sweep
    from hcpolicy.kernels._select_triton import kth_largest_triton

    out["kth_sweep"] = {f"b{block}_w{warps}": timed(lambda: kth_largest_triton(scores, k, block, warps), args.reps)
                        for block in (2048, 4096, 8192, 16384) for warps in (4, 8, 16)}  # fmt: skip
    ref = torch.topk(scores, k, dim=-1).values[:, -1]
    out["select_equal_topk"] = bool(torch.equal(kth_largest(scores, k).values, ref))
    print(json.dumps(out, indent=1))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
