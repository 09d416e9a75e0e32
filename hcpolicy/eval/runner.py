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
        self, samples: Sequence[Sample], protocol: str, policies: Mapping[str, Policy | None], *,
        on_policy_done: Callable[[str], None] | None = None,
    ) -> Mapping[str, Sequence[GenerationResult]]:
        """Every sample under every policy (label -> policy); ``on_policy_done(label)`` after
        each policy's generations, so a caller can report progress within a batch."""
        ...


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


@attrs.frozen
class Pending:
    """The cells of one task and protocol that a run still has to score."""

    task: str
    protocol: str
    labels: tuple[str, ...]


def pending(plan: EvalPlan, model: str, store: ResultStore, labels: Sequence[str]) -> tuple[list[Pending], list[Cell]]:
    """(what is left to run, the finished cells a re-run skips) for policy ``labels``."""
    todo, done = [], []
    for task in plan.tasks:
        for protocol in plan.protocols:
            left = []
            for label in labels:
                cell = _cell(plan, model, task, protocol, *_split(label))
                if store.has(cell):
                    done.append(cell)
                else:
                    left.append(label)
            if left:
                todo.append(Pending(task, protocol, tuple(left)))
    return todo, done


def run(
    plan: EvalPlan,
    generator: Generator,
    factory: PolicyFactory,
    store: ResultStore,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[Record], list[Skipped]]:
    """Run every unfinished cell of ``plan``; returns (new records, refused policy cells).

    ``progress(label, done, total)`` counts sample runs (one sample under one policy) over the
    whole run: it is called before the first generation and after every policy of every batch.
    """
    policies, skipped = build_policies(plan, factory)
    todo, _ = pending(plan, generator.model_name, store, list(policies))
    total = sum(len(p.labels) for p in todo) * plan.samples
    done = 0
    new: list[Record] = []
    for item in todo:
        task = TASKS.get(item.task)()
        cells = {label: policies[label] for label in item.labels}
        samples = make_samples(task, item.task, plan, generator.count_tokens)
        sums: dict[str, dict[str, Any]] = {label: _zero() for label in cells}
        if progress is not None:
            progress(f"{item.task} / {item.protocol}", done, total)
        for start in range(0, len(samples), plan.batch_size):
            batch = samples[start : start + plan.batch_size]

            def tick(label: str, size: int = len(batch)) -> None:
                nonlocal done
                done += size
                if progress is not None:
                    progress(f"{item.task} / {item.protocol} / {label}", done, total)

            results = generator.generate(batch, item.protocol, cells, on_policy_done=tick)
            for label, gens in results.items():
                _accumulate(sums[label], task, batch, gens)
        for label, acc in sums.items():
            new.append(_record(plan, generator.model_name, item, label, acc))
            store.add(new[-1])  # rewrites results.json/csv atomically, cell by cell
    return new, skipped


def _record(plan: EvalPlan, model: str, item: Pending, label: str, acc: dict[str, Any]) -> Record:
    policy, compression = _split(label)
    scores = acc["scores"]
    return Record(
        task=item.task, policy=policy, compression=compression, context_length=plan.context_length,
        samples=len(scores), score=sum(scores) / len(scores), sample_scores=scores,
        kv_bytes_device=int(acc["kv_bytes_device"]), kv_bytes_full=int(acc["kv_bytes_full"]),
        host_bytes=int(acc["host_bytes"]), recalls=int(acc["recalls"]), protocol=item.protocol,
        model=model, seed=plan.seed,
    )  # fmt: skip


def build_policies(plan: EvalPlan, factory: PolicyFactory) -> tuple[dict[str, Policy | None], list[Skipped]]:
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


def _cell(plan: EvalPlan, model: str, task: str, protocol: str, policy: str, compression: float) -> Cell:
    return Cell(
        task=task, policy=policy, compression=compression, context_length=plan.context_length,
        protocol=protocol, model=model, seed=plan.seed, samples=plan.samples,
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

