"""Deterministic filler prose, and needles placed into it at chosen depths.

A ``Haystack`` is an endless stream of template sentences drawn from a seeded RNG, grouped
into paragraphs. ``document(n, inserts)`` takes its first ``n`` sentences, so growing ``n``
only appends text: token counts grow almost linearly, which is what lets ``fit_length``
find the right ``n`` in a few tokenizer calls.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import attrs

from hcpolicy.eval import _words



@attrs.frozen
class Insert:
    """A text unit (a needle) to place at ``depth`` in [0, 1] of the filler: 0 = top."""

    depth: float = attrs.field(converter=float)
    text: str

    @depth.validator
    def _check_depth(self, attribute: attrs.Attribute, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


@attrs.frozen
class Document:
    """An assembled context; ``spans[i]`` is the [start, end) character range of insert i."""

    text: str
    spans: tuple[tuple[int, int], ...]


_A_BEFORE = re.compile(r"\b([Aa]) (\w+)")


def _an(match: re.Match[str]) -> str:
    word = match.group(2)
    vowel_sound = word[0].lower() in "aeio" or word in ("umbrella", "ugly", "honest")
    return f"{match.group(1)}{'n' if vowel_sound else ''} {word}"


class Haystack:
    """An endless, deterministic stream of plain English filler sentences."""

    def __init__(self, seed: int, paragraph: tuple[int, int] = (3, 7)) -> None:
        self._rng = random.Random(seed)
        self._paragraph = paragraph
        self._sentences: list[str] = []
        self._breaks: list[bool] = []  # breaks[i]: a paragraph ends after sentence i
        self._left_in_paragraph = 0

    def sentences(self, n: int) -> list[str]:
        """The first ``n`` sentences of the stream (generated on demand, then cached)."""
        while len(self._sentences) < n:
            self._grow()
        return self._sentences[:n]

    def _grow(self) -> None:
        rng = self._rng
        if self._left_in_paragraph == 0:
            self._left_in_paragraph = rng.randint(*self._paragraph)
        template = rng.choice(_words.TEMPLATES)
        names, places, nouns, adjectives = (
            rng.sample(_words.NAMES, 2), rng.sample(_words.PLACES, 2),
            rng.sample(_words.NOUNS, 2), rng.sample(_words.ADJECTIVES, 2),
        )  # fmt: skip
        # draw every slot so the RNG advances the same way whatever the template uses
        slots = {
            "name": names[0], "name2": names[1], "place": places[0], "place2": places[1],
            "noun": nouns[0], "noun2": nouns[1], "adj": adjectives[0], "adj2": adjectives[1],
            "verb": rng.choice(_words.VERBS), "time": rng.choice(_words.TIMES),
            "weather": rng.choice(_words.WEATHER),
        }  # fmt: skip
        sentence = _A_BEFORE.sub(_an, template.format(**slots))  # "a old" -> "an old"
        self._sentences.append(sentence[0].upper() + sentence[1:])
        self._left_in_paragraph -= 1
        self._breaks.append(self._left_in_paragraph == 0)

    def document(self, n: int, inserts: Sequence[Insert] = (), header: str = "") -> Document:
        """``header``, a blank line, then ``n`` filler sentences with ``inserts`` placed in them.

        Insert i goes before filler sentence ``round(depth * n)``; inserts at the same slot
        keep their order in ``inserts`` (variable chains rely on it). A needle sits in the
        paragraph of the sentence it precedes, so it reads as part of the prose.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        filler = self.sentences(n)
        at_slot: dict[int, list[int]] = {}
        for i, ins in enumerate(inserts):
            at_slot.setdefault(round(ins.depth * n), []).append(i)
        parts: list[str] = [header + "\n\n"] if header else []
        length = len(parts[0]) if parts else 0
        spans: list[tuple[int, int] | None] = [None] * len(inserts)
        for slot in range(n + 1):
            for i in at_slot.get(slot, ()):
                spans[i] = (length, length + len(inserts[i].text))
                parts.append(inserts[i].text + " ")
                length += len(parts[-1])
            if slot < n:
                parts.append(filler[slot] + ("\n\n" if self._breaks[slot] else " "))
                length += len(parts[-1])
        text = "".join(parts).rstrip()
        return Document(text=text, spans=tuple(s for s in spans if s is not None))


def spread_depths(rng: random.Random, k: int) -> list[float]:
    """``k`` depths, one drawn uniformly in each of ``k`` equal bands of [0, 1), in band order.

    Each depth is uniform over the whole context once the band is chosen at random, yet no
    two needles crowd together, so answering them all needs the whole context.
    """
    return [(band + rng.random()) / k for band in range(k)]

