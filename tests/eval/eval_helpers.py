"""Token counters for task tests: stand-ins for a model tokenizer, cheap and deterministic."""

from __future__ import annotations

import math


def whitespace_tokens(text: str) -> int:
    return len(text.split())


def char4_tokens(text: str) -> int:
    """~4 characters per token, the usual rule of thumb for English BPE."""
    return math.ceil(len(text) / 4)


COUNTERS = {"ws": whitespace_tokens, "char4": char4_tokens}
