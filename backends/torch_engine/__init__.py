"""Reference PyTorch engine: static paged per-head KV, Triton split-K decode, CUDA graphs.

    from hcpolicy.backends.torch_engine import Engine, EngineConfig, load_checkpoint
    engine = Engine(load_checkpoint("path/to/llama"), EngineConfig(max_seq_len=8192))
    out = engine.generate([prompt_ids], max_new_tokens=32, policy=SnapKV(compression=0.5))
"""

from .backend import TorchEngineBackend
from .config import ModelConfig
from .engine import Engine, EngineConfig, GenerateOutput
from .loading import CheckpointError, load_checkpoint, load_gguf, random_model
from .model import Transformer

__all__ = [
    "CheckpointError",
    "Engine",
    "EngineConfig",
    "GenerateOutput",
    "ModelConfig",
    "TorchEngineBackend",
    "Transformer",
    "load_checkpoint",
    "load_gguf",
    "random_model",
]
