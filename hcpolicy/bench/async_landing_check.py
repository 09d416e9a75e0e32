"""Checks around async landings while ``engine_decode`` runs (a debugging aid, CUDA only).

    PYTHONPATH=$PWD python3 -m hcpolicy.bench.async_landing_check [--keep-plans] -- \\
        --parts a,c --drift random --recall-landing async --steps 20 --long-context 16384 --output $OUT/check.json

Wraps ``AsyncRecalls`` without a host sync: before each plan the pool's smallest position
is copied to pinned memory (it must not be negative), and each landing's tail copy
computes its row indices, copies how many fall outside the pool (and their range) to
pinned memory, and sends those rows to the trash page instead of faulting. Every landing
first checks the copies whose events completed and raises AssertionError naming what was
out of range. ``--keep-plans`` keeps every plan's outputs alive for the whole run (no
block of a plan is ever reused). Prints "final check ok" when nothing was found. The
arguments after ``--`` go to ``engine_decode``.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import torch

from hcpolicy.backends.torch_engine import async_recall

pending: list[tuple[torch.cuda.Event, torch.Tensor, str, Any]] = []  # (event, pinned copy, what, detail)
kept: list[dict] = []


def later(t: torch.Tensor, what: str, detail: Any = None) -> None:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    pending.append((event, host, what, detail))


def check() -> None:
    waiting = []
    for event, host, what, detail in pending:
        if not event.query():
            waiting.append((event, host, what, detail))
            continue
        v = host.tolist()
        if what == "copy_tails" and v[0]:
            raise AssertionError(f"_copy_tails: {v[0]} bad dst, {v[1]} bad src; min/max dst {v[2]}/{v[3]}; {detail}")
        if what == "positions" and v < 0:
            raise AssertionError(f"negative pool positions before a plan: min {v}")
    pending[:] = waiting


def install(keep_plans: bool) -> None:
    plan_batch, land = async_recall.plan_batch, async_recall.AsyncRecalls.land

    def checked_plan(kv, *args):  # noqa: ANN001, ANN002, ANN202
        later(kv.positions[: -kv.page_size].min(), "positions")
        out = plan_batch(kv, *args)
        if keep_plans:
            kept.append(out)
        return out

    def copy_tails(self, meta, fresh, t_max):  # noqa: ANN001, ANN202
        check()
        if t_max == 0:
            return
        kv = self.kv
        rows = kv.kv.shape[0]
        src, dst = self._tail_rows(meta, fresh, t_max)
        bad_dst, bad_src = (dst < 0) | (dst >= rows), (src < 0) | (src >= rows)
        later(torch.stack([bad_dst.sum(), bad_src.sum(), dst.min(), dst.max()]), "copy_tails",
              f"M={meta.shape[1]} fresh {tuple(fresh.shape)} t_max {t_max} rows {rows}")  # fmt: skip
        dst, src = torch.where(bad_dst, kv.trash_row, dst), torch.where(bad_src, kv.trash_row, src)
        kv.kv.index_copy_(0, dst, kv.kv[src])
        kv.positions.index_copy_(0, dst, kv.positions[src])

    def checked_land(self, keys, wait=False):  # noqa: ANN001, ANN202
        check()
        return land(self, keys, wait)

    async_recall.plan_batch = checked_plan
    async_recall.AsyncRecalls._copy_tails = copy_tails
    async_recall.AsyncRecalls.land = checked_land


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    mine, bench = args[:split], args[split + 1 :]
    unknown = [a for a in mine if a != "--keep-plans"]
    if unknown:
        raise SystemExit(f"unknown arguments {unknown}; usage: see the module docstring")
    install(keep_plans="--keep-plans" in mine)
    sys.argv = ["engine_decode", *bench]
    try:
        runpy.run_module("hcpolicy.bench.engine_decode", run_name="__main__")
    finally:
        torch.cuda.synchronize()
        check()
        print("final check ok")


if __name__ == "__main__":
    main()
