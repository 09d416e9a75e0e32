"""Running a kernel test script under Triton's interpreter (on CPU), in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_interpreted(script: str, timeout: int, unsupported: tuple[tuple[str, str], ...] = ()) -> Any:
    """Run ``script`` with TRITON_INTERPRET=1 (this folder and the repo on its path) and
    return what it printed after "RESULTS " (JSON). ``unsupported``: (text in stderr,
    reason) pairs that skip the test when a failing run printed that text; ``{triton}`` in
    a reason becomes triton's version."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    for text, reason in unsupported:
        if proc.returncode and text in proc.stderr:
            import triton

            pytest.skip(reason.format(triton=triton.__version__))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULTS ", 1)[1])
