"""Weights: HF checkpoints (config.json + *.safetensors), GGUF through transformers, or random.

HF tensor names map onto ours by name; q/k/v and gate/up are concatenated into the fused
projections. Every HF tensor must be used and every parameter filled, or loading fails
with the names that did not match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import torch

from .config import ModelConfig, token_ids
from .model import Transformer, build_empty

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the tensors."""


def _target(name: str) -> tuple[str, int | None]:
    """HF name -> (our parameter name, part index of a fused parameter or None)."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return "lm_head.weight", None
    match = _LAYER.match(name)
    if match:
        layer, rest = match.groups()
        module, _, kind = rest.rpartition(".")
        if module in _FUSED:
            fused, part = _FUSED[module]
            return f"layers.{layer}.{fused}.{kind}", part
        return f"layers.{layer}.{rest}", None
    raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")


def load_state(model: Transformer, tensors: Iterable[tuple[str, torch.Tensor]]) -> Transformer:
    """Copy HF-named tensors into ``model`` (converted to its dtype and device)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    parts: dict[str, dict[int, torch.Tensor]] = {}
    filled: set[str] = set()
    for name, tensor in tensors:
        target, part = _target(name)
        if target == "lm_head.weight" and model.config.tie_embeddings:
            continue  # some checkpoints store the tied matrix twice
        if target not in params:
            raise CheckpointError(f"checkpoint tensor {name!r} has no place in the model ({target})")
        if part is None:
            _copy(params[target], tensor, name)
            filled.add(target)
        else:
            parts.setdefault(target, {})[part] = tensor
    for target, pieces in parts.items():
        want = 3 if "qkv" in target else 2
        if sorted(pieces) != list(range(want)):
            raise CheckpointError(f"{target}: checkpoint has parts {sorted(pieces)} of {want}")
        _copy(params[target], torch.cat([pieces[i] for i in range(want)], dim=0), target)
        filled.add(target)
    if model.config.tie_embeddings:
        filled.add("lm_head.weight")
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:4]}")
    return model


def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)


def _safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise ImportError("loading checkpoints needs safetensors: pip install safetensors") from err
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_checkpoint(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A Llama/Qwen2 folder with config.json and *.safetensors (sharded or not); the stop
    tokens come from generation_config.json where it names them, else from config.json."""
    folder = Path(folder)
    config = ModelConfig.from_file(folder)
    generation = folder / "generation_config.json"
    stops = token_ids(json.loads(generation.read_text()).get("eos_token_id")) if generation.is_file() else ()
    if stops:
        config = attrs.evolve(config, eos_token_ids=stops)
    return load_state(build_empty(config, device=device, dtype=dtype), _safetensors(folder))


def load_gguf(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A GGUF file, dequantised by transformers' GGUF loader through the HF backend's
    ``load`` (which caches the conversion and reads the stop tokens from the file)."""
    from hcpolicy.backends.hf.loading import load
    from hcpolicy.backends.hf.stops import stop_token_ids

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    hf = load(str(path))
    config = attrs.evolve(ModelConfig.from_hf(hf.model.config.to_dict()), eos_token_ids=stop_token_ids(hf.model, hf.tokenizer))
    state = hf.model.state_dict()
    del hf
    return load_state(build_empty(config, device=device, dtype=dtype), state.items())


def random_model(
    config: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Transformer:
    """Random weights (normal, std 0.02; norms at 1): benchmark shapes without a checkpoint."""
    model = build_empty(config, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model
