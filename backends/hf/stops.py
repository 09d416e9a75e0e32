"""Stop tokens: the ids that end a model's turn, so generation ends at the model's own
end-of-turn token (SmolLM2's ``<|im_end|>``), not at whatever the tokenizer calls eos.

A GGUF file names them in its metadata (``tokenizer.ggml.eos_token_id``, ``eot_token_id``,
``eom_token_id``). transformers' GGUF conversion does not always carry them over (5.0.0
builds SmolLM2's tokenizer with eos = ``<|im_start|>``), so loading a GGUF file reads them
(``gguf_stop_ids``) and writes them into the generation config and the tokenizer
(``apply_stop_ids``); ``stop_token_ids`` reads them back from any loaded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_GGUF_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


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


def gguf_stop_ids(path: Path) -> list[int]:
    """The eos, end-of-turn and end-of-message ids a GGUF file's metadata names, eos first."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    ids: list[int] = []
    for key in _GGUF_KEYS:
        field = reader.get_field(key)
        if field is not None and int(field.contents()) not in ids:
            ids.append(int(field.contents()))
    return ids


def apply_stop_ids(model: Any, tokenizer: Any, ids: list[int]) -> None:
    """Make ``ids`` (eos first) what ``model.generate`` stops at, and the tokenizer's eos
    token ``ids[0]`` where the conversion chose a token outside ``ids``."""
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
