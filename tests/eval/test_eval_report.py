import io

import pytest
from rich.console import Console

from hcpolicy.eval import Record
from hcpolicy.eval.report import plot, print_table, summarize

PNG = b"\x89PNG\r\n\x1a\n"


def rec(task, policy, compression, score, protocol="query-aware", seed=0, samples=4, device=None) -> Record:
    full = 1000
    return Record(
        task=task, policy=policy, compression=compression, context_length=2048, samples=samples, score=score,
        kv_bytes_device=int(full * (compression if device is None else device)), kv_bytes_full=full,
        recalls=2 if policy == "heterocache" else 0, protocol=protocol, model="smollm2", seed=seed,
    )  # fmt: skip


def grid() -> list[Record]:
    out = []
    for protocol in ("query-aware", "query-agnostic"):
        for task, base in (("niah_single", 1.0), ("drift", 0.8)):
            out.append(rec(task, "full", 1.0, base, protocol))
            for c in (0.2, 0.5):
                out.append(rec(task, "snapkv", c, base * c, protocol))
                out.append(rec(task, "heterocache", c, base * (c + 0.25), protocol, device=max(c, 0.36)))
    return out


def render(records, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    print_table(records, console)
    return console.export_text()


def test_a_table_too_wide_for_the_terminal_turns_to_a_column_per_policy():
    assert "budget" in render(grid(), width=80)  # 78 columns wide: a row per policy
    narrow = render(grid(), width=72)
    assert "budget" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 72
    header = next(line for line in narrow.splitlines() if "heterocache" in line)
    assert header.count("heterocache") == 2 and "full" in header  # policies across the top
    rows = {line.strip("│ ").split()[0]: line for line in narrow.splitlines() if line.startswith("│")}
    assert {"niah_single", "drift", "mean", "KV", "recalls"} <= set(rows)
    assert "40.5" in rows["mean"] and "36.0" in rows["KV"]  # heterocache 0.2, as in the wide table


def test_table_has_a_row_per_policy_and_budget_and_a_column_per_task():
    text = render(grid())
    assert text.count("query-aware · 2048 tokens") == 1 and "query-agnostic · 2048 tokens" in text
    for header in ("policy", "budget", "KV on device", "niah_single", "drift", "mean", "recalls"):
        assert header in text
    lines = [line for line in text.splitlines() if "heterocache" in line and " 0.2 " in line]
    assert len(lines) == 2  # one per protocol
    # scores 45.0 and 36.0, mean 40.5; device fraction is the measured 0.36, not the 0.2 asked
    assert all(s in lines[0] for s in ("36.0", "45.0", "40.5"))
    full = next(line for line in text.splitlines() if line.strip("│ ").startswith("full"))
    assert "100.0" in full and "90.0" in full  # first row of its table: mean of 1.0 and 0.8


def test_seeds_average_weighted_by_samples():
    records = [rec("vt", "h2o", 0.5, 1.0, seed=0, samples=1), rec("vt", "h2o", 0.5, 0.0, seed=1, samples=3)]
    (rows,) = summarize(records).values()
    assert rows[0].scores == {"vt": 0.25}
    assert "25.0" in render(records)


def test_empty_table_says_so():
    assert "no results" in render([])


def test_plot_writes_pngs_with_content(tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image")
    paths = plot(grid(), tmp_path / "scores.png")
    assert [p.name for p in paths] == ["scores.png", "scores_tasks.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
        pixels = mpl_image.imread(path)[..., :3]
        colours = {tuple(px) for px in pixels.reshape(-1, 3)[::7].round(2).tolist()}
        assert len(colours) > 20  # lines, text and markers, not a blank canvas
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500


def test_plot_of_one_task_writes_one_file_and_no_records_fail(tmp_path):
    pytest.importorskip("matplotlib")
    one = [r for r in grid() if r.task == "drift"]
    assert [p.name for p in plot(one, tmp_path / "one.png")] == ["one.png"]
    with pytest.raises(ValueError, match="no records"):
        plot([], tmp_path / "none.png")


def test_markdown_table_lists_every_row():
    from hcpolicy.eval.report import markdown_table
    from hcpolicy.eval.results import Record

    def rec(policy, c, score, task="niah_single"):
        return Record(task=task, policy=policy, compression=c, context_length=100, samples=2, score=score,
                      kv_bytes_device=int(1000 * c), kv_bytes_full=1000, protocol="aware", model="m")  # fmt: skip

    text = markdown_table([rec("full", 1.0, 1.0), rec("snapkv", 0.5, 0.5), rec("snapkv", 0.5, 0.0, task="drift")])
    assert "| full | 1 | 100.0 |" in text
    assert "| snapkv | 0.5 | 50.0 | 50.0 | 0.0 | 25.0 | 0 |" in text
