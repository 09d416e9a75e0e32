"""Attention kernels over hcpolicy's ragged and paged per-head KV layouts (triton on CUDA, torch elsewhere)."""

from hcpolicy.kernels.ragged_decode import (
    ChunkPlan,
    DecodeConfig,
    plan_chunks,
    ragged_decode_attention,
    ragged_decode_reference,
)

__all__ = ["ChunkPlan", "DecodeConfig", "plan_chunks", "ragged_decode_attention", "ragged_decode_reference"]
