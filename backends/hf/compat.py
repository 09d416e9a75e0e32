"""Every difference between transformers 5.x releases that the HF backend relies on.

Supported: transformers >= 5.0, < 6. Nothing outside this module may branch on the
transformers version or reach into its private structures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version


def broken_pair(transformers_version: str, kernels_version: str | None) -> str | None:
    """Why this transformers / kernels pair cannot import, or None if it can.

    transformers before 5.13 builds its hub-kernel table at import with arguments kernels
    0.15 removed, so ``import transformers.modeling_utils`` raises there."""
    if kernels_version is None or Version(transformers_version) >= Version("5.13"):
        return None
    if Version(kernels_version) < Version("0.15"):
        return None
    return (
        f"transformers {transformers_version} cannot import with kernels {kernels_version} installed: "
        'pip install "kernels<0.15" (or transformers>=5.13)'
    )


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


_broken = broken_pair(_installed("transformers") or "0", _installed("kernels"))
if _broken:
    raise ImportError(_broken)

import torch  # noqa: E402  (the check above must run before transformers imports)
import transformers  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from hcpolicy.spec import ModelSpec  # noqa: E402

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
