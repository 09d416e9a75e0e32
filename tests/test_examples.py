"""Every example runs as a script and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_custom_policy_example():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_policy.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"layer (\d) head (\d): kept\s+(\d+)/32", done.stdout)
    assert len(rows) == 4  # 2 layers x 2 KV heads
    for layer in ("0", "1"):
        kept = [int(n) for lay, _, n in rows if lay == layer]
        assert sum(kept) == 2 * 8  # Ada moves budget between heads; the layer total is 2 * 0.25 * 32
    assert re.search(r"device KV fraction: 0\.250\b", done.stdout), done.stdout


def test_engine_generate_example_is_the_readme_snippet():
    """examples/engine_generate.py is the README's engine snippet, which tests/test_readme.py
    runs (and checks its device and host byte counts)."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = (EXAMPLES / "engine_generate.py").read_text()
    assert code[code.index("from transformers") :] in readme  # the README shows this file's code
