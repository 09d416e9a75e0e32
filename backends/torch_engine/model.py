"""The decoder: embedding, RMSNorm, RoPE, GQA attention, SwiGLU MLP, lm_head (Llama / Qwen2).

The model computes; it holds no cache. Each attention layer hands its post-RoPE q, k, v
to an ``Attention`` callable (the engine's), which stores k/v and returns the output:
prefill, decode, paged or dense is the caller's business. q/k/v and gate/up are fused
into one matmul each (fewer launches per decode step); ``loading`` splits HF weights in.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import apply_rope, inverse_frequencies, rope_cos_sin


class AttentionFn(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, H_q, Q, D], k/v: [B, H_kv, Q, D] (post-RoPE) -> [B, Q, H_q * D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.h_q, self.h_kv, self.d = config.num_heads, config.num_kv_heads, config.head_dim
        width = (self.h_q + 2 * self.h_kv) * self.d
        self.qkv_proj = nn.Linear(config.hidden_size, width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.h_q * self.d, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        b, q_len, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, Q, (H_q + 2 H_kv) D]
        q, k, v = qkv.split([self.h_q * self.d, self.h_kv * self.d, self.h_kv * self.d], dim=-1)
        q = q.view(b, q_len, self.h_q, self.d).transpose(1, 2)  # [B, H_q, Q, D]
        k = k.view(b, q_len, self.h_kv, self.d).transpose(1, 2)  # [B, H_kv, Q, D]
        v = v.view(b, q_len, self.h_kv, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(self.index, q, k, v))  # [B, Q, hidden]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A causal LM. ``forward(tokens [B, Q], positions [B, Q], attend)`` -> logits [B, Q', V]
    (Q' = 1 with ``last_only``: prefill needs only the last position's logits)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, attend: AttentionFn, *, last_only: bool = False
    ) -> torch.Tensor:
        x = self.embed_tokens(tokens)  # [B, Q, hidden]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # [B, 1, Q, D]
        for block in self.layers:
            x = block(x, cos, sin, attend)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, Q', V]

    def weight_bytes(self) -> int:
        """Bytes of distinct parameters (a tied lm_head counted once)."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.parameters()}
        return sum(seen.values())


def build_empty(config: ModelConfig, *, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """A model with uninitialised weights of ``dtype`` on ``device`` (no float32 copy on the way)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # to(dtype) and to_empty touched the frequencies too: RoPE math stays float32
    model.inv_freq = inverse_frequencies(config).to(device)
    return model.eval().requires_grad_(False)
