"""ModelConfig: the shape of a Llama/Qwen2-family decoder, read from an HF config.json or a preset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from hcpolicy._validate import positive
from hcpolicy.spec import ModelSpec

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "llama3", "linear")


def _rope_scaling(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    scaling = dict(value)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    scaling["rope_type"] = kind
    needs = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "linear": ("factor",), "default": ()}[kind]  # fmt: skip
    missing = [k for k in needs if k not in scaling]
    if missing:
        raise ValueError(f"{kind} rope scaling needs {', '.join(missing)}")
    return None if kind == "default" else scaling


def token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """An HF ``eos_token_id`` (int, list or None) as a tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


@attrs.frozen
class ModelConfig:
    """Decoder shape. ``family``: 'llama' or 'qwen2' (q/k/v biases); ``rope_scaling``: None or
    a dict with ``rope_type`` 'llama3' or 'linear' and that type's fields (HF names);
    ``eos_token_ids``: the ids that end generation (``Engine.generate`` stops at them)."""

    family: str = attrs.field(validator=attrs.validators.in_(tuple(ARCHITECTURES)))
    vocab_size: int = attrs.field(validator=positive)
    hidden_size: int = attrs.field(validator=positive)
    intermediate_size: int = attrs.field(validator=positive)
    num_layers: int = attrs.field(validator=positive)
    num_heads: int = attrs.field(validator=positive)
    num_kv_heads: int = attrs.field(validator=positive)
    head_dim: int = attrs.field(validator=positive)
    max_position: int = attrs.field(default=8192, validator=positive)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = attrs.field(default=None, converter=_rope_scaling)
    tie_embeddings: bool = False
    qkv_bias: bool = attrs.field(default=attrs.Factory(lambda self: self.family == "qwen2", takes_self=True))
    eos_token_ids: tuple[int, ...] = attrs.field(default=(), converter=lambda ids: tuple(sorted(set(ids))))

    def __attrs_post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def spec(self) -> ModelSpec:
        return ModelSpec(
            architecture=ARCHITECTURES[self.family], num_layers=self.num_layers, num_query_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, max_position=self.max_position,
        )  # fmt: skip

    def weight_count(self) -> int:
        """Parameters of the model this config builds (lm_head counted once when tied)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + h

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ModelConfig":
        """From the dict of an HF ``config.json`` (Llama or Qwen2; transformers 4 or 5 keys)."""
        family = config.get("model_type")
        if family not in ARCHITECTURES:
            raise ValueError(f"model_type {family!r} is not supported by torch_engine; supported: llama, qwen2")
        if family == "qwen2" and config.get("use_sliding_window"):
            raise ValueError("qwen2 config has use_sliding_window=true: sliding-window attention is not supported")
        heads = config["num_attention_heads"]
        # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta + rope_scaling
        rope = dict(config.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else config.get("rope_scaling")
        bias = config.get("attention_bias", family == "qwen2")
        return cls(
            family=family, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_position=config.get("max_position_embeddings", 8192), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling, tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(bias), eos_token_ids=token_ids(config.get("eos_token_id")),
        )  # fmt: skip

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf(json.loads(path.read_text()))

    @classmethod
    def preset(cls, name: str, *, max_position: int | None = None) -> "ModelConfig":
        """A named shape: 'tiny' (tests, CPU benches) or 'llama-3.1-8b' (GPU benches)."""
        if name not in PRESETS:
            raise ValueError(f"unknown config preset {name!r}; known: {', '.join(PRESETS)}")
        config = PRESETS[name]
        return config if max_position is None else attrs.evolve(config, max_position=max_position)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
        num_kv_heads=4, head_dim=16, max_position=4096,
    ),
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, max_position=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
}  # fmt: skip
