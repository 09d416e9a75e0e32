"""`hc evaluate` / `hc profile` end to end on a tiny model saved to disk."""

import json

import pytest
from typer.testing import CliRunner

from hcpolicy.cli import app
from hcpolicy.classify import build_profile
from hcpolicy.spec import ModelSpec

from hf_helpers import tiny_model
import torch

tokenizers = pytest.importorskip("tokenizers")


def word_tokenizer():
    """Whitespace words; digits and a few words get ids, everything else is [UNK] (ids < 96)."""
    from transformers import PreTrainedTokenizerFast

    words = [str(d) for d in range(10)] + ["the", "is", "magic", "number", "special", "for", "What", "~"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]", eos_token="~")

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_context_over_the_model_limit(model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the limit is read from config.json, before the model loads")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    result = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--context-length", "5000",
                                 "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "exceeds the model's limit of 1024 tokens" in result.output


def test_a_run_with_no_records_says_so_in_one_line(model_dir, tmp_path, monkeypatch):
    """Refusals the pre-load check cannot see (here: switched off) end the run in one line."""
    import hcpolicy.cli

    spec = ModelSpec("LlamaForCausalLM", 2, 4, 2, 16, max_position=1024)
    adj = torch.zeros(2, 2, 2, dtype=torch.bool)
    path = build_profile(spec, torch.tensor([[0.7, 0.1], [0.1, 0.1]]), adj, tau_stable=0.5).save(tmp_path / "p.json")
    monkeypatch.setattr(hcpolicy.cli, "check_something_runs", lambda plan, factory: None)
    result = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--policy", "heterocache", "--profile",
                                 str(path), "--compression", "0.2", "--task", "niah_single", "--context-length",
                                 "300", "--samples", "1", "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2, result.output
    # the loading line aside (transformers' own bars are off), the run prints one line
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("error: nothing ran, so there is nothing to report: "
                                                   "heterocache refused --compression 0.2")  # fmt: skip


def test_profile_for_another_model(model_dir, tmp_path):
    other = ModelSpec("LlamaForCausalLM", 3, 4, 2, 16)
    adj = torch.zeros(3, 2, 2, dtype=torch.bool)
    adj[:, 0, 1] = True
    path = build_profile(other, torch.full((3, 2), 0.7), adj, tau_stable=0.5).save(tmp_path / "p.json")
    result = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--profile", str(path), "--context-length", "300",
                                 "--output-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2
    assert "does not match this model" in result.output and "num_layers" in result.output


def test_profile_then_evaluate(model_dir, tmp_path, monkeypatch):
    profile = tmp_path / "tiny.json"
    result = runner.invoke(app, ["profile", "--model", str(model_dir), "--output", str(profile), "--tokens", "300",
                                 "--samples", "2", "--steps", "6", "--top-k", "0.2", "--tau-stable", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    # a random model attends almost uniformly: tau_stable = 0 makes its unique heads anchors
    assert "anchor" in result.output and "satellite" in result.output
    data = json.loads(profile.read_text())
    assert data["fingerprint"]["num_layers"] == 2 and data["settings"]["steps"] == 6
    out = tmp_path / "run"
    args = ["evaluate", "--model", str(model_dir), "--policy", "full,snapkv", "--compression", "0.5",
            "--task", "niah_single", "--context-length", "400", "--samples", "2", "--output-dir", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert {(r["policy"], r["protocol"]) for r in records} == {
        (p, q) for p in ("full", "snapkv") for q in ("agnostic", "aware")
    }
    snap = [r for r in records if r["policy"] == "snapkv"]
    assert all(abs(r["kv_bytes_device"] / r["kv_bytes_full"] - 0.5) < 0.02 for r in snap)
    assert (out / "results.csv").is_file() and (out / "scores.png").is_file()
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("every cell is in the results already: the model is not needed")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    again = runner.invoke(app, args)  # finished cells are skipped: nothing new is appended, nothing loads
    assert again.exit_code == 0, again.output
    assert "skipping 4 cells already in" in again.output and "loading" not in again.output
    assert len(json.loads((out / "results.json").read_text())) == len(records)
    more = runner.invoke(app, args + ["--compression", "0.4,0.5"])  # snapkv at 0.4 is new: it needs the model
    assert isinstance(more.exception, AssertionError) and "skipping 4 cells" in more.output
