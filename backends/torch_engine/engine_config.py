"""EngineConfig (how an Engine is built) and GenerateOutput (what ``Engine.generate`` returns)."""

from __future__ import annotations

import attrs
import torch

from hcpolicy._validate import integer
from hcpolicy.kernels.ragged_decode import DecodeConfig

from .observer import MODES
from .recall import LANDINGS


@attrs.frozen
class EngineConfig:
    """max_batch_size, max_seq_len (logical tokens per sequence: prompt + generated);
    page_size: tokens per KV page; num_pages: pool size (None: full KV for
    max_batch_size x max_seq_len); prefill_chunk: prompt tokens per forward;
    cuda_graphs: capture the decode step on CUDA; decode_kernel: 'auto', 'triton', 'torch'.

    fused_kernels: RMSNorm(+residual), RoPE, SiLU*up and the KV append as one Triton launch
        each (``fused``). None (default): on CUDA with triton, torch ops elsewhere; True:
        Triton or a ValueError; False: the torch ops (the reference).
    observe: 'auto' ('deferred' under CUDA graphs, else 'inline'), 'inline' or 'deferred'
        (see ``observer``; 'inline' cannot run under CUDA graphs).
    batch_observations: call a policy with ``decode_period`` > 1 once per period with that
        many queries (False: every step with one, as before).
    device_decisions: score a policy's window decisions on the device (``monitor``) when it
        offers a ``WindowPlan`` (HeteroCache): None (default) = whenever the engine can
        (deferred observations, prompts of one length), True = or a ValueError, False =
        never (the policy's ``decode_layers`` scores them).
    recall_landing: 'next_step', 'eager_step' or 'async' (see ``recall``);
        async_recall_pages: bound on the fresh pages of async recalls in flight (None: the
        pool's free pages are the bound); async_recall_step_bytes: bytes of K/V rows the
        async gathers write per decode step, none in a step that ends with a decision (a
        batch's first share goes out when it is issued, the rest in the steps after; None:
        each batch's whole gather at once). Copies in flight slow the step they run under
        in proportion to what they move in it."""

    max_batch_size: int = attrs.field(default=1, validator=integer(1))
    max_seq_len: int = attrs.field(default=4096, validator=integer(1))
    page_size: int = attrs.field(default=64, validator=integer(1))
    num_pages: int | None = None
    prefill_chunk: int = attrs.field(default=8192, validator=integer(1))
    cuda_graphs: bool = True
    decode_kernel: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "triton", "torch")))
    decode_config: DecodeConfig = attrs.field(factory=DecodeConfig)
    fused_kernels: bool | None = attrs.field(default=None, validator=attrs.validators.in_((None, True, False)))
    observe: str = attrs.field(default="auto", validator=attrs.validators.in_(MODES))
    batch_observations: bool = True
    device_decisions: bool | None = attrs.field(default=None, validator=attrs.validators.in_((None, True, False)))
    recall_landing: str = attrs.field(default="next_step", validator=attrs.validators.in_(LANDINGS))
    async_recall_pages: int | None = None
    async_recall_step_bytes: int | None = 384 << 20

    def __attrs_post_init__(self) -> None:
        for name in ("num_pages", "async_recall_pages", "async_recall_step_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")


@attrs.frozen
class GenerateOutput:
    """tokens: [B, T] generated ids; logits: [B, T, V] the logits each token was taken from;
    lengths: [B] each sequence's tokens up to and including its first stop token (T where it
    has none). T is the longest length: a sequence that stopped earlier keeps what greedy
    decoding produced after its stop token, as logits say, up to T."""

    tokens: torch.Tensor
    logits: torch.Tensor
    lengths: torch.Tensor
