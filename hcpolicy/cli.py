"""The ``hc`` command line."""

from __future__ import annotations

import inspect

import attrs
import typer
from rich.console import Console
from rich.table import Table

from hcpolicy import __version__
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


if __name__ == "__main__":
    app()
