"""`hc list` reads registered classes from source: the same text as the imported classes give."""

import pytest

from hcpolicy.describe import describe, describe_class
from hcpolicy.eval.tasks import TASKS
from hcpolicy.registry import BACKENDS, POLICIES

BUILTINS = [(r, n) for r in (POLICIES, TASKS, BACKENDS) for n in r.names()]


def lazy_path(registry, name):
    """The ``module:attr`` path, also once an earlier test has resolved the entry."""
    item = registry._items[name]
    return item if isinstance(item, str) else f"{item.__module__}:{item.__qualname__}"


@pytest.mark.parametrize("registry, name", BUILTINS, ids=[f"{r.kind}-{n}" for r, n in BUILTINS])
def test_source_reading_matches_the_imported_class(registry, name):
    from_source = describe(lazy_path(registry, name))
    assert from_source is not None, f"{name}: its source is no longer readable without importing it"
    if registry is BACKENDS and name != "sglang":
        pytest.importorskip("transformers")
    assert from_source == describe_class(registry.get(name))


def test_factory_defaults_show_their_values():
    options = describe(lazy_path(POLICIES, "heterocache")).options
    assert "refresh=True" in options and "prefill_window=32" in options and "<lambda>" not in options
    assert "profile (required)" in options


def test_unreadable_source_gives_none():
    assert describe("hcpolicy.nowhere:Nothing") is None
    assert describe("hcpolicy.registry:Missing") is None
