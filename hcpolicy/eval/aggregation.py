"""``cwe``: common words extraction, an aggregation task over a long list of words."""

from __future__ import annotations

import math
import random
from typing import ClassVar

import attrs

from hcpolicy._validate import integer
from hcpolicy.eval import _words
from hcpolicy.eval.tasks import CountTokens, Sample, Task, fit_length

HEADER = (
    "Below is a long list of words separated by commas. A few of the words appear many "
    "times. Pay attention to which words appear most often."
)
MIN_COMMON_COUNT = 3  # a common word appears at least this often, other words once or more


def vocabulary() -> list[str]:
    """Single-word nouns and adjectives of the haystack lists, deduplicated, in a fixed order."""
    return sorted({w for w in _words.NOUNS + _words.ADJECTIVES if " " not in w})


@attrs.frozen(kw_only=True)
class CommonWords(Task):
    """A shuffled list of words in which ``num_common`` words make ``common_share`` of it.

    Every other word of the vocabulary appears about equally often, and always at least two
    times less than the rarest common word (checked), so the answer is unambiguous. The
    list length sets the context length: a common word appears ~``common_share * n /
    num_common`` times in a list of n words (RULER fixes the counts instead, which cannot
    fit short contexts).
    """

    name: ClassVar[str] = "cwe"
    num_common: int = attrs.field(default=5, validator=integer(1))
    common_share: float = attrs.field(default=0.3)
    max_new_tokens: int = attrs.field(default=32, validator=integer(1))

    @common_share.validator
    def _check_share(self, attribute: attrs.Attribute, value: float) -> None:
        if not 0.05 <= value <= 0.8:
            raise ValueError(f"{attribute.name} must be in [0.05, 0.8], got {value!r}")

    @num_common.validator
    def _check_common(self, attribute: attrs.Attribute, value: int) -> None:
        if value > 20:
            raise ValueError(f"{attribute.name} must be <= 20, got {value}")

    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        vocab = vocabulary()
        common = rng.sample(vocab, self.num_common)
        others = [w for w in vocab if w not in common]
        rng.shuffle(others)
        order_seed = rng.getrandbits(64)
        k = self.num_common

        def build(n: int) -> Sample:
            entries, counts = self._entries(n, common, others)
            random.Random(order_seed).shuffle(entries)  # same seed for every n: deterministic
            return Sample(
                task=self.name, context=HEADER + "\n\n" + ", ".join(entries) + ".",
                question=f"What are the {k} most common words in the list above?",
                answer_prefix=f"The {k} most common words in the list above are:",
                answers=tuple(common), max_new_tokens=self.max_new_tokens,
                metadata={"list_words": n, "common_count": counts[0], "other_count_max": counts[1]},
            )  # fmt: skip

        return fit_length(build, context_tokens, count_tokens, min_units=10 * k)

    def _entries(self, n: int, common: list[str], others: list[str]) -> tuple[list[str], tuple[int, int]]:
        """``n`` words: each common word ``per_common`` times, the rest cycling ``others``."""
        per_common = max(MIN_COMMON_COUNT, math.ceil(self.common_share * n / len(common)))
        rest = max(n - per_common * len(common), 0)
        per_other = math.ceil(rest / len(others))
        if per_common < 2 * per_other:
            raise RuntimeError(f"cwe: {n} words leave the common words too close to the others")
        return common * per_common + [others[i % len(others)] for i in range(rest)], (per_common, per_other)
