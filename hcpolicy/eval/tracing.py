"""``vt``: variable tracking, a multi-hop task over chains of assignments in filler prose."""

from __future__ import annotations

import random
import string
from typing import ClassVar

import attrs

from hcpolicy._validate import integer
from hcpolicy.eval.haystack import Insert
from hcpolicy.eval.retrieval import haystack_sample, numbers
from hcpolicy.eval.tasks import CountTokens, Sample, Task

HEADER = (
    "The text below contains variable assignments. Each one is written as VAR, a name of five "
    "capital letters, an equals sign, and a number or another variable. Remember them and follow "
    "each chain of assignments: you will be asked about them at the end."
)


def names(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct five-letter upper-case variable names."""
    out: list[str] = []
    while len(out) < k:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in out:
            out.append(name)
    return out


@attrs.frozen(kw_only=True)
class VariableTracking(Task):
    """``num_chains`` chains "VAR A = 48213", "VAR B = VAR A", ... of ``num_hops`` hops each.

    The question gives the first chain's value; the answer is every variable of that chain
    (``num_hops + 1`` names), scored by ``string_match``. Other chains, if any, are
    distractors with other values (RULER's default: one chain of four hops). A chain's statements appear in chain order at increasing random depths,
    interleaved with the other chains.
    """

    name: ClassVar[str] = "vt"
    num_chains: int = attrs.field(default=1, validator=integer(1))
    num_hops: int = attrs.field(default=4, validator=integer(1))
    max_new_tokens: int = attrs.field(default=40, validator=integer(1))

    def make(self, rng: random.Random, context_tokens: int, count_tokens: CountTokens) -> Sample:
        width = self.num_hops + 1
        values = numbers(rng, self.num_chains, (5, 5))
        variables = names(rng, self.num_chains * width)
        chains = [variables[c * width : (c + 1) * width] for c in range(self.num_chains)]
        inserts: list[Insert] = []
        for chain, value in zip(chains, values):
            depths = sorted(rng.random() for _ in range(width))
            statements = [f"VAR {chain[0]} = {value}."]
            statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            inserts += [Insert(d, s) for d, s in zip(depths, statements)]
        inserts.sort(key=lambda i: i.depth)  # stable: a chain keeps its order even on ties
        value = values[0]
        return haystack_sample(
            rng, context_tokens, count_tokens, header=HEADER, inserts=inserts, task=self.name,
            question=f"Find all variables that are assigned the value {value} in the text above, "
            "directly or through other variables.",
            answer_prefix=f"According to the chain of assignments in the text above, {width} variables "
            f"are assigned the value {value}, they are:",
            answers=tuple(chains[0]), max_new_tokens=self.max_new_tokens,
            metadata={"chains": chains, "values": values},
        )  # fmt: skip
