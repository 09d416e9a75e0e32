"""Calibration text for profiling: generated locally, never downloaded.

Plain filler prose from the same generator as the task haystacks, under seeds the tasks
never use, so a profile is not measured on evaluation samples.
"""

from __future__ import annotations

from collections.abc import Callable

from hcpolicy.eval.haystack import Haystack

CALIBRATION_SEED_BASE = 1_000_003  # far from the task seeds (0, 1, 2, ...)


def calibration_texts(samples: int, tokens: int, count_tokens: Callable[[str], int], *, seed: int = 0) -> list[str]:
    """``samples`` documents of at least ``tokens`` tokens each."""
    if samples < 1 or tokens < 2:
        raise ValueError(f"need samples >= 1 and tokens >= 2, got {samples} and {tokens}")
    texts = []
    for i in range(samples):
        stack = Haystack(CALIBRATION_SEED_BASE + 7919 * seed + i)
        n = max(8, tokens // 12)  # filler sentences run ~12-20 tokens: start short, then grow
        text = stack.document(n).text
        while count_tokens(text) < tokens:
            n = int(n * 1.3) + 1
            text = stack.document(n).text
        texts.append(text)
    return texts
