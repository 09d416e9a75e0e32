"""A model's context limit, read from its config without loading weights.

``hc evaluate`` checks ``--context-length`` with it before the model loads. GGUF files (the
embedded default included) carry it in their metadata as ``{architecture}.context_length``;
folders and hub ids in ``config.json`` (``max_position_embeddings``, through AutoConfig).
``gguf.GGUFReader`` would parse every field, the 49k-entry vocabulary included (5 s for the
default model); ``gguf_metadata`` reads the header's scalars and strings, skipping arrays, and
stops at the key it needs (``stops.gguf_tokens`` reads its special-token fields with it too).
"""

from __future__ import annotations

import struct
from pathlib import Path
from collections.abc import Callable
from typing import BinaryIO

from .loading import locate

_MAGIC = b"GGUF"
# GGUF metadata value types (gguf.GGUFValueType): scalar formats, little-endian
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def context_limit(model: str | None) -> int | None:
    """Most tokens ``model`` (as ``loading.load`` takes it) attends over; None when its config
    cannot be read here (no network for a hub id): loading then says why. A local file or
    folder that is not there raises ``ModelLoadError``."""
    name, gguf = locate(model)
    if gguf is not None:
        return gguf_context_length(gguf)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def gguf_context_length(path: Path) -> int | None:
    """``{general.architecture}.context_length`` of a GGUF file (v2 or later), or None."""

    def key(fields: dict[str, object]) -> str | None:
        return f"{fields['general.architecture']}.context_length" if "general.architecture" in fields else None

    fields = gguf_metadata(path, done=lambda fields: key(fields) in fields)
    value = fields.get(key(fields) or "")
    return None if value is None else int(value)


def gguf_metadata(path: Path, *, done: Callable[[dict[str, object]], bool] | None = None) -> dict[str, object]:
    """The scalar and string metadata of a GGUF file (v2 or later; arrays are skipped), read
    in file order until ``done(fields so far)`` is true; empty for a v1 file."""
    fields: dict[str, object] = {}
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = _unpack(f, "<I")
        if version < 2:  # v1 counted with 32-bit integers; llama.cpp dropped it in 2023
            return fields
        _tensors, count = _unpack(f, "<QQ")
        for _ in range(count):
            key = _string(f)
            (kind,) = _unpack(f, "<I")
            value = _value(f, kind)
            if value is not None:
                fields[key] = value
                if done is not None and done(fields):
                    break
    return fields


def _unpack(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{f.name} ends inside its GGUF header")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO) -> str:
    (length,) = _unpack(f, "<Q")
    return f.read(length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> object:
    """A scalar or string value; arrays are skipped (None)."""
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])[0]
    if kind == _STRING:
        return _string(f)
    if kind != _ARRAY:
        raise ValueError(f"{f.name}: unknown GGUF value type {kind}")
    item, count = _unpack(f, "<IQ")
    if item in _SCALARS:
        f.seek(count * struct.calcsize(_SCALARS[item]), 1)
    else:
        for _ in range(count):
            _value(f, item)
    return None
