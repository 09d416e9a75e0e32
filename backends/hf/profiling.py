"""``hc profile`` for transformers models: calibration text through the model, attention
rows into the backend-agnostic ``Profiler``, a ``HeadProfile`` out."""

from __future__ import annotations

import math
from typing import Any

import torch

from hcpolicy.observe import LayerCache
from hcpolicy.profile import HeadProfile
from hcpolicy.profiler import ProfileConfig, Profiler

from .backend import HFBackend


def calibration_ids(tokenizer: Any, texts: list[str], tokens: int) -> torch.Tensor:
    """[N, tokens]: each text tokenized and cut to ``tokens`` (all must be long enough)."""
    rows = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < tokens:
            raise ValueError(f"calibration text {i} has {len(ids)} tokens, fewer than the {tokens} asked for")
        rows.append(ids[:tokens])
    return torch.tensor(rows)


def profile_model(
    backend: HFBackend, ids: torch.Tensor, config: ProfileConfig, settings: dict[str, Any] | None = None
) -> HeadProfile:
    """Prefill ``ids`` [N, L], decode ``config.decode_steps`` greedy tokens, classify heads."""
    prompt_length = ids.shape[1]
    profiler = Profiler(backend.spec, config, prompt_length)

    def observe(layer: int, step: int, query: torch.Tensor, cache: LayerCache, scaling: float | None) -> None:
        # query: [N, H_q, 1, D] newest token; the attention row over every cached key
        n, h_q, _, d = query.shape
        g = h_q // cache.num_kv_heads
        keys = cache.keys.repeat_interleave(g, dim=1).float()  # [N, H_q, L, D]
        scale = scaling if scaling is not None else 1 / math.sqrt(d)
        rows = torch.softmax(query.float() @ keys.transpose(-1, -2) * scale, dim=-1)[:, :, 0]  # [N, H_q, L]
        profiler.observe(layer, step, rows)

    cache = backend.new_cache(None)
    cache.observer = observe
    with torch.no_grad(), backend.attach():
        logits = backend.forward(ids, cache, logits_to_keep=1).logits[:, -1]
        for _ in range(config.decode_steps):
            nxt = logits.argmax(-1, keepdim=True)
            logits = backend.forward(nxt, cache).logits[:, -1]
    record = {"model": backend.spec.architecture}
    record.update(settings or {})
    return profiler.finish(record)
