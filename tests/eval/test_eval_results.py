import csv
import json
import os

import pytest

from hcpolicy.eval import Cell, Record, ResultStore


def record(task="niah_single", policy="snapkv", compression=0.25, score=0.5, seed=0, **kw) -> Record:
    fields = dict(
        task=task, policy=policy, compression=compression, context_length=2048, samples=4, score=score,
        kv_bytes_device=250, kv_bytes_full=1000, host_bytes=750, recalls=3, protocol="query-aware",
        model="smollm2", seed=seed,
    )  # fmt: skip
    return Record(**{**fields, **kw})


def test_record_validation():
    with pytest.raises(ValueError, match="score"):
        record(score=1.5)
    with pytest.raises(ValueError, match="compression"):
        record(compression=0.0)
    with pytest.raises(ValueError, match="kv_bytes_device"):
        record(kv_bytes_device=-1)
    with pytest.raises(ValueError, match="sample_scores"):
        record(sample_scores=(1.0, 0.0))
    with pytest.raises(ValueError, match="policy"):
        record(policy="")
    assert record().device_fraction == 0.25 and record(kv_bytes_full=0).device_fraction is None


def test_cells_compare_budgets_after_rounding():
    assert record(compression=0.1 + 0.2).cell == record(compression=0.3).cell
    assert record(compression=0.3).cell != record(compression=0.31).cell
    assert record(seed=1).cell != record().cell


def test_round_trip(tmp_path):
    store = ResultStore(tmp_path / "out")
    a = record(sample_scores=(1.0, 0.0, 0.5, 0.5), extra={"elapsed_s": 3.2, "settings": {"k": 2}})
    b = record(task="drift", policy="full", compression=1.0, score=1.0, kv_bytes_device=1000)
    store.add(a)
    store.add(b)
    again = ResultStore(tmp_path / "out")
    assert again.records == [a, b]
    assert again.has(a.cell) and again.get(b.cell) == b
    assert not again.has(record(task="vt").cell)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["task"] for r in rows] == ["niah_single", "drift"]
    assert float(rows[0]["device_fraction"]) == 0.25 and json.loads(rows[0]["extra"])["settings"] == {"k": 2}
    assert json.loads(rows[0]["sample_scores"]) == [1.0, 0.0, 0.5, 0.5]


def _run(store: ResultStore, cells: list[Record], evaluate) -> int:
    """What a runner does: skip finished cells, evaluate and store the others."""
    ran = 0
    for cell in cells:
        if not store.has(cell.cell):
            store.add(evaluate(cell))
            ran += 1
    return ran


def test_rerun_skips_finished_cells(tmp_path):
    grid = [record(task=t, compression=c) for t in ("niah_single", "vt", "cwe") for c in (0.1, 0.5)]
    calls = []

    def flaky(cell: Record) -> Record:
        calls.append(cell.cell)
        if len(calls) == 4:
            raise KeyboardInterrupt  # interrupted in the fourth cell
        return cell

    with pytest.raises(KeyboardInterrupt):
        _run(ResultStore(tmp_path), grid, flaky)
    assert len(json.loads((tmp_path / "results.json").read_text())) == 3  # saved after every cell
    calls.clear()
    assert _run(ResultStore(tmp_path), grid, lambda c: c) == 3
    assert _run(ResultStore(tmp_path), grid, lambda c: c) == 0
    assert len(ResultStore(tmp_path)) == 6


def test_adding_a_finished_cell_replaces_it(tmp_path):
    store = ResultStore(tmp_path)
    store.add(record(score=0.25))
    store.add(record(score=0.75))
    assert [r.score for r in ResultStore(tmp_path).records] == [0.75]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.add(record())
    before = (tmp_path / "results.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.add(record(task="vt"))
    assert (tmp_path / "results.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]  # no temp files left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_results_files_get_the_mode_open_would_give(tmp_path, umask):
    previous = os.umask(umask)
    try:
        ResultStore(tmp_path).add(record())
    finally:
        os.umask(previous)
    for name in ("results.json", "results.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_bad_results_files_are_reported(tmp_path):
    (tmp_path / "results.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="JSON list"):
        ResultStore(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps([{**record().to_dict(), "colour": "red"}]))
    with pytest.raises(ValueError, match="record 0 .*colour"):
        ResultStore(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps([{**record().to_dict(), "score": 2}]))
    with pytest.raises(ValueError, match="record 0 .*score"):
        ResultStore(tmp_path)


def test_cell_validation():
    with pytest.raises(ValueError, match="samples"):
        Cell("t", "p", 0.5, 100, "proto", "m", 0, 0)
