"""`hc` error handling: bad input ends with one line and a non-zero exit, never a traceback."""

import pytest
from typer.testing import CliRunner

from hcpolicy.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args, message", [
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--compression", "0.5,1.5"], "(0, 1]"),
    (["--compression", "half"], "comma list of numbers"),
    (["--protocol", "sideways"], "unknown protocol"),
    (["--backend", "vllm"], "unknown backend 'vllm'"),
    (["--profile", "/nonexistent/p.json"], "no profile at"),
    (["--model", "/nonexistent/model"], "no model folder at /nonexistent/model"),
    (["--model", "/nonexistent/m.gguf"], "no GGUF file"),
])  # fmt: skip
def test_evaluate_rejects_bad_input_in_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["evaluate", "--output-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0  # one line


def test_list_runs():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "heterocache" in result.output and "hf" in result.output
