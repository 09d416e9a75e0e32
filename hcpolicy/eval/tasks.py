"""Long-context tasks: the ``Sample`` record, the ``Task`` base class, scoring, the registry.

A task turns a seeded ``random.Random`` and a target length into one ``Sample``: a long
context, a question asked after it and the start of the answer, for completion mode (no
chat template). Built-in tasks are RULER-style and generated locally; third-party tasks
join through the ``hcpolicy.tasks`` entry-point group.

Length: ``count_tokens(sample.full_text())`` lands within ``tolerance(context_tokens)``
(= max(16 tokens, 2%)) of ``context_tokens``; ``fit_length`` does the search.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import attrs

from hcpolicy._validate import integer
from hcpolicy.registry import Registry

CountTokens = Callable[[str], int]

SEPARATOR = "\n\n"  # between the context and the question
TOLERANCE_TOKENS = 16
TOLERANCE_FRACTION = 0.02


def tolerance(context_tokens: int) -> int:
    """How far (in tokens) a generated prompt may land from its target length."""
    return max(TOLERANCE_TOKENS, int(TOLERANCE_FRACTION * context_tokens))


def _answers(value: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):  # a bare string would become a tuple of characters
        raise ValueError(f"answers must be a sequence of strings, got the string {value!r}")
    return tuple(value)


def _non_empty(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _check_answers(_inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(a, str) and a.strip() for a in value):
        raise ValueError(f"{attribute.name} must hold at least one non-empty string, got {value!r}")


@attrs.frozen
class Sample:
    """One prompt and its expected answers.

    The prompt is ``full_text()``: the context, a blank line, the question, a newline and
    ``answer_prefix`` (no trailing space: the model's first token carries the space).
    ``metadata`` holds what a task wants reported (needle depths, character spans of the
    needles in ``context``, the measured length, ...); it is plain JSON-able data.
    """

    task: str = attrs.field(validator=_non_empty)
    context: str = attrs.field(validator=_non_empty)
    question: str = attrs.field(validator=_non_empty)
    answer_prefix: str = attrs.field(validator=_non_empty)
    answers: tuple[str, ...] = attrs.field(converter=_answers, validator=_check_answers)
    max_new_tokens: int = attrs.field(validator=integer(1))
    metadata: dict[str, Any] = attrs.field(factory=dict, converter=dict)

    def query_text(self) -> str:
        """What follows the context: ``context + query_text() == full_text()``.

        For protocols that prefill (and compress) the context before the question is seen.
        """
        return SEPARATOR + self.question + "\n" + self.answer_prefix

    def full_text(self) -> str:
        return self.context + self.query_text()


def _pattern(answer: str) -> re.Pattern[str]:
    # a match must not sit inside a longer word or number: "4821" is not found in "48213"
    return re.compile(r"(?<![0-9a-z])" + re.escape(answer.lower()) + r"(?![0-9a-z])")


def string_match(answers: Sequence[str], prediction: str) -> float:
    """Fraction of ``answers`` found in ``prediction``, case-insensitively, as whole words.

    RULER's ``string_match_all``, except that an answer inside a longer alphanumeric run
    does not count (RULER's plain substring test would credit "4821" in "48213").
    """
    text = prediction.lower()
    return sum(1 for a in answers if _pattern(a).search(text)) / len(answers)


def ordered_match(answers: Sequence[str], prediction: str) -> float:
    """How much of ``answers`` appears in ``prediction`` in the right order, in [0, 1].

    Each answer is located at its first whole-word occurrence; the answers found, read in
    the prediction's order, are matched against the expected order by longest common
    subsequence; score = LCS length / len(answers). Missing answers and each displaced one
    cost 1/len(answers); numbers that are not answers cost nothing.
    """
    text = prediction.lower()
    found: list[tuple[int, int]] = []  # (position in prediction, expected index)
    for index, answer in enumerate(answers):
        hit = _pattern(answer).search(text)
        if hit is not None:
            found.append((hit.start(), index))
    order = [index for _, index in sorted(found)]
    # expected indices are distinct and ascending, so LCS with them = longest increasing run
    return _longest_increasing(order) / len(answers)


def _longest_increasing(values: list[int]) -> int:
    best = [1] * len(values)
    for i in range(len(values)):
        for j in range(i):
            if values[j] < values[i]:
                best[i] = max(best[i], best[j] + 1)
    return max(best, default=0)


def fit_length(
    build: Callable[[int], Sample],
    context_tokens: int,
    count_tokens: CountTokens,
    *,
    min_units: int,
    probe_units: int = 16,
    max_calls: int = 16,
) -> Sample:
    """The ``build(n)`` (n >= min_units filler units) whose prompt is nearest ``context_tokens``.

    ``build`` must be deterministic and grow by about the same number of tokens per unit.
    A secant search: measure the minimum and a probe, step by the observed tokens per unit,
    keep a bracket around the target; typically 3-5 ``count_tokens`` calls. Raises
    ValueError (with the minimum) when even ``min_units`` is too long, RuntimeError when no
    unit count lands within ``tolerance(context_tokens)``.
    """
    measured: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in measured:
            measured[n] = count_tokens(build(n).full_text())
        return measured[n]

    floor = measure(min_units)
    if floor > context_tokens + tolerance(context_tokens):
        task = build(min_units).task
        raise ValueError(
            f"context_tokens={context_tokens} is too small for task {task!r}: its instructions, "
            f"needles, question and answer prefix need at least {floor} tokens"
        )
    lo, hi = min_units, None  # measure(lo) <= target < measure(hi)
    n = min_units + probe_units
    for _ in range(max_calls):
        tokens = measure(n)
        if tokens <= context_tokens:
            lo = max(lo, n)
        else:
            hi = n if hi is None else min(hi, n)
        per_unit = max((tokens - floor) / max(n - min_units, 1), 1e-3)
        if abs(tokens - context_tokens) <= per_unit / 2 or (hi is not None and hi - lo <= 1):
            break
        step = round((context_tokens - tokens) / per_unit) or (1 if tokens < context_tokens else -1)
        n = n + step
        if n <= lo or (hi is not None and n >= hi):  # left the bracket: bisect instead
            n = (lo + hi) // 2 if hi is not None else lo + 2 * max(lo - min_units, probe_units)
    best = min(measured, key=lambda k: (abs(measured[k] - context_tokens), k))
    sample = build(best)
    if abs(measured[best] - context_tokens) > tolerance(context_tokens):
        raise RuntimeError(
            f"task {sample.task!r}: no filler length lands within {tolerance(context_tokens)} "
            f"tokens of {context_tokens} (best {measured[best]}); is count_tokens deterministic?"
        )
    metadata = {**sample.metadata, "target_tokens": context_tokens, "prompt_tokens": measured[best]}
    return attrs.evolve(sample, metadata={**metadata, "filler_units": best})


class Task(ABC):
    """A generator of long-context samples; subclasses implement ``make``.

    Subclasses are attrs classes whose fields are the task's settings, and set ``name``.
    ``make`` should draw everything that defines the answer (keys, values, depths) from
    ``rng`` before any filler, so one seed asks the same question at every length.
    """

    name: ClassVar[str]

    @abstractmethod
    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        """One sample whose ``full_text()`` is within ``tolerance(context_tokens)`` tokens."""

    def score(self, sample: Sample, prediction: str) -> float:
        """Score in [0, 1] of ``prediction`` (the generated text after ``answer_prefix``)."""
        return string_match(sample.answers, prediction)

    def samples(self, seed: int, count: int, context_tokens: int, count_tokens: CountTokens) -> list[Sample]:
        """``count`` samples; sample i depends only on (name, seed, i), not on ``count``."""
        out = []
        for index in range(count):
            # str seeds hash with SHA-512: stable across processes and PYTHONHASHSEED
            sample = self.make(random.Random(f"{self.name}/{seed}/{index}"), context_tokens, count_tokens)
            out.append(attrs.evolve(sample, metadata={**sample.metadata, "seed": seed, "index": index}))
        return out


_BUILTINS = {
    "niah_single": "hcpolicy.eval.retrieval:NiahSingle",
    "niah_multikey": "hcpolicy.eval.retrieval:NiahMultiKey",
    "niah_multivalue": "hcpolicy.eval.retrieval:NiahMultiValue",
    "niah_multiquery": "hcpolicy.eval.retrieval:NiahMultiQuery",
    "vt": "hcpolicy.eval.tracing:VariableTracking",
    "cwe": "hcpolicy.eval.aggregation:CommonWords",
    "drift": "hcpolicy.eval.retrieval:OrderedNeedles",
}
BUILTIN_TASKS: tuple[str, ...] = tuple(_BUILTINS)  # the default task list, in report order
TASKS: Registry = Registry("task", "hcpolicy.tasks", builtins=_BUILTINS)
