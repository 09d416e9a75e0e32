"""A custom policy in a dozen lines: keep the tokens whose keys have the smallest norm.

Low key norm tends to go with high attention (the "K-norm" heuristic). Subclass ScoredPolicy,
implement ``score``, and the base class handles budgets, top-k and the Select actions. Here
the budgets come from AdaAllocator, so heads of one layer keep different numbers of tokens.

    python examples/custom_policy.py
"""

from __future__ import annotations

import attrs
import torch

from hcpolicy.budget import AdaAllocator
from hcpolicy.observe import Observation
from hcpolicy.policy import ScoredPolicy
from hcpolicy.reference import simulate
from hcpolicy.spec import ModelSpec


@attrs.define(kw_only=True)
class KeyNorm(ScoredPolicy):
    """K-norm: keep the tokens whose keys have the smallest L2 norm; the first `sinks` always."""

    sinks: int = attrs.field(default=1, validator=attrs.validators.ge(0))

    def score(self, obs: Observation) -> torch.Tensor:
        score = -obs.cache.keys.float().norm(dim=-1)  # [B, H_kv, L]
        return score.masked_fill(obs.cache.positions < self.sinks, float("inf"))


def main() -> None:
    spec = ModelSpec(architecture="synthetic", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=16)
    policy = KeyNorm(compression=0.25, allocator=AdaAllocator(safeguard=0.5))
    prompt = 32
    cache, log, _ = simulate(policy, spec, prompt_length=prompt, decode_steps=0)
    for layer, (select,) in enumerate(log[: spec.num_layers]):
        for head, kept in enumerate(select.selection.as_lists()[0]):
            print(f"layer {layer} head {head}: kept {len(kept):2d}/{prompt} at {kept}")
    share = cache.device_tokens() / (spec.num_layers * spec.num_kv_heads * prompt)
    print(f"device KV fraction: {share:.3f} (asked for {policy.compression})")


if __name__ == "__main__":
    main()
