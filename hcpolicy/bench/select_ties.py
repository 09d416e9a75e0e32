"""The radix select (``kernels.select``) on rows with many equal values, before and after
its sparse passes fell back to block histograms for such rows.

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.select_ties --output $OUT/select_ties_h200.json

R = 160 rows of L = 224K float32 (a decision window's pooled scores: 5 steps x 32 pivots),
three kinds: probabilities (softmax of scaled normals), mostly zeros (1000 random positive
values a row, the rest 0.0: what a very peaked attention leaves after float32 underflow),
and constant rows. For each, ``kth_largest_triton`` with ``sparse_limit`` at its default
and at 2^31 - 1 (every sparse pass one atomic per element: the earlier behaviour): median
ms of 20 launches after 3 (CUDA events), and both results checked against torch.topk.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from hcpolicy.bench.recall import timed
from hcpolicy.kernels._select_triton import SPARSE_LIMIT, kth_largest_triton

ROWS, LENGTH = 160, 224 * 1024


def rows(kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "probabilities":
        return torch.softmax(4 * torch.randn(ROWS, LENGTH, generator=gen, device="cuda"), dim=1)
    if kind == "mostly_zeros":
        x = torch.zeros(ROWS, LENGTH, device="cuda")
        at = torch.randint(0, LENGTH, (ROWS, 1000), generator=gen, device="cuda")
        return x.scatter_(1, at, torch.rand(ROWS, 1000, generator=gen, device="cuda"))
    if kind == "constant":
        return torch.full((ROWS, LENGTH), 1.0 / LENGTH, device="cuda")
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS,
                           "length": LENGTH, "sparse_limit": SPARSE_LIMIT, "cases": []}  # fmt: skip
    for kind in ("probabilities", "mostly_zeros", "constant"):
        x = rows(kind, gen)
        for k in (2048, 16384):
            expected = torch.topk(x, k, dim=1).values[:, -1]
            row = {"kind": kind, "k": k}
            for name, limit in (("default", SPARSE_LIMIT), ("atomics_only", 2**31 - 1)):
                got = kth_largest_triton(x, k, sparse_limit=limit)
                row[f"{name}_equal_topk"] = bool(torch.equal(got.values, expected))
                row[f"{name}_ms"] = timed(lambda: kth_largest_triton(x, k, sparse_limit=limit), 20, warmup=3) * 1e3
            out["cases"].append(row)
            print(json.dumps(row), flush=True)
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
