"""Tiny random-weight models of every supported family, built from configs (no hub)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_model(family: str, *, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.set_attn_implementation("sdpa")
    return model
