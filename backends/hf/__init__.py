"""Hugging Face transformers backend (``pip install hcpolicy[hf]``).

    from hcpolicy.backends.hf import HFBackend
    backend = HFBackend(model)
    sequences, cache = backend.generate(input_ids, SnapKV(compression=0.5), max_new_tokens=32)
"""

from .backend import HFBackend
from .cache import HeadwiseCache, HeadwiseLayer
from .compat import model_spec

__all__ = ["HFBackend", "HeadwiseCache", "HeadwiseLayer", "model_spec"]
