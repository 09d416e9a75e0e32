"""Every difference between transformers 5.x releases that the HF backend relies on.

Supported: transformers >= 5.0, < 6. Nothing outside this module may branch on the
transformers version or reach into its private structures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import AttentionInterface

from hcpolicy.spec import ModelSpec

__all__ = [
    "Cache",
    "DynamicLayer",
    "TRANSFORMERS_VERSION",
    "attention_registered",
    "cache_kwarg",
    "mask_query_length",
    "model_spec",
    "register_attention",
    "sdpa_attention_forward",
    "set_attn_implementation",
    "unregister_attention",
]

TRANSFORMERS_VERSION = transformers.__version__
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword ``forward``/``generate`` take a Cache under: ``cache`` in newer 5.x
    releases (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def register_attention(name: str, fn: Callable[..., Any]) -> None:
    """Register an attention function, with sdpa's mask builder so masks match sdpa's."""
    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def unregister_attention(name: str) -> None:
    # both registries are class-level dicts in every 5.x release
    AttentionInterface._global_mapping.pop(name, None)
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def attention_registered(name: str) -> bool:
    return name in AttentionInterface._global_mapping


def set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    model.set_attn_implementation(name)


def attn_implementation(model: torch.nn.Module) -> str:
    return model.config._attn_implementation


def mask_query_length(arg: int | torch.Tensor) -> int:
    """Layers' get_mask_sizes takes ``cache_position`` (a tensor, 5.0-5.x) or ``query_length``
    (an int, newer releases)."""
    return int(arg) if not isinstance(arg, torch.Tensor) else int(arg.shape[0])


def model_spec(model: torch.nn.Module) -> ModelSpec:
    """ModelSpec from a transformers causal LM's config (Llama, Qwen2, Qwen3, Mistral)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    family = getattr(config, "model_type", "")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model type {family!r} is not supported by the hf backend; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and family != "llama":
        layer_types = getattr(config, "layer_types", None) or []
        if any(t == "sliding_attention" for t in layer_types) or family == "mistral":
            raise ValueError(
                f"{family} config has sliding_window={config.sliding_window}: sliding-window attention is not "
                "supported by the hf backend; set config.sliding_window = None"
            )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelSpec(
        architecture=architectures[0],
        num_layers=config.num_hidden_layers,
        num_query_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_position=getattr(config, "max_position_embeddings", None),
    )
