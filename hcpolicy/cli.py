"""The ``hc`` command line."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import attrs
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hcpolicy import __version__
from hcpolicy.policy.factory import build_policy, default_profile_path
from hcpolicy.profile import HeadProfile, Role
from hcpolicy.registry import BACKENDS, POLICIES

app = typer.Typer(
    help="hcpolicy: head-heterogeneous KV-cache compression (HeteroCache) and baselines.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.callback()
def main() -> None:
    """hcpolicy command line."""


def summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def option_list(cls: type) -> str:
    """Constructor options of an attrs class as ``name=default``; required ones marked."""
    if not attrs.has(cls):
        return ""
    parts = []
    for field in attrs.fields(cls):
        if not field.init:
            continue
        name = field.alias or field.name
        if field.default is attrs.NOTHING:
            parts.append(f"{name} (required)")
        elif isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            parts.append(f"{name}={field.default.factory.__name__}()")
        else:
            parts.append(f"{name}={field.default!r}")
    return ", ".join(parts)


@app.command("list")
def list_registered() -> None:
    """List the registered policies (with their options) and backends."""
    policies = Table(title=f"Policies (hcpolicy {__version__})", show_lines=True)
    for column in ("name", "description", "options"):
        policies.add_column(column, overflow="fold")
    for name in POLICIES.names():
        try:
            cls = POLICIES.get(name)
        except Exception as err:  # a broken third-party plugin must not hide the others
            policies.add_row(name, f"[red]failed to load: {err}[/red]", "")
            continue
        policies.add_row(name, summary(cls), option_list(cls))
    console.print(policies)
    backends = Table(title="Backends")
    backends.add_column("name")
    backends.add_column("description")
    for name in BACKENDS.names():
        try:
            backends.add_row(name, summary(BACKENDS.get(name)))
        except Exception as err:
            backends.add_row(name, f"[red]failed to load: {err}[/red]")
    if not BACKENDS.names():
        console.print("Backends: none registered in this installation.")
    else:
        console.print(backends)


class UserError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one line and a non-zero exit, never a traceback."""

    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, KeyError, FileNotFoundError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def backend_class(name: str) -> Any:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(BACKENDS.names())}")
    try:
        return BACKENDS.get(name)
    except ImportError as err:
        raise UserError(f"backend {name!r} needs extra packages ({err}); pip install 'hcpolicy[{name}]'") from None


def print_roles(profile: HeadProfile) -> None:
    counts = profile.role_counts()
    table = Table(title="Head roles (KV heads over all layers)")
    for column in ("anchor", "volatile", "pivot", "satellite", "full KV on device"):
        table.add_column(column, justify="right")
    full = profile.num_full_heads
    table.add_row(
        *(str(counts[r.value]) for r in (Role.ANCHOR, Role.VOLATILE, Role.PIVOT, Role.SATELLITE)),
        f"{full} ({full / profile.total_heads:.1%})",
    )
    console.print(table)
    console.print(f"heterocache needs compression > {profile.min_compression:.4f} with this profile")


@app.command("profile")
@fail_cleanly
def profile_command(
    backend: str = typer.Option("hf", help="backend that runs the model"),
    model: str = typer.Option(None, help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M)"),
    output: Path = typer.Option(..., help="where to write the HeadProfile JSON"),
    tokens: int = typer.Option(2400, help="calibration prompt length in tokens"),
    samples: int = typer.Option(2, help="calibration documents (generated locally)"),
    steps: int = typer.Option(40, help="decode steps observed after each prompt"),
    top_k: float = typer.Option(0.2, help="top-k set size: tokens if >= 1, else a fraction of the prompt"),
    tau_stable: float = typer.Option(0.5, help="stability threshold: anchor vs volatile"),
    tau_sim: float = typer.Option(0.5, help="similarity threshold for the head graph"),
    faithful: bool = typer.Option(False, help="the reference code's constants (k=1024, 100 steps); overrides the above"),
    seed: int = typer.Option(0),
) -> None:
    """Measure head roles, stability and budget ratios; write a HeadProfile."""
    from hcpolicy.profiler import ProfileConfig

    if faithful:
        config = ProfileConfig.faithful()
    else:
        k: int | float = int(top_k) if top_k >= 1 else float(top_k)
        config = ProfileConfig(top_k=k, decode_steps=steps, tau_stable=tau_stable, tau_sim=tau_sim)
    profile = backend_class(backend).profile(model, config, tokens=tokens, samples=samples, seed=seed)
    profile.save(output)
    console.print(f"wrote {output}")
    print_roles(profile)


@app.command("evaluate")
@fail_cleanly
def evaluate_command(
    backend: str = typer.Option("hf", help="backend that runs the model"),
    model: str = typer.Option(None, help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M)"),
    policy: str = typer.Option(None, help="comma list of policies (default: all registered)"),
    compression: str = typer.Option("0.4,0.5", help="comma list: fraction of the full KV kept on the device"),
    task: str = typer.Option(None, help="comma list of tasks (default: all built-in tasks)"),
    context_length: int = typer.Option(2048, help="prompt length in tokens"),
    samples: int = typer.Option(4, help="samples per task and protocol"),
    seed: int = typer.Option(0),
    protocol: str = typer.Option("agnostic,aware", help="agnostic (question after compression), aware, or both"),
    batch_size: int = typer.Option(4, help="samples prefilled together"),
    profile: Path = typer.Option(None, help="HeadProfile for heterocache (default: the shipped one, if any)"),
    output_dir: Path = typer.Option(Path("hc-results"), help="results.json, results.csv and plots go here"),
) -> None:
    """Score policies on long-context tasks at several compressions; write JSON, CSV and plots."""
    from hcpolicy.eval import TASKS, ResultStore
    from hcpolicy.eval.report import plot, print_table
    from hcpolicy.eval.runner import EvalPlan, run

    policies = split(policy) if policy else POLICIES.names()
    for name in policies:
        if name not in POLICIES:
            raise UserError(f"unknown policy {name!r}; known: {', '.join(POLICIES.names())}")
    tasks = split(task) if task else TASKS.names()
    for name in tasks:
        if name not in TASKS:
            raise UserError(f"unknown task {name!r}; known: {', '.join(TASKS.names())}")
    try:
        compressions = [float(c) for c in split(compression)]
    except ValueError:
        raise UserError(f"--compression must be a comma list of numbers, got {compression!r}") from None
    plan = EvalPlan(
        policies=policies, compressions=compressions, tasks=tasks, protocols=split(protocol),
        context_length=context_length, samples=samples, seed=seed, batch_size=batch_size,
    )  # fmt: skip
    for p in plan.protocols:
        if p not in ("agnostic", "aware"):
            raise UserError(f"unknown protocol {p!r}; use agnostic, aware or both")
    if profile is not None and not profile.is_file():
        raise UserError(f"no profile at {profile}")
    generator = backend_class(backend).evaluator(model)
    limit = generator.max_context
    if limit is not None and context_length + 128 > limit:
        raise UserError(f"--context-length {context_length} plus the answer exceeds the model's limit of {limit} tokens")
    profile_path = profile or default_profile_path(generator.model_name)
    loaded = HeadProfile.load(profile_path, spec=generator.backend.spec) if profile_path else None

    def factory(name: str, c: float) -> Any:
        return build_policy(name, c, profile=loaded)

    store = ResultStore(output_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:  # fmt: skip
        bars: dict[str, Any] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in bars:
                bars[label] = bar.add_task(label, total=total)
            bar.update(bars[label], completed=done)

        _, skipped = run(plan, generator, factory, store, progress=progress)
    for s in skipped:
        console.print(f"[yellow]skipped[/yellow] {s.policy} at {s.compression:g}: {s.reason}", soft_wrap=True)
    print_table(store.records, console)
    paths = plot(store.records, output_dir / "scores.png")
    console.print(f"results: {store.json_path}, {store.csv_path}; plots: {', '.join(map(str, paths))}")


@app.command("bench")
@fail_cleanly
def bench_command(
    backend: str = typer.Option("torch_engine", help="torch_engine or hf"),
    config: str = typer.Option("llama-3.1-8b", help="model shape with random weights: llama-3.1-8b or tiny"),
    context: str = typer.Option("32768,131072", help="comma list of context lengths"),
    batch: str = typer.Option("1", help="comma list of batch sizes"),
    policy: str = typer.Option("full,heterocache", help="comma list of policies (heterocache uses a synthetic profile)"),
    compression: float = typer.Option(0.5, help="fraction of the full KV kept on the device"),
    steps: int = typer.Option(8, help="timed decode steps per cell"),
    warmup: int = typer.Option(6, help="untimed decode steps first"),
    random_kv: bool = typer.Option(True, "--random-kv/--prefill", help="fill the cache with random K/V, or prefill random tokens"),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="torch_engine: capture the decode step"),
    device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
    output_dir: Path = typer.Option(Path("hc-bench"), help="bench.json and bench.png go here"),
) -> None:
    """Decode latency per token against context and batch, beside the bandwidth floor."""
    import torch

    from hcpolicy.backends.torch_engine.bench import BenchPlan, run_sweep, write_outputs

    def ints(value: str, name: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in split(value))
        except ValueError:
            raise UserError(f"--{name} must be a comma list of integers, got {value!r}") from None

    if backend not in ("torch_engine", "hf"):
        raise UserError(f"hc bench runs the torch_engine and hf backends, got {backend!r}")
    backend_class(backend)  # the backend's packages must import
    policies = split(policy)
    for name in policies:
        if name != "full" and name not in POLICIES:
            raise UserError(f"unknown policy {name!r}; known: {', '.join(POLICIES.names())}")
    plan = BenchPlan(
        backend=backend, config=config, contexts=ints(context, "context"), batches=ints(batch, "batch"),
        policies=tuple(policies), compression=compression, steps=steps, warmup=warmup, random_kv=random_kv,
        cuda_graphs=cuda_graphs, device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )  # fmt: skip
    results = run_sweep(plan, progress=lambda line: console.print(line, highlight=False))
    table = Table(title=f"{backend} decode ({config}, {results['device']}, "
                        f"{results['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s measured)")  # fmt: skip
    for column in ("policy", "context", "batch", "ms/token", "mean", "floor ms", "x floor", "KV read GB", "recalls"):
        table.add_column(column, justify="right")
    for r in results["rows"]:
        table.add_row(r["policy"], str(r["context"]), str(r["batch"]), f"{r['ms_per_token']:.2f}", f"{r['ms_mean']:.2f}",
                      f"{r['floor_ms']:.2f}", f"{r['floor_ratio']:.1f}", f"{r['kv_bytes_read'] / 1e9:.3f}",
                      str(r["recalls"]))  # fmt: skip
    console.print(table)
    json_path, png_path = write_outputs(results, output_dir)
    console.print(f"results: {json_path}; plot: {png_path}")


if __name__ == "__main__":
    app()
