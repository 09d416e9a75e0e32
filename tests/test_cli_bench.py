"""`hc bench` on CPU with the tiny config: a table, a JSON with floors, a PNG; bad input in one line."""

import json

import pytest
from typer.testing import CliRunner

from hcpolicy.cli import app

runner = CliRunner()
pytest.importorskip("matplotlib")


@pytest.mark.parametrize("backend", ["torch_engine", "hf"])
def test_bench_tiny_on_cpu(backend, tmp_path):
    if backend == "hf":
        pytest.importorskip("transformers")
    result = runner.invoke(app, ["bench", "--backend", backend, "--config", "tiny", "--context", "64,128",
                                 "--batch", "1", "--steps", "4", "--warmup", "6", "--device", "cpu",
                                 "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "heterocache" in result.output and "results:" in result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    assert {(r["policy"], r["context"]) for r in rows} == {(p, c) for p in ("full", "heterocache") for c in (64, 128)}
    for r in rows:
        assert r["ms_per_token"] > 0 and r["floor_ms"] > 0 and len(r["ms_all"]) == 10
    full = {r["context"]: r for r in rows if r["policy"] == "full"}
    hetero = {r["context"]: r for r in rows if r["policy"] == "heterocache"}
    assert hetero[128]["kv_bytes_read"] < full[128]["kv_bytes_read"]  # compression shows in the bytes read
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--backend", "sglang"], "torch_engine and hf"),
    (["--context", "1k"], "comma list of integers"),
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--config", "huge"], "unknown config preset"),
])  # fmt: skip
def test_bench_rejects_bad_input_in_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["bench", "--device", "cpu", "--config", "tiny", "--output-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
