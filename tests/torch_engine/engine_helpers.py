"""Shared helpers of the torch_engine tests (imported by name, not a conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hcpolicy.classify import build_profile
from hcpolicy.profile import HeadProfile
from hcpolicy.spec import ModelSpec


def tiny_hf_model(family: str, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, **extra: object) -> torch.nn.Module:
    """A random tiny transformers model of ``family`` ('llama' or 'qwen2'), sdpa attention."""
    import transformers

    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=1024,
    )  # fmt: skip
    common.update(extra)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).eval()
    if family == "qwen2":  # HF initialises biases at zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.5)
    model.set_attn_implementation("sdpa")
    return model


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)  # safetensors by default
    return folder


def prompt(length: int, seed: int = 1, vocab: int = 96) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def synthetic_profile(spec: ModelSpec) -> HeadProfile:
    """Per layer: head 0 a pivot with satellites 1 and 2, the rest unique heads."""
    stab = torch.linspace(0.2, 0.9, spec.num_layers * spec.num_kv_heads).view(spec.num_layers, -1)
    adj = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.num_kv_heads, dtype=torch.bool)
    adj[:, 0, 1] = True
    if spec.num_kv_heads > 2:
        adj[:, 0, 2] = True
    return build_profile(spec, stab, adj, tau_stable=0.5)


def dense_decode_f64(q: torch.Tensor, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]], scale: float) -> torch.Tensor:
    """q [B, H_q, D]; keys[b][h], values[b][h]: [L_bh, D] -> float64 [B, H_q, D] (zeros where L_bh = 0)."""
    b_size, h_q, d = q.shape
    h_kv = len(keys[0])
    g = h_q // h_kv
    out = torch.zeros(b_size, h_q, d, dtype=torch.float64)
    for b in range(b_size):
        for h in range(h_kv):
            k, v = keys[b][h].double(), values[b][h].double()
            if k.shape[0] == 0:
                continue
            w = torch.softmax(q[b, h * g : (h + 1) * g].double() @ k.T * scale, dim=-1)
            out[b, h * g : (h + 1) * g] = w @ v
    return out


def random_paged(lengths: list[list[int]], dim: int, page_size: int, dtype: torch.dtype, gen: torch.Generator,
                 device: str = "cpu") -> tuple:  # fmt: skip
    """A pool with heads of the given lengths on shuffled pages: (kv [R, 2, D], table [B, H, M],
    lengths [B, H], per-head keys and values)."""
    b_size, h_kv = len(lengths), len(lengths[0])
    per = [[-(-n // page_size) for n in row] for row in lengths]
    total = sum(map(sum, per)) + 3
    order = torch.randperm(total, generator=gen)
    kv = torch.randn(total * page_size, 2, dim, generator=gen).to(dtype)
    width = max(1, max(max(row) for row in per))
    table = torch.zeros(b_size, h_kv, width, dtype=torch.int64)
    keys, values, at = [], [], 0
    for b in range(b_size):
        keys.append([]), values.append([])
        for h in range(h_kv):
            pages = order[at : at + per[b][h]]
            at += per[b][h]
            table[b, h, : pages.numel()] = pages
            e = torch.arange(lengths[b][h])
            rows = pages[e // page_size] * page_size + e % page_size if lengths[b][h] else e
            keys[b].append(kv[rows, 0])
            values[b].append(kv[rows, 1])
    lens = torch.tensor(lengths, dtype=torch.int64)
    return kv.to(device), table.to(device), lens.to(device), keys, values


def small_llama(folder: Path) -> Any:
    """The engine's model of a tiny random Llama (8 query heads, 4 KV heads), saved to
    ``folder`` and loaded back."""
    from hcpolicy.backends.torch_engine import load_checkpoint

    return load_checkpoint(save(tiny_hf_model("llama", heads=8, kv_heads=4), folder))


def small_engine(model: Any, **options: Any) -> Any:
    """An engine with room for 2 sequences of 256 tokens on 8-token pages, prefill chunks of 32."""
    from hcpolicy.backends.torch_engine import Engine, EngineConfig

    return Engine(model, EngineConfig(max_seq_len=256, max_batch_size=2, page_size=8, prefill_chunk=32, **options))


def token_ids(length: int = 70, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_interpreted(script: str, timeout: int) -> Any:
    """Run ``script`` under Triton's interpreter in a subprocess (this folder and the repo on
    its path) and return what it printed after "RESULTS " (JSON). Skips where triton's
    interpreter cannot run loops with loaded bounds (triton 3.6 under numpy 2; 3.9 can)."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode and "only 0-dimensional arrays can be converted" in proc.stderr:
        import numpy
        import triton

        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run loops with loaded bounds under numpy "
                    f"{numpy.__version__}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULTS ", 1)[1])
