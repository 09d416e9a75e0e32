"""Greedy generation for evaluation: one prefill per batch of samples, shared by every policy.

Two protocols:
- ``aware``: the question is part of the prompt, so compression sees it (the paper's
  LongBench setting);
- ``agnostic``: only the context is prefilled and compressed, then the question is
  appended (kvpress's default setting).

Both tokenize the context and the question suffix separately, so the model reads the same
tokens under either protocol; only when compression happens differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
import torch

from hcpolicy.eval.tasks import Sample
from hcpolicy.policy.base import Policy

from .backend import HFBackend
from .cache import HeadwiseCache
from .stops import stop_token_ids

Protocol = Literal["agnostic", "aware"]
PROTOCOLS: tuple[str, ...] = ("agnostic", "aware")


@attrs.frozen
class Generation:
    """One sample under one policy. Byte counts cover the real (unpadded) prompt tokens right
    after compression: device = what the cache keeps, full = what a full cache would."""

    text: str
    kv_bytes_device: int
    kv_bytes_full: int
    host_bytes: int
    recalls: int


@attrs.frozen
class Prompt:
    """A sample's token ids, split where the agnostic protocol compresses."""

    context: list[int]
    suffix: list[int]
    max_new_tokens: int


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] and mask [B, L] (1 = real token), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


class HFEvaluator:
    """Runs batches of prompts under several policies on one model."""

    def __init__(self, backend: HFBackend, tokenizer: Any, model_name: str = "model") -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stops = stop_token_ids(backend.model, tokenizer)

    @property
    def max_context(self) -> int | None:
        return self.backend.spec.max_position

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def generate(
        self, samples: Sequence[Sample], protocol: Protocol, policies: Mapping[str, Policy | None], *,
        on_policy_done: Callable[[str], None] | None = None,
    ) -> dict[str, list[Generation]]:
        """The ``hcpolicy.eval.runner.Generator`` interface."""
        prompts = [self.encode(s.context, s.query_text(), s.max_new_tokens) for s in samples]
        return self.run(prompts, protocol, policies, on_policy_done=on_policy_done)

    def encode(self, context: str, suffix: str, max_new_tokens: int) -> Prompt:
        return Prompt(
            context=self.tokenizer(context, add_special_tokens=True)["input_ids"],
            suffix=self.tokenizer(suffix, add_special_tokens=False)["input_ids"],
            max_new_tokens=max_new_tokens,
        )

    def run(
        self, prompts: Sequence[Prompt], protocol: Protocol, policies: Mapping[str, Policy | None], *,
        on_policy_done: Callable[[str], None] | None = None,
    ) -> dict[str, list[Generation]]:
        """Greedy answers of every prompt under every policy (None = keep everything);
        ``on_policy_done(label)`` after each policy's answers."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        first = [p.context + (p.suffix if protocol == "aware" else []) for p in prompts]
        ids, mask = left_pad(first, self.pad_id)
        window = _widest_window(policies.values())
        recorder = self.backend.new_cache(None, record_window=window)
        with torch.no_grad(), self.backend.attach():
            logits = self.backend.forward(
                ids, recorder, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=1
            ).logits  # [B, 1, V]: the vocabulary projection of every prompt position is never needed
            results = {}
            for label, policy in policies.items():
                results[label] = self._generate(recorder, policy, prompts, protocol, mask, logits[:, -1])
                if on_policy_done is not None:
                    on_policy_done(label)
        recorder.release()
        return results

    def _generate(
        self,
        recorder: HeadwiseCache,
        policy: Policy | None,
        prompts: Sequence[Prompt],
        protocol: Protocol,
        mask: torch.Tensor,
        last_logits: torch.Tensor,
    ) -> list[Generation]:
        cache = recorder.fork(policy, headroom=0)
        kept, full = _prompt_bytes(cache, mask, self.backend.dtype_bytes)
        host = cache.host_bytes()
        steps = max(p.max_new_tokens for p in prompts)
        if protocol == "agnostic":
            suffix, suffix_mask = left_pad([p.suffix for p in prompts], self.pad_id)
            cache.headroom = suffix.shape[1] + steps
            mask = torch.cat([mask, suffix_mask], dim=1)
            out = self.backend.forward(
                suffix, cache, attention_mask=mask, position_ids=_positions(mask)[:, -suffix.shape[1] :],
                logits_to_keep=1,
            )
            last_logits = out.logits[:, -1]
        else:
            cache.headroom = steps
        device = last_logits.device
        stops = torch.tensor(sorted(self.stops), dtype=torch.long, device=device)
        limits = torch.tensor([p.max_new_tokens for p in prompts], device=device)  # [B]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # [B]: stopped or at its last token
        tokens = []
        for step in range(steps):
            nxt = last_logits.argmax(-1, keepdim=True)  # [B, 1]
            tokens.append(nxt)
            done |= torch.isin(nxt[:, 0], stops) | (limits <= step + 1)
            if bool(done.all()):  # host sync: this loop is host-driven anyway; stopping saves forwards
                break
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = self.backend.forward(nxt, cache, attention_mask=mask, position_ids=_positions(mask)[:, -1:])
            last_logits = out.logits[:, -1]
        generated = torch.cat(tokens, dim=1).tolist()
        texts = [self._text(row[: p.max_new_tokens]) for row, p in zip(generated, prompts)]
        per_sequence = cache.sequence_recalls
        cache.release()
        n = len(prompts)
        return [
            Generation(
                text=t, kv_bytes_device=kept // n, kv_bytes_full=full // n, host_bytes=host // n,
                recalls=per_sequence.get(b, 0),
            )  # fmt: skip
            for b, t in enumerate(texts)
        ]

    def _text(self, ids: list[int]) -> str:
        """The answer: ``ids`` up to the first stop token, decoded."""
        end = next((i for i, t in enumerate(ids) if t in self.stops), len(ids))
        return self.tokenizer.decode(ids[:end], skip_special_tokens=True)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that skip padding: [B, S] from a [B, S] 0/1 mask."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _widest_window(policies: Any) -> int | None:
    widest = 0
    for policy in policies:
        if policy is None:
            continue
        window = policy.requirements().query_window
        if window is None:
            return None
        widest = max(widest, window)
    return widest


def _prompt_bytes(cache: HeadwiseCache, mask: torch.Tensor, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of real prompt tokens the cache keeps, bytes a full cache keeps of them)."""
    real = int(mask.sum())
    row = cache.spec.head_dim * 2 * dtype_bytes  # K and V of one token in one head
    kept = sum(int(layer.view().valid().sum()) for layer in cache.layers)
    return kept * row, real * cache.spec.num_kv_heads * cache.spec.num_layers * row
