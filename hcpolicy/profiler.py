"""The backend-agnostic profiler driver: attention rows in, HeadProfile out.

A backend runs calibration text through the model and, for every layer, hands over the
newest query's attention over the prompt: once for the last prompt token (step 0) and once
per decode step (steps 1..T). The profiler keeps only top-k sets, so memory stays small.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from hcpolicy._validate import positive, unit_interval
from hcpolicy.classify import build_profile, similarity_graph, stability
from hcpolicy.profile import HeadProfile
from hcpolicy.scores import Reduce, group_reduce, pool1d, topk_sets
from hcpolicy.spec import ModelSpec


def _top_k(_inst: object, attribute: attrs.Attribute, value: int | float) -> None:
    if isinstance(value, bool) or value <= 0 or (isinstance(value, float) and value > 1):
        raise ValueError(f"{attribute.name} must be a token count >= 1 or a fraction in (0, 1], got {value!r}")


@attrs.frozen(kw_only=True)
class ProfileConfig:
    """How heads are measured.

    top_k: tokens per top-k set (int) or a fraction of the prompt (float); pool_kernel:
    average-pool width applied to attention rows; gqa: how a group's query heads fold into
    their KV head; similarity: 'prefill' compares heads at the last prompt token only (the
    reference code), 'median' takes the median over all profiled steps (the paper's text).
    """

    top_k: int | float = attrs.field(default=1024, validator=_top_k)
    pool_kernel: int = attrs.field(default=5, validator=positive)
    gqa: Reduce = attrs.field(default="mean", validator=attrs.validators.in_(("mean", "max", "sum")))
    tau_stable: float = attrs.field(default=0.5, validator=unit_interval)
    tau_sim: float = attrs.field(default=0.5, validator=unit_interval)
    decode_steps: int = attrs.field(default=100, validator=positive)
    similarity: Literal["prefill", "median"] = attrs.field(
        default="prefill", validator=attrs.validators.in_(("prefill", "median"))
    )
    eps: float = attrs.field(default=1e-6, validator=positive)

    @classmethod
    def faithful(cls) -> "ProfileConfig":
        """The reference code's constants: k=1024, avg-pool 5, GQA mean, both thresholds 0.5,
        100 decode steps, similarity at the prefill step."""
        return cls()

    def k_for(self, prompt_length: int) -> int:
        k = round(self.top_k * prompt_length) if isinstance(self.top_k, float) else self.top_k
        return max(1, min(k, prompt_length))


class Profiler:
    """Collects per-step top-k sets for every (layer, KV head) and classifies them."""

    def __init__(self, spec: ModelSpec, config: ProfileConfig, prompt_length: int) -> None:
        if prompt_length < 2:
            raise ValueError(f"prompt_length must be >= 2, got {prompt_length}")
        self.spec = spec
        self.config = config
        self.prompt_length = prompt_length
        self.k = config.k_for(prompt_length)
        self._sets: list[dict[int, torch.Tensor]] = [{} for _ in range(spec.num_layers)]
        self._samples: int | None = None

    def observe(self, layer: int, step: int, rows: torch.Tensor) -> None:
        """rows: [N, H_q, L'] attention of the newest query, L' >= prompt_length (only the
        prompt part is used). step 0 is the last prompt token, 1..T the decode steps."""
        if not 0 <= layer < self.spec.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.spec.num_layers} layers")
        if not 0 <= step <= self.config.decode_steps:
            raise ValueError(f"step {step} outside 0..{self.config.decode_steps}")
        if rows.ndim != 3 or rows.shape[1] != self.spec.num_query_heads or rows.shape[2] < self.prompt_length:
            raise ValueError(
                f"rows must be [N, {self.spec.num_query_heads}, >= {self.prompt_length}], got {tuple(rows.shape)}"
            )
        if self._samples is None:
            self._samples = rows.shape[0]
        elif rows.shape[0] != self._samples:
            raise ValueError(f"every call must carry {self._samples} samples, got {rows.shape[0]}")
        prompt = rows[..., : self.prompt_length].float()  # [N, H_q, L]
        folded = pool1d(group_reduce(prompt, self.spec.num_kv_heads, self.config.gqa), self.config.pool_kernel)
        self._sets[layer][step] = topk_sets(folded, self.k).cpu()  # [N, H_kv, k]

    def steps_seen(self) -> int:
        """Decode steps recorded in every layer."""
        return min((len(s) - 1 for s in self._sets), default=0)

    def finish(self, settings: dict[str, object] | None = None) -> HeadProfile:
        """Classify heads from what was observed; needs step 0 and >= 1 decode step everywhere."""
        stab = torch.zeros(self.spec.num_layers, self.spec.num_kv_heads)
        adjacency = torch.zeros(self.spec.num_layers, self.spec.num_kv_heads, self.spec.num_kv_heads, dtype=torch.bool)
        for layer, sets in enumerate(self._sets):
            steps = sorted(sets)
            if not steps or steps[0] != 0 or len(steps) < 2:
                raise ValueError(f"layer {layer}: need the prefill step and at least one decode step, got {steps}")
            decode = torch.stack([sets[s] for s in steps[1:]])  # [T, N, H_kv, k]
            stab[layer] = stability(decode, sets[0], self.prompt_length)
            compared = sets[0].unsqueeze(0) if self.config.similarity == "prefill" else torch.stack([sets[s] for s in steps])
            adjacency[layer] = similarity_graph(compared, self.prompt_length, self.config.tau_sim)
        record = attrs.asdict(self.config)
        record.update(prompt_length=self.prompt_length, k=self.k, samples=self._samples, steps=self.steps_seen())
        record.update(settings or {})
        return build_profile(self.spec, stab, adjacency, tau_stable=self.config.tau_stable, eps=self.config.eps, settings=record)
