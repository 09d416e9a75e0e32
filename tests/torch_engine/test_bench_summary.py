"""The engine bench's per-kind step summary (``hcpolicy.bench.engine_decode.by_kind``)."""

import pytest

from hcpolicy.bench.engine_decode import by_kind


def step(kind: str, ms: float, host: float) -> dict:
    return {"kind": kind, "ms": ms, "host_ms": host}


def test_medians_ratios_and_host_times_per_kind():
    steps = [step("plain", 9.0, 0.2), step("plain", 10.0, 0.4), step("plain", 11.0, 0.3),
             step("recall", 12.0, 6.0), step("recall", 10.0, 4.0), step("landing", 9.9, 3.0)]  # fmt: skip
    out = by_kind(steps)
    assert set(out) == {"plain", "recall", "landing"}
    assert out["plain"] == {"n": 3, "median_ms": 10.0, "max_ms": 11.0, "median_over_plain": 1.0, "host_median_ms": 0.3}
    assert out["recall"]["median_ms"] == 11.0 and out["recall"]["median_over_plain"] == pytest.approx(1.1)
    assert out["recall"]["host_median_ms"] == 5.0 and out["landing"]["max_ms"] == 9.9


def test_without_plain_steps_there_is_no_ratio():
    out = by_kind([step("decision", 10.0, 0.5)])
    assert out["decision"]["median_over_plain"] is None and out["decision"]["n"] == 1
