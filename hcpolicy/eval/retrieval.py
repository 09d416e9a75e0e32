"""Needle-in-a-haystack retrieval tasks, and ``drift``: needles to list in a given order.

Needles are "special magic numbers" bound to two-word keys (``quiet-lantern``), placed at
random depths of the filler prose. Every number is 5-7 digits and filler has no digits, so
a number in the prediction can only have come from a needle.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any, ClassVar

import attrs

from hcpolicy._validate import integer
from hcpolicy.eval import _words
from hcpolicy.eval.haystack import Haystack, Insert, spread_depths
from hcpolicy.eval.tasks import CountTokens, Sample, Task, fit_length, ordered_match

HEADER = (
    "A few special magic numbers are hidden in the text below. Read it carefully and "
    "remember them: you will be asked about them at the end."
)
MIN_FILLER = 2  # sentences: a haystack needs some hay


def _digits(_inst: Any, attribute: attrs.Attribute, value: tuple[int, int]) -> None:
    if len(value) != 2 or not 1 <= value[0] <= value[1] <= 12:
        raise ValueError(f"{attribute.name} must be (low, high) with 1 <= low <= high <= 12, got {value!r}")


def numbers(rng: random.Random, k: int, digits: tuple[int, int], exclude: Collection[str] = ()) -> list[str]:
    """``k`` distinct numbers of ``digits[0]``-``digits[1]`` digits, no leading zero."""
    out: list[str] = []
    while len(out) < k:
        width = rng.randint(*digits)
        value = str(rng.randrange(10 ** (width - 1), 10**width))
        if value not in out and value not in exclude:
            out.append(value)
    return out


def keys(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct keys such as ``quiet-lantern``."""
    nouns = [n for n in _words.NOUNS if " " not in n]
    out: list[str] = []
    while len(out) < k:
        key = f"{rng.choice(_words.ADJECTIVES)}-{rng.choice(nouns)}"
        if key not in out:
            out.append(key)
    return out


def haystack_sample(
    rng: random.Random,
    context_tokens: int,
    count_tokens: CountTokens,
    *,
    header: str,
    inserts: list[Insert],
    **fields: Any,
) -> Sample:
    """A ``Sample`` of filler prose holding ``inserts``, fitted to ``context_tokens``.

    ``fields`` are the remaining ``Sample`` fields (task, question, answer_prefix, ...).
    Call after drawing everything else from ``rng``: the filler seed is drawn last.
    """
    hay = Haystack(rng.getrandbits(64))
    metadata = {**fields.pop("metadata", {}), "depths": [i.depth for i in inserts]}

    def build(n: int) -> Sample:
        doc = hay.document(n, inserts, header=header)
        spans = [list(s) for s in doc.spans]
        return Sample(context=doc.text, metadata={**metadata, "needle_spans": spans}, **fields)

    return fit_length(build, context_tokens, count_tokens, min_units=MIN_FILLER)


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


@attrs.frozen(kw_only=True)
class NiahSingle(Task):
    """One needle; the question asks for its number."""

    name: ClassVar[str] = "niah_single"
    digits: tuple[int, int] = attrs.field(default=(5, 7), converter=tuple, validator=_digits)
    max_new_tokens: int = attrs.field(default=16, validator=integer(1))

    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        (key,), (value,) = keys(rng, 1), numbers(rng, 1, self.digits)
        depth = rng.random()
        return haystack_sample(
            rng, context_tokens, count_tokens, header=HEADER,
            inserts=[Insert(depth, _needle(key, value))], task=self.name,
            question=f"What is the special magic number for {key} mentioned in the text above?",
            answer_prefix=f"The special magic number for {key} mentioned in the text above is",
            answers=(value,), max_new_tokens=self.max_new_tokens, metadata={"keys": [key]},
        )  # fmt: skip


@attrs.frozen(kw_only=True)
class NiahMultiKey(Task):
    """One real needle among ``num_keys - 1`` distractor needles with other keys."""

    name: ClassVar[str] = "niah_multikey"
    num_keys: int = attrs.field(default=4, validator=integer(2))
    digits: tuple[int, int] = attrs.field(default=(5, 7), converter=tuple, validator=_digits)
    max_new_tokens: int = attrs.field(default=16, validator=integer(1))

    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        ks, vs = keys(rng, self.num_keys), numbers(rng, self.num_keys, self.digits)
        depths = spread_depths(rng, self.num_keys)
        rng.shuffle(depths)  # the asked key (ks[0]) may sit at any of the depths
        return haystack_sample(
            rng, context_tokens, count_tokens, header=HEADER,
            inserts=sorted((Insert(d, _needle(k, v)) for d, k, v in zip(depths, ks, vs)), key=lambda i: i.depth),
            task=self.name,
            question=f"What is the special magic number for {ks[0]} mentioned in the text above?",
            answer_prefix=f"The special magic number for {ks[0]} mentioned in the text above is",
            answers=(vs[0],), max_new_tokens=self.max_new_tokens,
            metadata={"keys": ks, "values": vs, "key_depths": depths},
        )  # fmt: skip


@attrs.frozen(kw_only=True)
class NiahMultiValue(Task):
    """One key with ``num_values`` numbers, each its own needle; all must be returned."""

    name: ClassVar[str] = "niah_multivalue"
    num_values: int = attrs.field(default=4, validator=integer(2))
    digits: tuple[int, int] = attrs.field(default=(5, 7), converter=tuple, validator=_digits)
    max_new_tokens: int = attrs.field(default=48, validator=integer(1))

    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        (key,), vs = keys(rng, 1), numbers(rng, self.num_values, self.digits)
        depths = spread_depths(rng, self.num_values)
        inserts = [Insert(d, f"One of the special magic numbers for {key} is {v}.") for d, v in zip(depths, vs)]
        return haystack_sample(
            rng, context_tokens, count_tokens, header=HEADER, inserts=inserts, task=self.name,
            question=f"What are all the special magic numbers for {key} mentioned in the text above?",
            answer_prefix=f"The special magic numbers for {key} mentioned in the text above are:",
            answers=tuple(vs), max_new_tokens=self.max_new_tokens, metadata={"keys": [key]},
        )  # fmt: skip


@attrs.frozen(kw_only=True)
class NiahMultiQuery(Task):
    """``num_keys`` needles; the question asks for ``num_queries`` of them at once."""

    name: ClassVar[str] = "niah_multiquery"
    num_keys: int = attrs.field(default=4, validator=integer(2))
    num_queries: int = attrs.field(default=4, validator=integer(2))
    digits: tuple[int, int] = attrs.field(default=(5, 7), converter=tuple, validator=_digits)
    max_new_tokens: int = attrs.field(default=48, validator=integer(1))

    def __attrs_post_init__(self) -> None:
        if self.num_queries > self.num_keys:
            raise ValueError(f"num_queries ({self.num_queries}) must be <= num_keys ({self.num_keys})")

    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        ks, vs = keys(rng, self.num_keys), numbers(rng, self.num_keys, self.digits)
        depths = spread_depths(rng, self.num_keys)
        rng.shuffle(depths)
        asked = ks[: self.num_queries]
        listed = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        return haystack_sample(
            rng, context_tokens, count_tokens, header=HEADER,
            inserts=sorted((Insert(d, _needle(k, v)) for d, k, v in zip(depths, ks, vs)), key=lambda i: i.depth),
            task=self.name,
            question=f"What are the special magic numbers for {listed} mentioned in the text above?",
            answer_prefix=f"The special magic numbers for {listed} mentioned in the text above are:",
            answers=tuple(vs[: self.num_queries]), max_new_tokens=self.max_new_tokens,
            metadata={"keys": ks, "values": vs, "key_depths": depths},
        )  # fmt: skip


@attrs.frozen(kw_only=True)
class OrderedNeedles(Task):
    """``drift``: numbered needles scattered over the context, to be listed in order.

    Needle i ("The third magic number is 48213.") lies at a uniform depth in its own band
    of the context (``spread_depths``), so decoding the answer needs a different part of
    the context at each step: the attention has to move across the whole context. By
    default the bands follow the ordinals (the first needle in the first band): SmolLM2-135M
    then lists 5 needles at ~0.7 at 550 tokens, against ~0.2 with ``shuffle``, which assigns
    bands to ordinals at random (harder: the asked order differs from the reading order).
    Scored by ``ordered_match`` (longest common subsequence with the expected order / number
    of needles).
    """

    name: ClassVar[str] = "drift"
    num_needles: int = attrs.field(default=5, validator=integer(2))
    digits: tuple[int, int] = attrs.field(default=(5, 5), converter=tuple, validator=_digits)
    shuffle: bool = False
    max_new_tokens: int = attrs.field(default=40, validator=integer(1))

    @num_needles.validator
    def _check_needles(self, attribute: attrs.Attribute, value: int) -> None:
        if value > len(_words.ORDINALS):
            raise ValueError(f"{attribute.name} must be <= {len(_words.ORDINALS)}, got {value}")

    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        k = self.num_needles
        vs = numbers(rng, k, self.digits)
        depths = spread_depths(rng, k)  # depths[i]: depth of the (i+1)-th magic number
        if self.shuffle:
            rng.shuffle(depths)
        ordinals = _words.ORDINALS[:k]
        inserts = sorted(
            (Insert(d, f"The {o} magic number is {v}.") for d, o, v in zip(depths, ordinals, vs)), key=lambda i: i.depth
        )
        count = _words.CARDINALS[k - 1]  # in words: the context holds no digits but the needles'
        header = (
            f"There are {count} magic numbers hidden in the text below, each labeled with its place "
            f"(the first, the second, and so on). Remember all of them: at the end you will be "
            f"asked to list them in order."
        )
        return haystack_sample(
            rng, context_tokens, count_tokens, header=header, inserts=inserts, task=self.name,
            question=f"What are the {count} magic numbers, in order from the first to the {ordinals[-1]}?",
            answer_prefix=f"The {count} magic numbers, from the first to the {ordinals[-1]}, are:",
            answers=tuple(vs), max_new_tokens=self.max_new_tokens, metadata={"ordinal_depths": depths},
        )  # fmt: skip

    def score(self, sample: Sample, prediction: str) -> float:
        return ordered_match(sample.answers, prediction)
