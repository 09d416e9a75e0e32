"""SGLang tests run against the real sglang 0.5.23 classes on the CPU.

Two packages SGLang imports but never runs on these paths have no CPU build on PyPI
(torchvision, vllm); import-only stand-ins for them live in ``stubs/`` and are put at the
end of ``sys.path`` here, so a real installation always wins.
"""

import importlib.util
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parent / "stubs"

if any(importlib.util.find_spec(name) is None for name in ("torchvision", "vllm")):
    sys.path.append(str(STUBS))
