"""The attention function the HF backend registers as ``"hcpolicy"``.

transformers calls it with whatever ``Cache.update`` returned; a ``HeadwiseCache`` returns
``KVHandle``s, which lead here to the layer's storage and its policy. Dense layers run
transformers' own SDPA path with transformers' mask (so keeping everything is exact);
ragged layers run SDPA over a padded view with per-head masks built from positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hcpolicy.actions import Selection
from hcpolicy.kernels.ragged_decode import ragged_decode_attention
from hcpolicy.observe import LayerCache, Observation, Phase

from . import compat
from .cache import HeadwiseLayer, KVHandle

NAME = "hcpolicy"


def hcpolicy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: [B, H_q, Q, D] post-RoPE. Returns ([B, Q, H_q, D], None) like sdpa."""
    if not isinstance(key, KVHandle):  # a plain transformers cache (or none): plain SDPA
        return compat.sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer, first = key.layer, key.first_position
    owner = layer.owner
    q_len = query.shape[2]
    positions = torch.arange(first, first + q_len, device=query.device)  # [Q]
    if not layer.prefilled and layer.index == 0:
        owner.prompt_length = first + q_len
        owner.starts = left_padding(attention_mask, query.shape[0])
    if owner.observer is not None and layer.ragged is None:
        step = 0 if not layer.prefilled else first - owner.prompt_length + 1
        owner.observer(layer.index, step, query[:, :, -1:], layer.view(), scaling)
    if not layer.prefilled:
        return _prefill(module, layer, query, positions, attention_mask, dropout, scaling, kwargs)
    if owner.policy is not None and owner.policy_needs.decode_observations:
        heads = owner.policy.observed_heads(layer.index)
        if heads is None or len(heads) > 0:
            heads = None if heads is None else list(heads)
            obs = Observation(
                phase=Phase.DECODE, layer=layer.index, queries=query, query_positions=positions,
                cache=layer.view(heads), prompt_length=owner.prompt_length, step=first - owner.prompt_length,
                heads=heads, offloaded=layer.offloaded_view,
            )  # fmt: skip
            layer.apply(list(owner.policy.decode(obs)))
    if layer.ragged is None and not layer.attend_views:
        return compat.sdpa_attention_forward(
            module, query, layer.keys, layer.values, attention_mask, dropout, scaling, **kwargs
        )
    slots = slot_mask(attention_mask)
    if query.is_cuda and q_len == 1 and not layer.attend_views and slots is None:
        return _ragged_decode(layer, query, scaling), None
    out = ragged_attention(query, layer.view(), positions, scaling, layer.attend_views, slots)
    layer.attend_views.clear()
    return out, None


def _ragged_decode(layer: HeadwiseLayer, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """GPU fast path: the Triton ragged decode kernel reads each head's kept rows in place
    (no padded copy). query: [B, H_q, 1, D] -> [B, 1, H_q, D]."""
    store = layer.ragged
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ragged_decode_attention(
        query[:, :, 0].contiguous(), store.kv, store.starts, store.lengths, scale, max_length=store.max_length
    )  # [B, H_q, D]; max_length comes from host-side lengths, so no sync
    return out.unsqueeze(1)


def _prefill(
    module: torch.nn.Module,
    layer: HeadwiseLayer,
    query: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """First forward over the prompt: dense attention, then the policy compresses the layer."""
    owner = layer.owner
    out = compat.sdpa_attention_forward(module, query, layer.keys, layer.values, attention_mask, dropout, scaling, **kwargs)
    window = owner.query_window
    kept = query if window is None else query[:, :, -window:]
    if owner.record_window != 0:
        owner.recorded_queries[layer.index] = kept.clone()
    layer.prefilled = True
    if owner.policy is not None:
        owner.compress(layer, kept, positions[-kept.shape[2] :])
    return out


def left_padding(attention_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """[B] first real position of each sequence, from the prefill mask (None: no padding).

    sdpa masks are boolean (True = attend) or additive float (0 = attend); the last query
    row of a left-padded sequence attends to everything but its padding.
    """
    allowed = slot_mask(attention_mask)  # [B, KV]
    if allowed is None or bool(allowed.all()):
        return None
    return allowed.int().argmax(dim=-1).to(torch.int64)  # first allowed column


def slot_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, KV] which logical slots each sequence may attend (False = padding anywhere in the
    sequence), from transformers' 4D mask; None when it built none (no padding)."""
    if attention_mask is None or attention_mask.ndim != 4:
        return None
    last = attention_mask[:, 0, -1, :]  # the newest query sees every real slot
    return last if last.dtype == torch.bool else last == 0


def ragged_attention(
    query: torch.Tensor,
    cache: LayerCache,
    positions: torch.Tensor,
    scaling: float | None,
    attend: dict[int, Selection] | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA over a padded per-head view. query: [B, H_q, Q, D]; positions: [Q]; slots:
    optional [B, S] bool, the logical slots each sequence may see (padding excluded).

    Returns [B, Q, H_q, D]. Each KV head sees only its own valid, causal positions (and,
    for heads with an Attend view this step, only the positions it names).
    """
    b, h_q, q_len, _ = query.shape
    h_kv = cache.num_kv_heads
    allowed = cache.valid().unsqueeze(2) & (cache.positions.unsqueeze(2) <= positions.view(1, 1, -1, 1))
    if slots is not None:
        seen = slots.gather(1, cache.positions.reshape(b, -1).clamp(max=slots.shape[1] - 1))  # [B, H_kv * L]
        allowed &= seen.view(b, h_kv, 1, -1)
    for h, sel in (attend or {}).items():
        member = _member(cache.positions[:, h], sel)  # [B, L]
        allowed[:, h] &= member.unsqueeze(1)
    mask = allowed.repeat_interleave(h_q // h_kv, dim=1)  # [B, H_q, Q, L]
    out = F.scaled_dot_product_attention(
        query, cache.keys.to(query.dtype), cache.values.to(query.dtype), attn_mask=mask, scale=scaling, enable_gqa=True
    )  # [B, H_q, Q, D]
    return out.transpose(1, 2).contiguous()


def _member(positions: torch.Tensor, sel: Selection) -> torch.Tensor:
    """[B, L] whether each position is in the one-head selection ([B, 1, K])."""
    big = torch.iinfo(torch.int64).max
    wanted = sel.indices[:, 0].masked_fill(~sel.valid()[:, 0], big)  # [B, K]
    wanted = torch.sort(wanted, dim=-1).values
    idx = torch.searchsorted(wanted, positions).clamp(max=wanted.shape[-1] - 1)
    return wanted.gather(-1, idx) == positions
