"""TorchEngineBackend: the registry entry (``BACKENDS["torch_engine"]``) for the reference engine."""

from __future__ import annotations

import torch

from hcpolicy.capabilities import Capabilities

from .config import ModelConfig
from .engine import CAPABILITIES, Engine, EngineConfig
from .loading import load_checkpoint, load_gguf, random_model


class TorchEngineBackend:
    """Reference PyTorch engine: paged per-head KV, Triton decode, CUDA graphs (Llama/Qwen2)."""

    name = "torch_engine"
    capabilities: Capabilities = CAPABILITIES

    @staticmethod
    def load(model: str, config: EngineConfig, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Engine:
        """An engine over ``model``: a checkpoint folder, a ``.gguf`` file, or a preset name
        ('tiny', 'llama-3.1-8b') with random weights."""
        if model.endswith(".gguf"):
            weights = load_gguf(model, device=device, dtype=dtype)
        elif model in ("tiny", "llama-3.1-8b"):
            weights = random_model(ModelConfig.preset(model, max_position=config.max_seq_len), device=device, dtype=dtype)
        else:
            weights = load_checkpoint(model, device=device, dtype=dtype)
        return Engine(weights, config)
