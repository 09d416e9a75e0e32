"""The decoder: embedding, RMSNorm, RoPE, GQA attention, SwiGLU MLP, lm_head (Llama / Qwen2).

The model computes; it holds no cache. Each attention layer hands its post-RoPE q, k, v
to an ``Attention`` callable (the engine's), which stores k/v and returns the output:
prefill, decode, paged or dense is the caller's business. q/k/v and gate/up are fused
into one matmul each (fewer launches per decode step); ``loading`` splits HF weights in.

The small elementwise steps (RMSNorm with the residual add before it, RoPE, SiLU * up) go
through an ``ops`` object (see ``fused``): torch ops by default, one Triton launch each
when the engine passes ``TritonOps``. The residual stream is carried beside each block's
output (as vLLM does) so that every norm takes the residual add in the same launch.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .config import ModelConfig
from .fused import TORCH_OPS, TorchOps
from .rope import inverse_frequencies


class AttentionFn(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, H_q, Q, D], k/v: [B, H_kv, Q, D] (post-RoPE) -> [B, Q, H_q * D]."""
        ...


class RMSNorm(nn.Module):
    """Holds the weight; ``ops.rms_norm`` / ``ops.add_rms_norm`` compute."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.h_q, self.h_kv, self.d = config.num_heads, config.num_kv_heads, config.head_dim
        width = (self.h_q + 2 * self.h_kv) * self.d
        self.qkv_proj = nn.Linear(config.hidden_size, width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.h_q * self.d, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: object, attend: AttentionFn, ops: TorchOps) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [B, Q, (H_q + 2 H_kv) D]
        q, k, v = ops.rope_qkv(qkv, rope, self.h_q, self.h_kv, self.d)  # [B, H_q, Q, D]; k, v [B, H_kv, Q, D]
        return self.o_proj(attend(self.index, q, k, v))  # [B, Q, hidden]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))  # [B, Q, hidden]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: object, attend: AttentionFn,
                ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The hidden state is x + residual (residual None: x alone, the embedding) ->
        (the MLP's output, the residual stream it is to be added to)."""
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, ops.rms_norm(x, norm.weight, norm.eps)
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, rope, attend, ops)
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h, ops), residual


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
        self, tokens: torch.Tensor, positions: torch.Tensor, attend: AttentionFn, *, last_only: bool = False,
        ops: TorchOps = TORCH_OPS,
    ) -> torch.Tensor:  # fmt: skip
        x = self.embed_tokens(tokens)  # [B, Q, hidden]
        rope = ops.rope_setup(self.inv_freq, positions, x.dtype)
        residual = None
        for block in self.layers:
            x, residual = block(x, residual, rope, attend, ops)
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        h, _ = ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return self.lm_head(h)  # [B, Q', V]

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
