"""Unit-scale random weights for exactness runs, set inside SGLang's scheduler process.

SGLang's ``load_format="dummy"`` fills every parameter uniformly in [-1e-3, 1e-3]: the
residual stream then barely sees attention, so greedy tokens would match even with a
broken attention path. ``reinit`` redraws each matrix from N(0, 1/fan_in) (unit-variance
activations: attention logits of order one) and sets 1-D parameters (the RMSNorm gains) to
one, seeded by the parameter's name, so two Engines built from the same config hold the
same weights. Nothing is written to disk.

SGLang calls it as a custom weight loader: the Engine is started with
``custom_weight_loader=["serve_weights.reinit"]`` and the benchmark calls
``engine.update_weights_from_tensor([("seed", tensor([seed]))], load_format="serve_weights.reinit")``
(between ``begin_weight_update()`` and ``end_weight_update()``);
the scheduler imports this module (its ``sys.path`` is the benchmark process's, which
holds this folder) and calls ``reinit(model, named_tensors)``.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

LOADER = "serve_weights.reinit"


@torch.no_grad()
def reinit(model: torch.nn.Module, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    seed = int(dict(named_tensors)["seed"].reshape(-1)[0])
    for name, param in model.state_dict().items():
        if not torch.is_floating_point(param):
            continue
        if param.dim() == 1:
            param.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device)
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        fan_in = param.shape[-1]
        noise = torch.randn(param.shape, generator=gen, device=param.device, dtype=param.dtype)
        param.copy_(noise.mul_(fan_in**-0.5))  # one temporary the parameter's size (1 GB at most on 8B)


def apply(engine: Any, seed: int) -> None:
    """Run ``reinit`` in the Engine's scheduler, inside the weight-update session SGLang
    0.5.23 requires (raises if SGLang reports a failure)."""
    for step, call in (
        ("begin_weight_update", engine.begin_weight_update),
        ("update_weights_from_tensor",
         lambda: engine.update_weights_from_tensor([("seed", torch.tensor([seed]))], load_format=LOADER)),
        ("end_weight_update", engine.end_weight_update),
    ):  # fmt: skip
        result = call()
        ok = result[0] if isinstance(result, tuple) else getattr(result, "success", result)
        if ok is False:
            raise RuntimeError(f"re-initialising the weights failed at {step}: {result}")
