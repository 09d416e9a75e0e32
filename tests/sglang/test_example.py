"""examples/sglang_plugin.py runs as a script and shows what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from sglang_helpers import STUBS  # (skips this module when sglang is not installed)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sglang_plugin.py"


def test_sglang_plugin_example():
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(STUBS)) if p)
    env = dict(os.environ, PYTHONPATH=path, HCPOLICY_POLICY="h2o", HCPOLICY_COMPRESSION="0.25")
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "load_plugins() ran entry point hcpolicy = hcpolicy.backends.sglang.plugin:register" in out
    assert "PolicyAttnBackend over TorchNativeAttnBackend, PolicyUnifiedRadixCache" in out
    before = re.search(r"before: row \d+ maps 64 positions to (\d+) live slots; allocator has (\d+) free", out)
    after = re.search(
        r"after: row \d+ maps 64 positions to (\d+) live slots; the request keeps (\d+) pages of head-major KV; "
        r"allocator has (\d+) free", out
    )  # fmt: skip
    assert before and after, out
    live, free = int(before[1]), int(before[2])
    left, pages, free_after = int(after[1]), int(after[2]), int(after[3])
    # 16 of 64 rows per head at 0.25: a page holds one row of each of the 2 KV heads: 16 pages
    assert live == 64 and left == 0 and pages == 16 and free_after == free + 64 - 16
    for layer in (0, 1):
        assert re.search(rf"layer {layer}: tokens each KV head sees: \[16, 16\] of 64", out)  # 0.25 * 64 per head
    assert re.search(r"the radix tree holds 0 uncompressed tokens", out)  # a compressed row never goes in
    assert re.search(r"after evicting the tree: (\d+) free slots \(started with \1\)", out)
