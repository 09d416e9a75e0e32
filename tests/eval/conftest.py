"""Fixtures for the eval tests; importable helpers live in ``eval_helpers``."""

from __future__ import annotations

import pytest

from hcpolicy.eval import BUILTIN_TASKS, TASKS, Task


@pytest.fixture(params=BUILTIN_TASKS)
def task(request: pytest.FixtureRequest) -> Task:
    """Every built-in task, with its default settings."""
    return TASKS.get(request.param)()
