"""Converted GGUF files, cached: the first load of a ``.gguf`` file de-quantises it through
transformers (a minute on a small CPU) and saves model, tokenizer and generation config as
an HF folder; later loads of the same file read that folder in seconds.

    <cache>/gguf/<sha256 of the file, 24 hex digits>/transformers-<version>/

``<cache>`` is ``$HCPOLICY_CACHE``, else ``$XDG_CACHE_HOME/hcpolicy``, else
``~/.cache/hcpolicy``. The transformers version is part of the key because another release
may convert the same file differently. An entry is written into a temporary folder inside
the cache and renamed into place, so an interrupted first load leaves nothing that a later
load trusts; its manifest lists every file with its size, checked before each load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "hcpolicy-cache.json"
_FORMAT = 1  # bump when what an entry holds changes; older entries are then rebuilt
_DIGITS = 24


class CacheEntryError(ValueError):
    """A cache entry that is incomplete or does not match its manifest."""


def cache_root() -> Path:
    """``$HCPOLICY_CACHE``, else ``$XDG_CACHE_HOME/hcpolicy``, else ``~/.cache/hcpolicy``."""
    if os.environ.get("HCPOLICY_CACHE"):
        return Path(os.environ["HCPOLICY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hcpolicy"


def file_sha256(path: Path) -> str:
    """Streamed sha256 of ``path`` (about 0.2 s for the 98 MB default model)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def entry_path(gguf: Path, transformers_version: str, sha256: str | None = None) -> Path:
    """Where the conversion of ``gguf`` by ``transformers_version`` lives (may not exist)."""
    sha256 = sha256 or file_sha256(gguf)
    return cache_root() / "gguf" / sha256[:_DIGITS] / f"transformers-{transformers_version}"


def check(entry: Path) -> None:
    """Raise CacheEntryError unless ``entry`` holds every file its manifest lists, at its size."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CacheEntryError(f"no readable {MANIFEST} ({err})") from None
    if manifest.get("format") != _FORMAT:
        raise CacheEntryError(f"format {manifest.get('format')!r}, this hcpolicy writes {_FORMAT}")
    for name, size in manifest.get("files", {}).items():
        file = entry / name
        if not file.is_file() or file.stat().st_size != size:
            raise CacheEntryError(f"{name} is missing or not {size} bytes")


def store(entry: Path, model: Any, tokenizer: Any, source: dict[str, str]) -> None:
    """Save ``model`` (safetensors + config + generation config) and ``tokenizer`` as
    ``entry``, atomically: a half-written entry is never visible under its name. A
    process that lost the race to write the same entry keeps the winner's."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
    try:
        _save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = {"format": _FORMAT, "source": source, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if entry.exists():
            shutil.rmtree(entry)  # a broken entry that check() rejected
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # not a race lost to another process writing the same entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_model(model: Any, folder: Path) -> None:
    """What ``save_pretrained`` would write, which it refuses for a GGUF-loaded model (its
    quantizer says "not serializable" although the weights are plain float32 by now):
    config.json without the GGUF quantization entry, generation_config.json, and
    model.safetensors with each shared tensor once, under its first name (the input
    embedding of tied weights, which loading ties the output projection to)."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(folder)
    tensors: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
