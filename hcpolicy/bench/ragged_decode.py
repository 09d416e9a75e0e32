"""Ragged decode attention on one CUDA device: the Triton kernel against torch SDPA and the HBM floor.

    python -m hcpolicy.bench.ragged_decode --out ragged_decode.json

B=1, H_kv=8, G=4 (32 query heads), D=128, bf16, at L = 32K, 128K and 224K, two layouts of
the flat ``kv [S, 2, D]`` buffer: ``full`` (all 8 heads keep L rows: the full-KV case) and
``hetero`` (2 full heads, 6 at 0.35 L, as HeteroCache keeps them). Bytes = the kept K+V
rows, each read once. Measured in one process, CUDA events, medians after warm-up, inputs
rotated over several sets (each set is larger than L2 or there are enough of them that
L2 cannot serve reads):
- HBM ceiling: a 2 GiB device-to-device copy, counting bytes read plus bytes written;
- the kernel (``ragged_decode_attention`` with ``max_length`` = L, default config):
  *device* time (queued behind a spin kernel, so host launch work is hidden), *graph*
  (replays of a CUDA graph of one call) and *eager* (GPU idle at the call: host work counted);
- torch SDPA on dense [1, 32, 1, D] x [1, 8, L, D] with enable_gqa (full layout only);
- a sweep of kernel configs (device time), to tune ``DecodeConfig``'s defaults.
Each kernel result is checked against ``ragged_decode_reference`` (fp32, per segment).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from hcpolicy.kernels import DecodeConfig, ragged_decode_attention, ragged_decode_reference

H_KV, GROUP, DIM, DTYPE = 8, 4, 128, torch.bfloat16
LENGTHS = (32 * 1024, 128 * 1024, 224 * 1024)
HETERO_FULL_HEADS, HETERO_FRACTION = (0, 5), 0.35
SPIN_CYCLES = 2_000_000  # ~1 ms at H200 clocks: longer than the host needs to launch one call
SET_BYTES = 1 << 30  # rotate over input sets of at least this much in all (L2 is 50 MB)
SWEEP = {
    "default": DecodeConfig(),
    "stages2": DecodeConfig(num_stages=2),  # one K+V tile in flight per program
    "stages4": DecodeConfig(num_stages=4),  # three
    "n32-s4": DecodeConfig(block_n=32, num_stages=4),
    "n128-w8-s2": DecodeConfig(block_n=128, num_warps=8, num_stages=2, min_chunk=512),
    "pps4-c512": DecodeConfig(programs_per_sm=4, min_chunk=512),
    "pps16": DecodeConfig(programs_per_sm=16),
    "default-again": DecodeConfig(),  # the same config timed twice: the spread is the noise
}
TB = 1e12


def device_time(fn: Callable[[int], None], n_sets: int, reps: int, warmup: int = 3) -> float:
    """Median seconds of ``fn(set)`` on the device: a spin kernel runs ahead of each call, so
    the host has launched the whole call before the GPU reaches it."""
    return _timed(fn, n_sets, reps, warmup, spin=True)


def eager_time(fn: Callable[[int], None], n_sets: int, reps: int, warmup: int = 3) -> float:
    """Median seconds from the call on an idle GPU to the end of its work (host work counted)."""
    return _timed(fn, n_sets, reps, warmup, spin=False)


def _timed(fn: Callable[[int], None], n_sets: int, reps: int, warmup: int, *, spin: bool) -> float:
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if spin:
            torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn(i % n_sets)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes per second of a device-to-device copy, read plus write."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = device_time(lambda _: dst.copy_(src), 1, reps)
    del src, dst
    return 2 * nbytes / seconds


def head_lengths(length: int, layout: str) -> list[int]:
    if layout == "full":
        return [length] * H_KV
    short = round(HETERO_FRACTION * length)
    return [length if h in HETERO_FULL_HEADS else short for h in range(H_KV)]


def make_set(lengths: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One input set: segments packed in head order, each with 256 spare rows of capacity."""
    caps = [n + 256 for n in lengths]
    starts = [sum(caps[:h]) for h in range(H_KV)]
    kv = torch.randn(sum(caps), 2, DIM, device="cuda", dtype=DTYPE, generator=gen)  # [S, 2, D]
    return {
        "q": torch.randn(1, H_KV * GROUP, DIM, device="cuda", dtype=DTYPE, generator=gen),  # [B, H_q, D]
        "kv": kv,
        "starts": torch.tensor([starts], dtype=torch.int64, device="cuda"),  # [B, H_kv]
        "lengths": torch.tensor([lengths], dtype=torch.int64, device="cuda"),
        "out": torch.empty(1, H_KV * GROUP, DIM, device="cuda", dtype=DTYPE),
    }


def measure_layout(length: int, layout: str, hbm: float, reps: int, gen: torch.Generator) -> dict:
    lengths = head_lengths(length, layout)
    nbytes = sum(lengths) * 2 * DIM * DTYPE.itemsize  # kept K + V, read once
    n_sets = max(3, min(8, -(-SET_BYTES // nbytes)))
    sets = [make_set(lengths, gen) for _ in range(n_sets)]
    scale = DIM**-0.5

    def kernel(config: DecodeConfig) -> Callable[[int], None]:
        def call(i: int) -> None:
            s = sets[i]
            ragged_decode_attention(s["q"], s["kv"], s["starts"], s["lengths"], scale, max_length=length,
                                    out=s["out"], config=config)  # fmt: skip

        return call

    s = sets[0]
    ref = ragged_decode_reference(s["q"], s["kv"], s["starts"], s["lengths"], scale).float()  # [1, H_q, D]
    sweep = {}
    for name, config in SWEEP.items():
        t = device_time(kernel(config), n_sets, reps)
        kernel(config)(0)
        err = float((s["out"].float() - ref).norm() / ref.norm())
        sweep[name] = {"device_s": t, "tb_s": nbytes / t / TB, "rel_err_vs_reference": err}
    default = sweep["default"]
    row = {
        "L": length, "layout": layout, "head_lengths": lengths, "bytes": nbytes, "input_sets": n_sets,
        "floor_s": nbytes / hbm, "kernel_device_s": default["device_s"], "kernel_tb_s": default["tb_s"],
        "fraction_of_copy_bw": nbytes / default["device_s"] / hbm,
        "rel_err_vs_reference": default["rel_err_vs_reference"],
        "kernel_graph_s": graph_time(sets, length, scale, reps),
        "kernel_eager_s": eager_time(kernel(SWEEP["default"]), n_sets, reps),
        "sweep": sweep,
    }  # fmt: skip
    best = min(sweep, key=lambda k: sweep[k]["device_s"])
    row["best_config"], row["best_device_s"] = best, sweep[best]["device_s"]
    del sets
    if layout == "full":
        row.update(measure_sdpa(length, nbytes, reps, gen))
    torch.cuda.empty_cache()
    return row


def graph_time(sets: list[dict], length: int, scale: float, reps: int) -> float:
    """Median seconds of replaying a CUDA graph of one call, one graph per input set."""
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for s in sets:
        args = (s["q"], s["kv"], s["starts"], s["lengths"], scale)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ragged_decode_attention(*args, max_length=length, out=s["out"])  # compiled before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            ragged_decode_attention(*args, max_length=length, out=s["out"])
        graphs.append(graph)
    t = device_time(lambda i: graphs[i].replay(), len(sets), reps)
    del graphs
    return t


def measure_sdpa(length: int, nbytes: int, reps: int, gen: torch.Generator) -> dict:
    """Dense [1, 32, 1, D] x [1, 8, L, D] SDPA with enable_gqa over rotated K/V sets."""
    n_sets = max(3, min(8, -(-SET_BYTES // nbytes)))
    q = torch.randn(1, H_KV * GROUP, 1, DIM, device="cuda", dtype=DTYPE, generator=gen)
    kvs = [
        tuple(torch.randn(1, H_KV, length, DIM, device="cuda", dtype=DTYPE, generator=gen) for _ in range(2))
        for _ in range(n_sets)
    ]
    t = device_time(lambda i: F.scaled_dot_product_attention(q, *kvs[i], enable_gqa=True), n_sets, reps)
    del kvs
    return {"sdpa_device_s": t, "sdpa_tb_s": nbytes / t / TB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    torch.cuda.set_device(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    hbm = copy_bandwidth(1 << 31, args.reps)
    print(f"HBM device-to-device copy: {hbm / TB:.2f} TB/s (read + write)", flush=True)
    rows = []
    for length in LENGTHS:
        for layout in ("full", "hetero"):
            rows.append(measure_layout(length, layout, hbm, args.reps, gen))
            print(f"L={length} {layout}: {rows[-1]['kernel_device_s'] * 1e6:.1f} us", flush=True)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": importlib.metadata.version("triton"), "python": sys.version.split()[0],
        "command": " ".join(["python -m hcpolicy.bench.ragged_decode", *(argv if argv is not None else sys.argv[1:])]),
        "shape": {"B": 1, "H_kv": H_KV, "G": GROUP, "D": DIM, "dtype": str(DTYPE)},
        "hbm_copy_bytes_per_s": hbm, "sweep_configs": {k: str(v) for k, v in SWEEP.items()}, "rows": rows,
    }  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    hbm = r["hbm_copy_bytes_per_s"] / TB
    print(f"\n{r['device']}  torch {r['torch']}  triton {r['triton']}  HBM copy {hbm:.2f} TB/s (read + write)")
    print("B=1 H_kv=8 G=4 D=128 bf16; us = median device time; TB/s = kept K+V bytes / time")
    print(f"{'L':>7} {'layout':>7} {'MB':>6} {'floor':>6} {'kernel':>7} {'TB/s':>5} {'%copy':>5} {'graph':>7} "
          f"{'eager':>7} {'sdpa':>7} {'TB/s':>5} {'best config':>13} {'us':>7} {'err':>8}")  # fmt: skip
    for row in r["rows"]:
        sdpa = row.get("sdpa_device_s")
        print(
            f"{row['L']:>7} {row['layout']:>7} {row['bytes'] / 1e6:>6.0f} {row['floor_s'] * 1e6:>6.1f} "
            f"{row['kernel_device_s'] * 1e6:>7.1f} {row['kernel_tb_s']:>5.2f} {100 * row['fraction_of_copy_bw']:>5.0f} "
            f"{row['kernel_graph_s'] * 1e6:>7.1f} {row['kernel_eager_s'] * 1e6:>7.1f} "
            f"{sdpa * 1e6 if sdpa else float('nan'):>7.1f} {row.get('sdpa_tb_s', float('nan')):>5.2f} "
            f"{row['best_config']:>13} {row['best_device_s'] * 1e6:>7.1f} {row['rel_err_vs_reference']:>8.1e}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
