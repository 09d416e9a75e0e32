"""Stop tokens: the ids that end a model's turn, so generation ends at the model's own
end-of-turn token (SmolLM2's ``<|im_end|>``), not at whatever the tokenizer calls eos.

A GGUF file names them in its metadata (``tokenizer.ggml.eos_token_id``, ``eot_token_id``,
``eom_token_id``). transformers' GGUF conversion does not always carry them over (5.0.0
builds SmolLM2's tokenizer with eos = ``<|im_start|>``), so loading a GGUF file reads them
(``gguf_tokens``) and writes them into the generation config and the tokenizer
(``apply_gguf_tokens``); ``stop_token_ids`` reads them back from any loaded model. The same
metadata says whether the tokenizer adds BOS/EOS around a text, which 5.0.0 also gets wrong
(it prepends ``<|im_start|>`` to every SmolLM2 prompt, so chat prompts start with two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

_STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_ADD_KEYS = {"add_bos_token": "tokenizer.ggml.add_bos_token", "add_eos_token": "tokenizer.ggml.add_eos_token"}


@attrs.frozen
class GGUFTokens:
    """What a GGUF file's metadata says about special tokens: the stop ids (eos first) and,
    where it says, whether the tokenizer adds BOS / EOS (keys of ``_ADD_KEYS``)."""

    stop_ids: tuple[int, ...]
    adds: dict[str, bool] = attrs.field(factory=dict)


def stop_token_ids(model: Any, tokenizer: Any = None) -> frozenset[int]:
    """The ids that end generation: the generation config's ``eos_token_id`` (int or list),
    else the model config's, else the tokenizer's eos (empty when none says)."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = _as_ids(getattr(source, "eos_token_id", None))
        if ids:
            return ids
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return frozenset({int(tokenizer.eos_token_id)})
    return frozenset()


def gguf_tokens(path: Path) -> GGUFTokens:
    """Read the special-token metadata of a GGUF file."""
    from .model_config import gguf_metadata

    fields = gguf_metadata(path)
    stops: list[int] = []
    for key in _STOP_KEYS:
        if key in fields and int(fields[key]) not in stops:
            stops.append(int(fields[key]))
    adds = {name: bool(fields[key]) for name, key in _ADD_KEYS.items() if key in fields}
    return GGUFTokens(stop_ids=tuple(stops), adds=adds)


def apply_gguf_tokens(model: Any, tokenizer: Any, tokens: GGUFTokens) -> None:
    """Make the stop ids what ``model.generate`` stops at, the tokenizer's eos token the first
    of them where the conversion chose another, and its BOS/EOS adding what the file says."""
    for name, value in tokens.adds.items():
        if hasattr(tokenizer, name):
            setattr(tokenizer, name, value)  # even when equal: the setter rebuilds what adds them
    ids = tokens.stop_ids
    if not ids:
        return
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else list(ids)
    if tokenizer.eos_token_id not in ids:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ids[0])


def _as_ids(value: int | list[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)
