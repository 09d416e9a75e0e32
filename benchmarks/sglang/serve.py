"""SGLang with and without hcpolicy's plugin, on random Llama weights: greedy exactness,
decode throughput and SGLang's own admission (issue 15's "Show").

    python benchmarks/sglang/serve.py --runs exact,throughput,admission \\
        --policies plain,full,heterocache --compression 0.5 --context 32768

Each ``EngineRun`` (``serve_plan``) is one fresh ``sglang.Engine`` in its own worker
process (this script with ``--worker``): the model is a folder holding only a Llama
``config.json`` and ``load_format="dummy"`` (no weight files), ``skip_tokenizer_init=True``
with random ``input_ids``. Plain runs use SGLang's ``triton`` attention and load no plugin;
plugin runs use ``hcpolicy_triton`` with ``radix_cache_backend="hcpolicy"`` and the policy
from ``HCPOLICY_*`` (heterocache gets a synthetic Llama-like head profile, as ``hc bench``).
Every Engine gets the same ``mem_fraction_static``.

Measured (``serve_measure`` says how):
- exact: greedy token ids of a few prompts, tiny model and the 8B shape, plain vs ``full``;
- throughput: N requests of P prompt tokens, M new tokens each: decode tokens/s over the
  window where all N decode (client stamps of streamed tokens), SGLang's logged
  ``gen throughput`` at batch N beside it; at N=1 the mean per-token latency;
- admission: many ``--context``-token requests at once; the largest ``#running-req`` the
  scheduler logged (SGLang's admission, ``serve_logs``), the client's count of requests
  decoding at once, decode tokens/s at that batch, and ``max_total_num_tokens``.

The worker's stderr (and so the scheduler's log) goes to ``<workdir>/<run>/engine.log``;
results go to one JSON (``--out``, default ``$OUT/sglang_serve.json``), rewritten after
every Engine so a run cut short keeps what it measured. A compact table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from serve_plan import MEASURES, PLAIN, EngineRun, Plan, Settings  # noqa: E402
from serve_report import compare, table  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--runs", type=_names, default=MEASURES, help="exact,throughput,admission (default: all)")
    a("--policies", type=_names, default=(PLAIN, "full"), help="'plain' (no plugin) and hcpolicy policy names")
    a("--compression", type=float, default=0.5, help="HCPOLICY_COMPRESSION for plugin runs")
    a("--cuda-graphs", type=_names, default=("off",), help="off, on, or off,on (one Engine each)")
    a("--model", default="llama8b", help="model of throughput and admission runs: llama8b or tiny")
    a("--exact-models", type=_names, default=("tiny", "llama8b"))
    a("--exact-prompts", type=_ints, default=(16, 100, 333, 1000), help="tiny model's prompt lengths")
    a("--exact-steps", type=int, default=32, help="tiny model's greedy steps")
    a("--exact-large-prompts", type=_ints, default=(128, 2048), help="8B shape's prompt lengths")
    a("--exact-large-steps", type=int, default=16)
    a("--context", type=int, default=32768, help="prompt tokens of admission requests")
    a("--throughput-context", type=int, default=None, help="prompt tokens of throughput requests (default --context)")
    a("--batches", type=_ints, default=(1, 8), help="throughput batch sizes")
    a("--max-new", type=int, default=128, help="new tokens per request (throughput and admission)")
    a("--admission-requests", type=int, default=48)
    a("--mem-fraction-static", type=float, default=0.85, help="the same for every Engine")
    a("--page-size", type=int, default=1)
    a("--chunked-prefill-size", type=int, default=None)
    a("--context-length", type=int, default=None, help="SGLang's context_length (default: the model's)")
    a("--max-running-requests", type=int, default=None)
    a("--max-total-tokens", type=int, default=None, help="cap SGLang's KV pool (a CPU run needs one)")
    a("--cuda-graph-max-bs", type=int, default=None)
    a("--attention", default="triton", help="SGLang attention backend (the plugin wraps it)")
    a("--device", default="cuda")
    a("--decode-log-interval", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--env", action="append", default=[], metavar="K=V", help="extra environment for the Engines")
    a("--engine-timeout", type=float, default=900.0, help="seconds per Engine (start + its measurements)")
    a("--out", default=None, help="result JSON (default $OUT/sglang_serve.json, else ./sglang_serve.json)")
    a("--append", action="store_true", help="keep the Engines already in --out, replace those run again")
    a("--log-out", default=None, help="also write every Engine's log, concatenated, here")
    a("--workdir", default=None, help="model configs, profiles and logs (default: a temp folder)")
    a("--dry-run", action="store_true", help="print each Engine's kwargs and environment, start nothing")
    a("--merge", nargs="+", default=None, metavar="JSON",
      help="start nothing: combine result files of separate calls (later ones win) into --out, print the table")
    a("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    graphs = {"off": False, "on": True}
    if not args.cuda_graphs or any(g not in graphs for g in args.cuda_graphs):
        raise ValueError(f"--cuda-graphs takes off, on or off,on; got {','.join(args.cuda_graphs)}")
    env = []
    for kv in args.env:
        if "=" not in kv:
            raise ValueError(f"--env takes K=V, got {kv!r}")
        env.append(tuple(kv.split("=", 1)))
    settings = Settings(
        mem_fraction_static=args.mem_fraction_static, page_size=args.page_size,
        chunked_prefill_size=args.chunked_prefill_size, context_length=args.context_length,
        max_running_requests=args.max_running_requests, max_total_tokens=args.max_total_tokens, attention=args.attention, device=args.device,
        decode_log_interval=args.decode_log_interval, compression=args.compression, seed=args.seed,
        cuda_graph_max_bs=args.cuda_graph_max_bs, extra_env=tuple(env),
    )  # fmt: skip
    return Plan(
        runs=args.runs, policies=args.policies, cuda_graphs=tuple(graphs[g] for g in args.cuda_graphs),
        exact_models=args.exact_models, model=args.model, exact_prompts=args.exact_prompts,
        exact_steps=args.exact_steps, exact_large_prompts=args.exact_large_prompts,
        exact_large_steps=args.exact_large_steps, batches=args.batches, max_new=args.max_new,
        throughput_context=args.throughput_context or args.context, context=args.context,
        admission_requests=args.admission_requests, settings=settings,
    )  # fmt: skip


def dry_run(runs: list[EngineRun]) -> None:
    for run in runs:
        print(f"== {run.name}")
        print("   env:   ", json.dumps(run.env("<workdir>/profile.json" if run.policy != PLAIN else None)))
        print("   engine:", json.dumps(run.engine_kwargs(f"<workdir>/{run.model}")))
        for m in run.measures:
            lens = sorted(set(m.prompt_lens))
            print(f"   {m.kind:<10} {m.label:<10} requests={len(m.prompt_lens)} prompt_lens={lens} max_new={m.max_new}")


def run_engine(run: EngineRun, workdir: Path, timeout: float) -> dict[str, Any]:
    """One Engine in a worker process (its own session, so a timeout kills the scheduler too)."""
    run_dir = workdir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(run.to_json())
    result_path, log_path = run_dir / "result.json", run_dir / "engine.log"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    out: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {}
    out.update(name=run.name, policy=run.policy, model=run.model, cuda_graph=run.cuda_graph, worker_s=time.perf_counter() - t0)
    if rc != 0:
        log = log_path.read_text(errors="replace")
        cause = [ln for ln in log.splitlines() if re.match(r"^\w*(Error|Exception)\b.*:", ln)]
        out["error"] = f"worker {'timed out' if rc is None else f'exited {rc}'}: {cause[-1] if cause else 'see log'}"
        out["log_tail"] = log[-4000:]
    return out


def environment() -> dict[str, Any]:
    def cmd(*c: str) -> str | None:
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=30, cwd=REPO).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {"gpu": cmd("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
            "commit": cmd("git", "rev-parse", "HEAD"), "python": sys.version.split()[0]}  # fmt: skip


def merge(paths: list[Path], out: Path) -> int:
    doc: dict[str, Any] = {"engines": {}, "merged_from": []}
    for path in paths:
        part = json.loads(path.read_text())
        doc["engines"].update(part["engines"])
        doc["merged_from"].append({"file": str(path), "argv": part.get("argv"), "environment": part.get("environment")})
    doc["comparisons"] = compare(doc["engines"])
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from serve_worker import work

        return work(Path(args.worker), REPO)
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out or "sglang_serve.json"))
    try:
        plan = plan_from_args(args)
        runs = plan.engine_runs()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(runs)
        return 0
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "sglang_serve.json")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sglang-serve-"))
    doc: dict[str, Any] = json.loads(out.read_text()) if args.append and out.is_file() else {"engines": {}}
    doc.update(argv=sys.argv[1:] if argv is None else argv, environment=environment())
    for run in runs:
        print(f"[serve] {run.name}: starting ({len(run.measures)} measurements)", flush=True)
        doc["engines"][run.name] = res = run_engine(run, workdir, args.engine_timeout)
        print(f"[serve] {run.name}: {'FAILED' if 'error' in res else 'done'} in {res['worker_s']:.0f} s", flush=True)
        doc["comparisons"] = compare(doc["engines"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.log_out:
        with open(args.log_out, "w") as f:
            for run in runs:
                f.write(f"\n===== {run.name} =====\n")
                f.write((workdir / run.name / "engine.log").read_text(errors="replace"))
    print(table(doc))
    print(f"[serve] results: {out}")
    return 1 if any("error" in e for e in doc["engines"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
