"""Whether triton can be imported: the one check every kernel dispatcher asks."""

from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
