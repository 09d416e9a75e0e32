"""The ``hc`` command line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs
import typer
from rich.console import Console
from rich.table import Table

from hcpolicy import __version__
from hcpolicy.registry import BACKENDS, POLICIES, Registry

if TYPE_CHECKING:  # torch-backed modules are imported inside the commands that use them
    from hcpolicy.eval.runner import EvalPlan
    from hcpolicy.profile import HeadProfile

app = typer.Typer(
    help="hcpolicy: head-heterogeneous KV-cache compression (HeteroCache) and baselines.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
ANSWER_TOKENS = 128  # room kept above --context-length for the question's answer


@app.callback()
def main() -> None:
    """hcpolicy command line."""


def registry_table(registry: Registry, title: str, *, options: bool = False) -> Table:
    """One row per registered name; described from source, so nothing heavy is imported."""
    table = Table(title=title, show_lines=options)
    for column in ("name", "description", "options")[: 3 if options else 2]:
        table.add_column(column, overflow="fold")
    for name in registry.names():
        try:
            found = registry.describe(name)
        except Exception as err:  # a broken third-party plugin must not hide the others
            table.add_row(name, f"[red]failed to load: {err}[/red]", *([""] if options else []))
            continue
        summary = found.summary.replace("``", "")  # docstrings' literal markup, not for a terminal
        table.add_row(name, summary, *([found.options] if options else []))
    return table


@app.command("list")
def list_registered() -> None:
    """List the registered policies (with their options), tasks and backends."""
    from hcpolicy.eval.tasks import TASKS

    console.print(registry_table(POLICIES, f"Policies (hcpolicy {__version__})", options=True))
    console.print(registry_table(TASKS, "Tasks"))
    if not BACKENDS.names():
        console.print("Backends: none registered in this installation.")
    else:
        console.print(registry_table(BACKENDS, "Backends"))


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
    from hcpolicy.profile import Role

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


def evaluation_plan(
    policy: str | None, compression: str, task: str | None, protocol: str,
    context_length: int, samples: int, seed: int, batch_size: int,
) -> EvalPlan:  # fmt: skip
    """The run the flags ask for, every flag checked (and named when wrong)."""
    from hcpolicy.eval import TASKS

    policies = known(split(policy) if policy is not None else POLICIES.names(), POLICIES, "--policy")
    tasks = known(split(task) if task is not None else TASKS.names(), TASKS, "--task")
    try:
        compressions = [float(c) for c in split(compression)]
    except ValueError:
        raise UserError(f"--compression must be a comma list of numbers, got {compression!r}") from None
    if not compressions:
        raise UserError("--compression names no compression")
    for c in compressions:
        if not 0.0 < c <= 1.0:
            raise UserError(f"--compression {c:g} is not a fraction of the full KV in (0, 1]")
    protocols = split(protocol)
    for p in protocols or [""]:
        if p not in ("agnostic", "aware"):
            raise UserError(f"unknown protocol {p!r}; use agnostic, aware or both")
    for flag, value, least in (("--context-length", context_length, 1), ("--samples", samples, 1),
                               ("--batch-size", batch_size, 1), ("--seed", seed, 0)):  # fmt: skip
        if value < least:
            raise UserError(f"{flag} must be an integer >= {least}, got {value}")
    from hcpolicy.eval.runner import EvalPlan  # imports torch: after the checks, so typos fail fast

    return EvalPlan(
        policies=policies, compressions=compressions, tasks=tasks, protocols=protocols,
        context_length=context_length, samples=samples, seed=seed, batch_size=batch_size,
    )  # fmt: skip


def known(names: list[str], registry: Registry, flag: str) -> list[str]:
    if not names:
        raise UserError(f"{flag} names no {registry.kind}")
    for name in names:
        if name not in registry:
            raise UserError(f"unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")
    return names


def evaluating_backend(name: str) -> Any:
    """The backend class, if it can run ``hc evaluate`` (it has an ``evaluator``)."""
    cls = backend_class(name)
    if callable(getattr(cls, "evaluator", None)):
        return cls
    able = [other for other in BACKENDS.names() if other != name and has_evaluator(other)]
    raise UserError(f"backend {name!r} cannot run hc evaluate yet; backends that can: {', '.join(able) or 'none'}")


def has_evaluator(name: str) -> bool:
    try:
        return callable(getattr(BACKENDS.get(name), "evaluator", None))
    except ImportError:  # its extra packages are missing
        return False


def check_context(context_length: int, limit: int | None) -> None:
    if limit is not None and context_length + ANSWER_TOKENS > limit:
        raise UserError(f"--context-length {context_length} plus the answer exceeds the model's limit of {limit} tokens")


def read_profile(path: Path) -> HeadProfile:
    """The profile at ``path``, its shape and format checked (its model is checked after load)."""
    from hcpolicy.profile import HeadProfile

    if not path.is_file():
        raise UserError(f"no profile at {path}")
    try:
        return HeadProfile.load(path)
    except ValueError as err:
        raise UserError(f"--profile {path}: {err}") from None


def check_something_runs(plan: EvalPlan, factory: Callable[[str, float], Any]) -> None:
    """Fail before the model loads when every policy refuses every compression."""
    from hcpolicy.eval.runner import build_policies

    built, refused = build_policies(plan, factory)
    if not built:
        raise UserError(f"nothing to run: {refusals(refused)}")


def refusals(skipped: list[Any]) -> str:
    if not skipped:
        return "no cell produced a record"
    return "; ".join(f"{s.policy} refused --compression {s.compression:g} ({s.reason})" for s in skipped)


@attrs.frozen
class Preset:
    """Defaults of ``hc evaluate`` that an explicit flag overrides."""

    policy: str | None  # None: every registered policy
    compression: str
    samples: int


# the quick default (about 7 minutes on 2 CPU cores): the best memory savers of the committed
# 2K run, pyramidkv under `aware` and streamingllm under `agnostic`
QUICK = Preset(policy="full,heterocache,pyramidkv,streamingllm", compression="0.5", samples=3)
EXHAUSTIVE = Preset(policy=None, compression="0.4,0.5", samples=4)


def report_finished(plan: EvalPlan, model: str, store: Any, factory: Callable[[str, float], Any]) -> bool:
    """One line on the cells a re-run finds in the results already and skips; True when they
    are all of the plan's cells (there is then nothing to run)."""
    from hcpolicy.eval.runner import build_policies, pending

    labels = list(build_policies(plan, factory)[0])
    todo, done = pending(plan, model, store, labels)
    if done:
        names = sorted({f"{c.policy}@{c.compression:g}" for c in done})
        console.print(
            f"skipping {len(done)} cells already in {store.json_path} ({', '.join(names)}); "
            "delete it or use another --output-dir to run them again", soft_wrap=True, highlight=False,
        )  # fmt: skip
    return bool(done) and not todo


@contextmanager
def progress_display(every_s: float = 10.0) -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback for ``eval.runner.run``: a bar with an ETA in a terminal, a plain
    line at most every ``every_s`` seconds (and at the end) elsewhere, e.g. in a CI log."""
    import time

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)  # fmt: skip

    if not console.is_terminal:
        start, last = time.monotonic(), [-every_s]

        def line(label: str, done: int, total: int) -> None:
            now = time.monotonic() - start
            if now - last[0] < every_s and done < total:
                return
            last[0] = now
            eta = f", about {(total - done) * now / done:.0f} s left" if done else ""
            console.print(f"[{done}/{total} sample runs, {now:.0f} s{eta}] {label}", highlight=False, soft_wrap=True)

        yield line
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("sample runs"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("starting", total=None)

        def update(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        yield update


@app.command("evaluate")
@fail_cleanly
def evaluate_command(
    backend: str = typer.Option("hf", help="backend that runs the model"),
    model: str = typer.Option(None, help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M)"),
    policy: str = typer.Option(None, help=f"comma list of policies (default: {QUICK.policy}; with --exhaustive: all registered)"),
    compression: str = typer.Option(None, help=f"comma list: fraction of the full KV kept on the device (default: {QUICK.compression}; with --exhaustive: {EXHAUSTIVE.compression})"),
    task: str = typer.Option(None, help="comma list of tasks (default: all built-in tasks)"),
    context_length: int = typer.Option(2048, help="prompt length in tokens"),
    samples: int = typer.Option(None, help=f"samples per task and protocol (default: {QUICK.samples}; with --exhaustive: {EXHAUSTIVE.samples})"),
    seed: int = typer.Option(0),
    protocol: str = typer.Option("agnostic,aware", help="agnostic (question after compression), aware, or both"),
    batch_size: int = typer.Option(None, help="samples prefilled together (default: all samples of a task and protocol)"),
    profile: Path = typer.Option(None, help="HeadProfile for heterocache (default: the shipped one, if any)"),
    output_dir: Path = typer.Option(Path("hc-results"), help="results.json, results.csv and plots go here"),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="every registered policy at 0.4 and 0.5, 4 samples (about an hour on 2 CPU cores)"),
) -> None:
    """Score policies on long-context tasks at several compressions; write JSON, CSV and plots.

    With no options: full KV, heterocache and the strongest baselines at compression 0.5 on every built-in task under both protocols (a few minutes on 2 CPU cores)."""
    preset = EXHAUSTIVE if exhaustive else QUICK
    policy = policy if policy is not None else preset.policy
    samples = samples if samples is not None else preset.samples
    plan = evaluation_plan(
        policy, compression if compression is not None else preset.compression, task, protocol, context_length,
        samples, seed, batch_size if batch_size is not None else samples,
    )  # fmt: skip
    from hcpolicy.eval import ResultStore
    from hcpolicy.eval.runner import run
    from hcpolicy.policy.factory import build_policy, default_profile_path

    evaluator = evaluating_backend(backend)
    context_limit = getattr(evaluator, "context_limit", None)  # the model's limit, read without loading it
    if callable(context_limit):
        check_context(context_length, context_limit(model))
    model_name = getattr(evaluator, "model_name", None)  # known before loading: the shipped profile is too
    profile_path = profile or (default_profile_path(model_name(model)) if callable(model_name) else None)
    loaded = read_profile(profile_path) if profile_path else None  # its shape and format, before the model

    def factory(name: str, c: float) -> Any:
        return build_policy(name, c, profile=loaded)

    if loaded is not None:
        check_something_runs(plan, factory)
    store = ResultStore(output_dir)
    if callable(model_name) and report_finished(plan, model_name(model), store, factory):
        show_results(store, output_dir)  # every cell is in the results already: no model to load
        return
    console.print(f"loading {model or 'the embedded default model'} (a GGUF file is converted on its first load, "
                  "about a minute, and read from the cache after)", highlight=False, soft_wrap=True)  # fmt: skip
    generator = evaluator.evaluator(model)
    check_context(context_length, generator.max_context)
    if loaded is None and (shipped := default_profile_path(generator.model_name)):
        loaded = read_profile(shipped)  # a backend that cannot name its model before loading it
    if loaded is not None:
        loaded.check(generator.backend.spec)  # the fingerprint needs the loaded model's spec

    if not callable(model_name):
        report_finished(plan, generator.model_name, store, factory)
    with progress_display() as progress:
        _, skipped = run(plan, generator, factory, store, progress=progress)
    if not store.records:
        raise UserError(f"nothing ran, so there is nothing to report: {refusals(skipped)}")
    for s in skipped:
        console.print(f"[yellow]skipped[/yellow] {s.policy} at {s.compression:g}: {s.reason}", soft_wrap=True)
    show_results(store, output_dir)


def show_results(store: Any, output_dir: Path) -> None:
    """The tables, the plots and where the files are."""
    from hcpolicy.eval.report import plot, print_table

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
