"""One Engine's life, inside the worker process ``serve.py --worker RUN_DIR`` starts:
prepare (model config, plugin, profile, environment), start the Engine, measure, shut down.

The worker's stderr is ``RUN_DIR/engine.log``; the scheduler SGLang spawns inherits it, so
``LogTail`` reads the scheduler's lines each measurement caused. The result is written to
``RUN_DIR/result.json`` after every measurement, so an Engine that dies keeps what it did.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from serve_plan import MODELS, PLAIN, EngineRun, write_model_dir

PLUGIN_GROUP = "sglang.srt.plugins"
INFO_KEYS = (
    "max_total_num_tokens", "max_running_requests", "max_req_input_len", "page_size", "chunked_prefill_size",
    "mem_fraction_static", "attention_backend", "radix_cache_backend", "disable_cuda_graph", "context_length",
    "version",
)  # fmt: skip


class LogTail:
    """The part of a growing log file written since the previous call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, path.stat().st_size if path.exists() else 0

    def __call__(self) -> str:
        sys.stderr.flush()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode(errors="replace")


def expose_plugin(repo: Path, run_dir: Path) -> str:
    """Make ``import hcpolicy`` resolve to ``repo`` and its ``sglang.srt.plugins`` entry point
    visible to SGLang's ``load_plugins()`` in this process and in the spawned scheduler
    (which starts with this process's ``sys.path``). Without a pip-installed hcpolicy, a
    minimal ``.dist-info`` holding the entry point from pyproject.toml is written."""
    paths = [str(repo)]
    if not any(ep.name == "hcpolicy" for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)):
        shim = run_dir / "entry_points"
        info = shim / "hcpolicy-0.0.0+bench.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hcpolicy\nVersion: 0.0.0+bench\n")
        (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\nhcpolicy = hcpolicy.backends.sglang.plugin:register\n")
        paths.append(str(shim))
    for p in reversed(paths):
        sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    import hcpolicy

    return str(Path(hcpolicy.__file__).parent)


def write_profile(model: str, run_dir: Path) -> str:
    """The synthetic Llama-like head profile ``hc bench`` uses, for this model's shape."""
    from hcpolicy.bench.hf_decode import llama_like_profile
    from hcpolicy.spec import ModelSpec

    s = MODELS[model]
    spec = ModelSpec("LlamaForCausalLM", s["num_hidden_layers"], s["num_attention_heads"],
                     s["num_key_value_heads"], s["head_dim"])  # fmt: skip
    return str(llama_like_profile(spec).save(run_dir / "profile.json"))


def server_info(engine: Any) -> dict[str, Any]:
    info = engine.get_server_info()
    internal = (info.get("internal_states") or [{}])[0] or {}
    out = {k: info.get(k) for k in INFO_KEYS}
    out["effective_max_running_requests"] = internal.get("effective_max_running_requests_per_dp")
    out["memory_usage"] = internal.get("memory_usage")
    return out


def work(run_dir: Path, repo: Path) -> int:
    run = EngineRun.from_json((run_dir / "run.json").read_text())
    result: dict[str, Any] = {"measures": []}
    save = lambda: (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731
    profile = None
    if run.policy != PLAIN:
        result["hcpolicy"] = expose_plugin(repo, run_dir)
        profile = write_profile(run.model, run_dir)
    os.environ.update(run.env(profile))
    kwargs = run.engine_kwargs(str(write_model_dir(run.model, run_dir)))
    result.update(engine_kwargs=kwargs, env=run.env(profile))
    save()

    import sglang as sgl
    import torch

    from serve_measure import measure
    from serve_weights import apply

    result.update(torch=torch.__version__, sglang=sgl.__version__)
    tail = LogTail(run_dir / "engine.log")
    t0 = time.perf_counter()
    engine = sgl.Engine(**kwargs)
    result["startup_s"] = time.perf_counter() - t0
    result["info"] = server_info(engine)
    save()
    try:
        if run.reinit_weights:
            try:
                apply(engine, run.settings.seed)
                result["weights"] = "unit-scale random (serve_weights.reinit)"
            except Exception:  # timings do not depend on the weights' values; exactness says which it had
                result["weights"] = "sglang dummy (re-init failed)"
                result["reinit_error"] = traceback.format_exc()[-3000:]
        for m in run.measures:
            try:
                result["measures"].append(measure(engine, m, run.model, run.settings.seed, tail))
            except Exception:  # one failed measurement must not hide the others' numbers
                result["measures"].append({"kind": m.kind, "label": m.label, "error": traceback.format_exc()[-3000:]})
            save()
    finally:
        t1 = time.perf_counter()
        engine.shutdown()
        result["shutdown_s"] = time.perf_counter() - t1
        save()
    return 1 if any("error" in m for m in result["measures"]) else 0
