"""Evaluation: synthetic long-context tasks, scoring, a resumable results store, reports.

``TASKS`` names the built-in tasks (RULER-style NIAH variants, ``vt``, ``cwe`` and
``drift``); ``ResultStore`` keeps one ``Record`` per evaluated cell; ``hcpolicy.eval.report``
prints tables and draws plots (matplotlib is imported only when plotting).
"""

from hcpolicy.eval.results import Cell, Record, ResultStore
from hcpolicy.eval.tasks import BUILTIN_TASKS, TASKS, Sample, Task, fit_length, ordered_match, string_match, tolerance

__all__ = [
    "BUILTIN_TASKS",
    "TASKS",
    "Cell",
    "Record",
    "ResultStore",
    "Sample",
    "Task",
    "fit_length",
    "ordered_match",
    "string_match",
    "tolerance",
]
