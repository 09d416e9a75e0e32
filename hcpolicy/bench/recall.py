"""Recall bandwidth and overlap of the transfer runtime, measured on one CUDA device.

    python -m hcpolicy.bench.recall --out recall.json

Measures, in one process, with CUDA events, after warm-up, medians:
1. pinned H2D (and D2H) bandwidth of one large copy: the ceiling;
2. recalling ``--pages`` random 16-token pages (a page = 16 rows of one KV head, a row =
   K+V at head_dim 128 in bf16 = 512 B) from a host store, in every recall mode, for two
   store layouts: one block holding every row, and one block per (layer, KV head) served
   by one ``recall_many``; with the row indices on the host and, for the zero-copy path,
   already on the device (as backends hand them over); each is checked byte-exact;
3. a sweep of triton gather settings (programs, warps, tile, stream priority);
4. overlap, plain: ~30 ms of bf16 matmuls on the default stream and ONE recall issued from
   a side stream right after them; harsh: back-to-back recalls as long as the matmuls.
   together / max(alone) should stay near 1.
Each recall is timed twice: from the host call on an idle GPU (host preparation counted)
and queued behind ~5 ms of matmuls (device time only).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
from typing import Callable

import attrs
import torch

from hcpolicy.runtime import RECALL_MODES, TransferRuntime

PAGE, ROW_SHAPE, DTYPE = 16, (2, 128), torch.bfloat16
ROWBYTES = 2 * 128 * 2
GB = 1e9


def timed(fn: Callable[[], None], reps: int, warmup: int = 2, queued: bool = False) -> float:
    """Median seconds from ``fn``'s call to the end of its work on the current stream.

    queued=False: the GPU is idle at the call, so host-side preparation counts.
    queued=True: the call is made while ~5 ms of matmuls run ahead of it on the current
    stream, as in a serving loop where the host runs ahead; the timer starts when they
    end, so what is measured is device time only.
    """
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) if queued else None
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if a is not None:
            for _ in range(25):  # ~5 ms at ~700 TFLOP/s
                torch.matmul(a, a)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def host_time(fn: Callable[[], None], reps: int) -> float:
    """Median seconds the host spends inside ``fn`` (its work then completes)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times)


def copy_bandwidth(nbytes: int, reps: int) -> dict[str, float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = timed(lambda: dev.copy_(host, non_blocking=True), reps)
    d2h = timed(lambda: host.copy_(dev, non_blocking=True), reps)
    return {"bytes": nbytes, "h2d_gbps": nbytes / h2d / GB, "d2h_gbps": nbytes / d2h / GB}


def random_rows(total_rows: int, gen: torch.Generator) -> torch.Tensor:
    """[total_rows, 2, 128] bf16 of random bits, on the GPU."""
    bits = torch.randint(-(2**15), 2**15, (total_rows, *ROW_SHAPE), dtype=torch.int16, device="cuda", generator=gen)
    return bits.view(DTYPE)


class Layout:
    """A store layout and one fixed random page selection, as recall requests."""

    def __init__(self, name: str, rt: TransferRuntime, blocks: int, rows_per_block: int, pages: int, seed: int):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.name, self.src = name, {}
        for b in range(blocks):
            self.src[(name, b)] = random_rows(rows_per_block, gen)
            rt.offload((name, b), self.src[(name, b)])
        rt.synchronize()
        cpu_gen = torch.Generator().manual_seed(seed)
        picks = torch.randperm(blocks * (rows_per_block // PAGE), generator=cpu_gen)[:pages]  # global pages
        per_block = rows_per_block // PAGE
        self.requests = []
        for b in range(blocks):
            mine = picks[picks // per_block == b] % per_block  # pages of block b, random order
            if mine.numel():
                rows = (mine[:, None] * PAGE + torch.arange(PAGE)).flatten()  # [n]
                out = torch.empty(rows.numel(), *ROW_SHAPE, dtype=DTYPE, device="cuda")
                self.requests.append(((name, b), rows, out))
        # The same requests with the rows already on the device (same outs).
        self.device_requests = [(key, rows.cuda(), out) for key, rows, out in self.requests]
        self.nbytes = pages * PAGE * ROWBYTES

    def batch(self, rows: str) -> list:
        return self.device_requests if rows == "device" else self.requests

    def exact(self) -> bool:
        torch.cuda.synchronize()
        return all(
            torch.equal(out.view(torch.int16), self.src[key][rows.cuda()].view(torch.int16))
            for key, rows, out in self.requests
        )

    def clear(self) -> None:
        for _, _, out in self.requests:
            out.zero_()


@attrs.frozen
class Variant:
    """A recall mode, runtime attributes set for it, and where the row indices live."""

    mode: str
    attributes: dict = attrs.field(factory=dict)
    rows: str = "host"  # 'host' (CPU tensors) or 'device' (already on the GPU)


VARIANTS: dict[str, Variant] = {
    "zero_copy": Variant("zero_copy"),  # the default: triton gather, default settings
    # Device rows as a hot path hands them over: unchecked (a range check syncs the host).
    "zero_copy/device-rows": Variant("zero_copy", {"check_device_rows": False}, "device"),
    "zero_copy/device-rows-checked": Variant("zero_copy", {"check_device_rows": True}, "device"),
    "zero_copy-torch": Variant("zero_copy", {"gather_kernel": "torch"}),
    "staged": Variant("staged"),
    "direct": Variant("direct"),
}
# Triton gather settings, one_block, host rows.
NARROW = {"gather_ctas": 264, "gather_warps": 1, "gather_tile_words": 256}
SHORT = {"gather_ctas": 1 << 20, "gather_warps": 4, "gather_tile_words": 2048}
SWEEP: dict[str, Variant] = {
    **{f"zero_copy-ctas{c}": Variant("zero_copy", {"gather_ctas": c}) for c in (4, 8, 32)},
    "zero_copy-normal-priority": Variant("zero_copy", {"recall_priority": "normal"}),
    "zero_copy-narrow": Variant("zero_copy", NARROW),
    "zero_copy-narrow-normal-priority": Variant("zero_copy", {**NARROW, "recall_priority": "normal"}),
    "zero_copy-short-lived-normal-priority": Variant("zero_copy", {**SHORT, "recall_priority": "normal"}),
}
HARSH = ("zero_copy", "zero_copy-normal-priority", "zero_copy-ctas8", "zero_copy-narrow",
         "zero_copy-narrow-normal-priority", "zero_copy-short-lived-normal-priority", "zero_copy-torch", "staged")
PLAIN = ("zero_copy", "zero_copy/device-rows", "zero_copy-normal-priority", "staged")


def configured(rt: TransferRuntime, attributes: dict) -> dict:
    """Apply runtime attributes; returns the previous values to restore."""
    previous = {k: getattr(rt, k) for k in attributes}
    for k, v in attributes.items():
        setattr(rt, k, v)
    return previous


def measure_variants(rt: TransferRuntime, layout: Layout, variants: dict[str, Variant], h2d_gbps: float,
                     reps: int) -> dict:
    results: dict[str, dict] = {}
    for name, variant in variants.items():
        previous = configured(rt, variant.attributes)
        try:
            results[name] = measure_mode(rt, layout, variant, h2d_gbps, reps)
        except Exception as exc:  # keep measuring the others; the JSON says what failed
            torch.cuda.synchronize()
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "byte_exact": False}
            print(f"  {layout.name:>10} {name:>38}: FAILED {results[name]['error']}", flush=True)
            continue
        finally:
            configured(rt, previous)
        m = results[name]
        print(f"  {layout.name:>10} {name:>38}: idle {m['idle_ms']:7.2f} ms {m['idle_gbps']:5.1f} GB/s "
              f"({m['idle_ratio']:.2f}) | queued {m['queued_ms']:7.2f} ms {m['queued_gbps']:5.1f} GB/s "
              f"({m['queued_ratio']:.2f}) | host {m['host_ms']:.3f} ms exact={m['byte_exact']}", flush=True)
    return results


def measure_mode(rt: TransferRuntime, layout: Layout, variant: Variant, h2d_gbps: float, reps: int) -> dict:
    layout.clear()
    before = rt.counters()
    batch, mode = layout.batch(variant.rows), variant.mode

    def recall() -> None:
        rt.wait(rt.recall_many(batch, mode=mode))  # type: ignore[arg-type]

    reps = reps if mode != "direct" else max(3, reps // 3)
    idle, queued, host = timed(recall, reps), timed(recall, reps, queued=True), host_time(recall, reps)
    after = rt.counters()
    calls = (after.recalls - before.recalls) // len(batch)
    zero_copy = mode == "zero_copy"
    result = {
        "mode": mode, "rows": variant.rows, **variant.attributes,
        "gather_kernel": rt.gather_kernel if zero_copy else None,
        "gather_ctas": rt.gather_ctas if zero_copy else None,
        "requests": len(batch),
        "byte_exact": layout.exact(),
        "host_ms": host * 1e3,
        "dma_copies_per_recall": (after.h2d_copies - before.h2d_copies) / calls,
        "gathers_per_recall": (after.gathers - before.gathers) / calls,
    }
    for label, seconds in (("idle", idle), ("queued", queued)):
        gbps = layout.nbytes / seconds / GB
        result.update({f"{label}_ms": seconds * 1e3, f"{label}_gbps": gbps, f"{label}_ratio": gbps / h2d_gbps})
    return result


def matmul_operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return a, torch.randn_like(a), torch.empty_like(a)


def measure_overlap(rt: TransferRuntime, layout: Layout, variant: Variant, per_recall_s: float,
                    target_s: float, reps: int, plain: bool = False) -> dict:
    """Matmuls on the default stream alone, recalls (issued from a side stream) alone, and
    both at once; ``ratio`` = together / max(alone). plain: ONE recall, issued right after
    the matmuls are enqueued; else (harsh) back-to-back recalls that last as long as the
    matmuls."""
    previous = configured(rt, variant.attributes)
    a, b, c = matmul_operands()
    one = timed(lambda: torch.matmul(a, b, out=c), reps)
    n_mm = max(1, round(target_s / one))
    n_rc = 1 if plain else max(1, round(target_s / per_recall_s))
    issuer, main = torch.cuda.Stream(), torch.cuda.current_stream()
    batch, mode = layout.batch(variant.rows), variant.mode

    def compute() -> None:
        for _ in range(n_mm):
            torch.matmul(a, b, out=c)

    def copies() -> None:
        # From a side stream, so the recalls do not queue behind the matmuls (a recall is
        # ordered after the work already queued on the stream that issues it).
        with torch.cuda.stream(issuer):
            transfers = [rt.recall_many(batch, mode=mode) for _ in range(n_rc)]  # type: ignore[arg-type]
        for t in transfers:
            rt.wait(t, main)

    def both() -> None:
        compute()
        copies()

    try:
        layout.clear()
        t_compute, t_copy, t_both = timed(compute, reps), timed(copies, reps), timed(both, reps)
        exact = layout.exact()
    finally:
        configured(rt, previous)
    return {
        "mode": mode, "rows": variant.rows, **variant.attributes, "matmuls": n_mm, "recalls": n_rc,
        "recall_bytes": n_rc * layout.nbytes,
        "compute_ms": t_compute * 1e3, "copy_ms": t_copy * 1e3, "together_ms": t_both * 1e3,
        "ratio": t_both / max(t_compute, t_copy), "byte_exact": exact,
        "matmul_tflops": 2 * 8192**3 / one / 1e12,
    }


def overlaps(rt: TransferRuntime, layout: Layout, names: tuple[str, ...], measured: dict, target_s: float,
             reps: int, plain: bool) -> dict:
    results = {}
    for name in names:
        variant = VARIANTS.get(name) or SWEEP[name]
        try:
            per_recall = measured[name]["queued_ms"] / 1e3
            results[name] = measure_overlap(rt, layout, variant, per_recall, target_s, reps, plain)
        except Exception as exc:
            torch.cuda.synchronize()
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "ratio": float("nan"), "byte_exact": False}
        o = results[name]
        label = "plain" if plain else "harsh"
        if "error" in o:
            print(f"  overlap {label} {name}: FAILED {o['error']}", flush=True)
        else:
            print(f"  overlap {label} {name:>38}: compute {o['compute_ms']:.2f} copy {o['copy_ms']:.2f} "
                  f"together {o['together_ms']:.2f} ms -> {o['ratio']:.3f}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--store-gib", type=float, default=2.0, help="host store size per layout")
    parser.add_argument("--pages", type=int, default=8192, help="16-row pages per recall")
    parser.add_argument("--heads", type=int, default=256, help="blocks in the per-head layout")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--overlap-ms", type=float, default=30.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2

    torch.cuda.set_device(0)
    ceiling = copy_bandwidth(1 << 30, args.reps)
    h2d = ceiling["h2d_gbps"]
    print(f"pinned H2D {h2d:.1f} GB/s, D2H {ceiling['d2h_gbps']:.1f} GB/s", flush=True)
    rt = TransferRuntime("cuda")
    print(f"default: {rt.recall_mode}, gather kernel {rt.gather_kernel}, {rt.gather_ctas} CTAs x "
          f"{rt.gather_warps} warps, tile {rt.gather_tile_words} words, {rt.recall_priority} priority", flush=True)
    total_rows = int(args.store_gib * (1 << 30)) // ROWBYTES
    layouts = [
        Layout("one_block", rt, 1, total_rows, args.pages, seed=1),
        Layout("per_head", rt, args.heads, total_rows // args.heads, args.pages, seed=2),
    ]
    recall = {lay.name: measure_variants(rt, lay, VARIANTS, h2d, args.reps) for lay in layouts}
    sweep = measure_variants(rt, layouts[0], SWEEP, h2d, args.reps)
    measured = {**recall["one_block"], **sweep}
    target, overlap_reps = args.overlap_ms / 1e3, max(3, args.reps // 2)
    plain = overlaps(rt, layouts[0], PLAIN, measured, target, overlap_reps, plain=True)
    harsh = overlaps(rt, layouts[0], HARSH, measured, target, overlap_reps, plain=False)
    nbytes = layouts[0].nbytes

    def ratios(layout: str, variant: str) -> dict:
        m = recall[layout][variant]
        return {"queued_ratio": m.get("queued_ratio"), "idle_ratio": m.get("idle_ratio"),
                "ok_queued": m.get("queued_ratio", 0) >= 0.80, "ok_idle": m.get("idle_ratio", 0) >= 0.80}

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": importlib.metadata.version("triton") if importlib.util.find_spec("triton") else None,
        "command": " ".join(["python -m hcpolicy.bench.recall", *(argv if argv is not None else sys.argv[1:])]),
        "config": {**vars(args), "page_rows": PAGE, "row_bytes": ROWBYTES, "recall_bytes": nbytes,
                   "default_mode": rt.recall_mode, "gather_kernel": rt.gather_kernel,
                   "gather_ctas": rt.gather_ctas, "gather_warps": rt.gather_warps,
                   "gather_tile_words": rt.gather_tile_words, "recall_priority": rt.recall_priority,
                   "torch_threads": torch.get_num_threads()},
        "copy": ceiling,
        "floor_ms": nbytes / (h2d * GB) * 1e3,
        "recall": recall,
        "gather_sweep": sweep,
        "overlap_plain": plain,
        "overlap_harsh": harsh,
        "acceptance": {
            "A_host_rows": {lay: ratios(lay, "zero_copy") for lay in recall},
            "A_device_rows": {lay: ratios(lay, "zero_copy/device-rows") for lay in recall},
            "B_plain_ratio": plain["zero_copy"]["ratio"],
            "B_plain_ok": plain["zero_copy"]["ratio"] <= 1.10,
            "B_harsh_ratio": harsh["zero_copy"]["ratio"],
            "B_harsh_ok": harsh["zero_copy"]["ratio"] <= 1.10,
            "all_exact": all(m["byte_exact"] for group in (*recall.values(), sweep, plain, harsh)
                             for m in group.values()),
        },
        "counters": attrs.asdict(rt.counters()),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    print(f"\n{r['device']}  torch {r['torch']}  recall {r['config']['recall_bytes'] >> 20} MiB "
          f"as {r['config']['pages']} pages of {PAGE * ROWBYTES >> 10} KiB")
    print(f"pinned H2D {r['copy']['h2d_gbps']:.1f} GB/s  floor {r['floor_ms']:.2f} ms  "
          f"(idle: GPU idle at the call, host work counted; queued: device time only)")
    print(f"{'layout':>10} {'variant':>38} {'idle ms':>8} {'GB/s':>6} {'ratio':>6} {'queued ms':>9} {'GB/s':>6} "
          f"{'ratio':>6} {'host ms':>7} {'exact':>6}")
    rows = [(lay, v, m) for lay, variants in r["recall"].items() for v, m in variants.items()]
    rows += [("one_block", v, m) for v, m in r["gather_sweep"].items()]
    for lay, v, m in rows:
        if "error" in m:
            print(f"{lay:>10} {v:>38} FAILED: {m['error']}")
            continue
        print(f"{lay:>10} {v:>38} {m['idle_ms']:8.2f} {m['idle_gbps']:6.1f} {m['idle_ratio']:6.2f} "
              f"{m['queued_ms']:9.2f} {m['queued_gbps']:6.1f} {m['queued_ratio']:6.2f} {m['host_ms']:7.3f} "
              f"{str(m['byte_exact']):>6}")
    for label in ("plain", "harsh"):
        for name, o in r[f"overlap_{label}"].items():
            if "error" in o:
                print(f"overlap {label} {name}: FAILED {o['error']}")
                continue
            print(f"overlap {label} {name:>38}: compute {o['compute_ms']:.2f} ms, {o['recalls']} recalls "
                  f"{o['copy_ms']:.2f} ms, together {o['together_ms']:.2f} ms -> {o['ratio']:.3f}")
    print("acceptance:", json.dumps(r["acceptance"]))


if __name__ == "__main__":
    raise SystemExit(main())
