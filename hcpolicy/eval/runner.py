"""The evaluation loop, backend-agnostic: tasks x protocols x batches, every policy cell per
batch, one prefill per batch shared by all policies, finished cells skipped on re-runs.

A backend provides a ``Generator`` (e.g. ``hcpolicy.backends.hf.evaluate``); policies are
built by name through a ``PolicyFactory`` so the CLI, tests and scripts share one path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from hcpolicy._validate import positive
from hcpolicy.eval.results import Cell, Record, ResultStore
from hcpolicy.eval.tasks import TASKS, Sample, Task
from hcpolicy.policy.base import Policy

FULL = "full"


class GenerationResult(Protocol):
    text: str
    kv_bytes_device: int
    kv_bytes_full: int
    host_bytes: int
    recalls: int


class Generator(Protocol):
    """What a backend's evaluator offers the loop."""

    model_name: str

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self, samples: Sequence[Sample], protocol: str, policies: Mapping[str, Policy | None]
    ) -> Mapping[str, Sequence[GenerationResult]]: ...


PolicyFactory = Callable[[str, float], Policy | None]


def _names(value: Sequence[str]) -> tuple[str, ...]:
    names = tuple(value)
    if not names:
        raise ValueError("at least one name is needed")
    return names


def _compressions(value: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(c) for c in value)
    bad = [c for c in out if not 0.0 < c <= 1.0]
    if bad or not out:
        raise ValueError(f"compression must be a fraction of the full KV in (0, 1], got {bad or 'nothing'}")
    return out


@attrs.frozen(kw_only=True)
class EvalPlan:
    """What to run. ``full`` is run once per task and protocol, at compression 1."""

    policies: tuple[str, ...] = attrs.field(converter=_names)
    compressions: tuple[float, ...] = attrs.field(converter=_compressions)
    tasks: tuple[str, ...] = attrs.field(converter=_names)
    protocols: tuple[str, ...] = attrs.field(converter=_names)
    context_length: int = attrs.field(validator=positive)
    samples: int = attrs.field(validator=positive)
    seed: int = 0
    batch_size: int = attrs.field(default=4, validator=positive)

    def cells(self, model: str) -> list[tuple[str, str, str, float]]:
        """(task, protocol, policy, compression) of every cell, in run order."""
        out = []
        for task in self.tasks:
            for protocol in self.protocols:
                for policy in self.policies:
                    for c in (1.0,) if policy == FULL else self.compressions:
                        out.append((task, protocol, policy, c))
        return out


@attrs.define
class Skipped:
    policy: str
    compression: float
    reason: str


def make_samples(task: Task, name: str, plan: EvalPlan, count_tokens: Callable[[str], int]) -> list[Sample]:
    """The plan's samples of one task; sample i depends only on (seed, task, i)."""
    return [
        task.make(random.Random(f"{plan.seed}:{name}:{i}"), plan.context_length, count_tokens)
        for i in range(plan.samples)
    ]


def run(
    plan: EvalPlan,
    generator: Generator,
    factory: PolicyFactory,
    store: ResultStore,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[Record], list[Skipped]]:
    """Run every unfinished cell of ``plan``; returns (new records, refused policy cells)."""
    policies, skipped = _build_policies(plan, factory)
    new: list[Record] = []
    for task_name in plan.tasks:
        task = TASKS.get(task_name)()
        for protocol in plan.protocols:
            todo = {
                label: p for label, p in policies.items()
                if not store.has(_cell(plan, generator, task_name, protocol, *_split(label)))
            }  # fmt: skip
            if not todo:
                continue
            samples = make_samples(task, task_name, plan, generator.count_tokens)
            sums: dict[str, dict[str, Any]] = {label: _zero() for label in todo}
            for start in range(0, len(samples), plan.batch_size):
                batch = samples[start : start + plan.batch_size]
                results = generator.generate(batch, protocol, todo)
                for label, gens in results.items():
                    _accumulate(sums[label], task, batch, gens)
                if progress is not None:
                    progress(f"{task_name} / {protocol}", min(start + len(batch), len(samples)), len(samples))
            for label, acc in sums.items():
                policy, compression = _split(label)
                record = Record(
                    task=task_name, policy=policy, compression=compression, context_length=plan.context_length,
                    samples=len(samples), score=sum(acc["scores"]) / len(samples), sample_scores=acc["scores"],
                    kv_bytes_device=int(acc["kv_bytes_device"]), kv_bytes_full=int(acc["kv_bytes_full"]),
                    host_bytes=int(acc["host_bytes"]), recalls=int(acc["recalls"]), protocol=protocol,
                    model=generator.model_name, seed=plan.seed,
                )  # fmt: skip
                store.add(record)  # rewrites results.json/csv atomically, cell by cell
                new.append(record)
    return new, skipped


def _build_policies(plan: EvalPlan, factory: PolicyFactory) -> tuple[dict[str, Policy | None], list[Skipped]]:
    """Label -> policy for every (policy, compression); refusals (ValueError) are reported,
    not raised, so one policy's floor does not stop the others."""
    policies: dict[str, Policy | None] = {}
    skipped = []
    for name in plan.policies:
        for c in (1.0,) if name == FULL else plan.compressions:
            try:
                policies[_label(name, c)] = factory(name, c)
            except ValueError as err:
                skipped.append(Skipped(name, c, str(err)))
    return policies, skipped


def _label(policy: str, compression: float) -> str:
    return f"{policy}@{compression:g}"


def _split(label: str) -> tuple[str, float]:
    policy, _, c = label.rpartition("@")
    return policy, float(c)


def _cell(plan: EvalPlan, generator: Generator, task: str, protocol: str, policy: str, compression: float) -> Cell:
    return Cell(
        task=task, policy=policy, compression=compression, context_length=plan.context_length,
        protocol=protocol, model=generator.model_name, seed=plan.seed, samples=plan.samples,
    )  # fmt: skip


def _zero() -> dict[str, Any]:
    acc: dict[str, Any] = dict.fromkeys(("kv_bytes_device", "kv_bytes_full", "host_bytes", "recalls"), 0)
    acc["scores"] = []
    return acc


def _accumulate(acc: dict[str, Any], task: Task, batch: Sequence[Sample], gens: Sequence[Any]) -> None:
    for sample, gen in zip(batch, gens):
        acc["scores"].append(task.score(sample, gen.text))
        acc["kv_bytes_device"] += gen.kv_bytes_device
        acc["kv_bytes_full"] += gen.kv_bytes_full
        acc["host_bytes"] += gen.host_bytes
        acc["recalls"] += gen.recalls

