"""Reports over evaluation records: a terminal table and score-vs-budget plots.

Records are grouped by (model, protocol, context length); within a group a row is one
(policy, requested compression). Scores of several seeds are averaged weighted by their
sample counts; a row's mean is the plain mean over the tasks it has. The device KV
fraction is the measured ``kv_bytes_device / kv_bytes_full`` (summed over the row).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from rich.table import Table

from hcpolicy.eval.results import Record
from hcpolicy.eval.tasks import BUILTIN_TASKS

FULL_POLICY = "full"  # drawn as the reference line, listed first
Group = tuple[str, str, int]  # (model, protocol, context_length)


@attrs.frozen
class Row:
    """One (policy, compression) line of a group: scores per task, averaged over seeds."""

    policy: str
    compression: float
    scores: dict[str, float]
    device_fraction: float | None
    recalls: int

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    @property
    def x(self) -> float:
        """Where the row sits on a budget axis: measured device fraction, else the request."""
        return self.compression if self.device_fraction is None else self.device_fraction


def summarize(records: Iterable[Record]) -> dict[Group, list[Row]]:
    """Rows per group, groups sorted, rows with full KV first, then by policy and budget."""
    cells: dict[Group, dict[tuple[str, float], list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[(r.model, r.protocol, r.context_length)][(r.policy, r.compression)].append(r)
    out: dict[Group, list[Row]] = {}
    for group in sorted(cells):
        rows = [_row(policy, compression, rs) for (policy, compression), rs in cells[group].items()]
        out[group] = sorted(rows, key=lambda row: (row.policy != FULL_POLICY, row.policy, -row.compression))
    return out


def _row(policy: str, compression: float, records: list[Record]) -> Row:
    weighted: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # task -> [sum, samples]
    for r in records:
        weighted[r.task][0] += r.score * r.samples
        weighted[r.task][1] += r.samples
    device, full = sum(r.kv_bytes_device for r in records), sum(r.kv_bytes_full for r in records)
    return Row(
        policy=policy, compression=compression, scores={t: s / n for t, (s, n) in weighted.items()},
        device_fraction=device / full if full else None, recalls=sum(r.recalls for r in records),
    )  # fmt: skip


def _tasks(rows: list[Row]) -> list[str]:
    # built-in tasks in their registry order, then any others by name
    present = {t for row in rows for t in row.scores}
    builtin = [t for t in BUILTIN_TASKS if t in present]
    return builtin + sorted(present - set(builtin))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def print_table(records: Iterable[Record], console: Console) -> None:
    """One rich table per (model, protocol, context length); scores are percentages."""
    groups = summarize(records)
    if not groups:
        console.print("[dim]no results[/dim]")
        return
    for (model, protocol, length), rows in groups.items():
        title = f"{protocol} · {length} tokens · {model}"
        table = _policy_rows(title, rows)  # too wide for the terminal: turned, a column per policy
        if console.measure(table, options=console.options.update_width(10_000)).maximum > console.width:
            table = _task_rows(title, rows)
        console.print(table)
    console.print("[dim]scores in %, mean over samples (and seeds); KV on device = device / full KV bytes[/dim]")


def _cells(rows: list[Row], task: str) -> list[str]:
    """Each row's score on ``task`` in %, the best in bold green."""
    best = max(row.scores.get(task, -1.0) for row in rows)
    return [f"[bold green]{_pct(row.scores[task])}[/]" if row.scores.get(task) == best else _pct(row.scores.get(task))
            for row in rows]  # fmt: skip


def _policy_rows(title: str, rows: list[Row]) -> Table:
    """A row per policy and budget, a column per task."""
    tasks = _tasks(rows)
    show_recalls = any(row.recalls for row in rows)
    table = Table(title=title, title_justify="left")
    table.add_column("policy")
    table.add_column("budget", justify="right")
    table.add_column("KV on device", justify="right")
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right", style="bold")
    if show_recalls:
        table.add_column("recalls", justify="right")
    by_task = [_cells(rows, t) for t in tasks]
    for i, row in enumerate(rows):
        extra = [str(row.recalls)] if show_recalls else []
        style = "dim" if row.policy == FULL_POLICY else None
        table.add_row(row.policy, f"{row.compression:g}", _pct(row.device_fraction), *(c[i] for c in by_task),
                      _pct(row.mean), *extra, style=style)  # fmt: skip
    return table


def _task_rows(title: str, rows: list[Row]) -> Table:
    """The same numbers turned: a row per task, a column per policy and budget (narrow terminals)."""
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    for row in rows:
        table.add_column(f"{row.policy}\n{row.compression:g}", justify="right",
                         style="dim" if row.policy == FULL_POLICY else None)  # fmt: skip
    for task in _tasks(rows):
        table.add_row(task, *_cells(rows, task))
    table.add_row("mean", *(f"[bold]{_pct(row.mean)}[/]" for row in rows), end_section=True)
    table.add_row("KV on device", *(_pct(row.device_fraction) for row in rows))
    if any(row.recalls for row in rows):
        table.add_row("recalls", *(str(row.recalls) for row in rows))
    return table


def markdown_table(records: Iterable[Record]) -> str:
    """The same tables as ``print_table``, as Markdown (for READMEs and issue notes)."""
    lines: list[str] = []
    for (model, protocol, length), rows in summarize(records).items():
        tasks = _tasks(rows)
        lines += [f"**{protocol}**, {length} tokens, {model} (scores in %)", ""]
        lines.append("| policy | budget | KV on device | " + " | ".join(tasks) + " | mean | recalls |")
        lines.append("|---|---|---|" + "---|" * len(tasks) + "---|---|")
        for row in rows:
            cells = [_pct(row.scores.get(t)) for t in tasks]
            lines.append(
                f"| {row.policy} | {row.compression:g} | {_pct(row.device_fraction)} | " + " | ".join(cells)
                + f" | {_pct(row.mean)} | {row.recalls} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(records: Iterable[Record], path: str | os.PathLike[str]) -> list[Path]:
    """Score against device KV fraction, one line per policy, one panel per group; PNG.

    Writes ``path`` (mean over tasks) and, when there are several tasks, ``<stem>_tasks.png``
    beside it (one panel per task and group). Full KV is a dashed horizontal reference.
    Returns the paths written.
    """
    from matplotlib.figure import Figure  # heavy and optional: imported only to plot

    groups = summarize(records)
    if not groups:
        raise ValueError("no records to plot")
    path = Path(path)
    policies = sorted({row.policy for rows in groups.values() for row in rows} - {FULL_POLICY})
    colors = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    written = [path]

    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for ax, (group, rows) in zip(axes, groups.items()):
        _panel(ax, rows, lambda row: row.mean, colors)
        ax.set_title(_group_title(group))
        ax.set_xlabel("KV cache on the device (fraction of full)")
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("score (mean over tasks)")
    fig.suptitle("Accuracy against device KV budget", fontweight="bold")
    _legend(fig, axes)
    fig.savefig(path, dpi=130)

    tasks = _tasks([row for rows in groups.values() for row in rows])
    if len(tasks) > 1:
        written.append(_plot_tasks(groups, tasks, colors, path.with_name(f"{path.stem}_tasks{path.suffix or '.png'}")))
    return written


def _plot_tasks(groups: dict[Group, list[Row]], tasks: list[str], colors: dict[str, str], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(tasks), 2.8 * len(groups) + 0.8), layout="constrained")
    axes = fig.subplots(len(groups), len(tasks), squeeze=False, sharex=True, sharey=True)
    for r, (group, rows) in enumerate(groups.items()):
        for c, task in enumerate(tasks):
            ax = axes[r, c]
            _panel(ax, [row for row in rows if task in row.scores], lambda row, t=task: row.scores[t], colors)
            if r == 0:
                ax.set_title(task, fontweight="bold")
            if c == 0:
                ax.set_ylabel(f"{_group_title(group)}\nscore", fontsize="small")
            if r == len(groups) - 1:
                ax.set_xlabel("KV on device")
    fig.suptitle("Accuracy per task against device KV budget", fontweight="bold")
    _legend(fig, axes.ravel())
    fig.savefig(path, dpi=110)
    return path


def _panel(ax: Any, rows: list[Row], value: Any, colors: dict[str, str]) -> None:
    """One axes: a line per policy over its budgets, full KV as a dashed horizontal line."""
    by_policy: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_policy[row.policy].append(row)
    for row in by_policy.pop(FULL_POLICY, []):
        ax.axhline(value(row), color="0.3", linestyle="--", linewidth=1.2, label="full KV", zorder=1)
        ax.plot([row.x], [value(row)], marker="*", markersize=9, color="0.3", zorder=3)
    for policy, prow in sorted(by_policy.items()):
        prow.sort(key=lambda row: row.x)
        ax.plot(
            [row.x for row in prow], [value(row) for row in prow], marker="o", markersize=4, linewidth=1.6,
            color=colors[policy], label=policy, zorder=2,
        )  # fmt: skip
    ax.set_xlim(0.0, 1.05)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)


def _legend(fig: Any, axes: Iterable[Any]) -> None:
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), 6))


def _group_title(group: Group) -> str:
    model, protocol, length = group
    short = model if len(model) <= 40 else "…" + model[-39:]
    return f"{protocol} · {length:,} tokens\n{short}"
