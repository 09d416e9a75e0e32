"""Decode attention over ragged per-head KV segments, without padding.

One layer's KV lives in a flat buffer ``kv [S, 2, D]`` (row = one token of one KV head;
``kv[:, 0]`` = K, ``kv[:, 1]`` = V); segment (b, h) is rows
``starts[b, h] : starts[b, h] + lengths[b, h]`` (capacity may exceed length, so gaps
between segments are fine). Each of the G = H_q / H_kv query heads of KV head h attends to
every row of its segment: every cached token precedes the new one, so there is no mask.

On CUDA the work runs as a split-K (flash-decoding) Triton kernel, see
``_ragged_decode_triton``; elsewhere (and on CUDA without triton) it runs
``ragged_decode_reference``, plain torch with float32 accumulation. A zero-length segment
gives zeros (it is not rejected: rejecting would need a host sync).
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from hcpolicy._validate import integer
from hcpolicy.kernels._triton import have_triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 256


def _power_of_two(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{attribute.name} must be a power of two, got {value!r}")


@attrs.frozen
class DecodeConfig:
    """Launch settings of the Triton kernel (``hcpolicy.bench.ragged_decode`` sweeps others).

    block_n: rows loaded per step; num_warps, num_stages: of the chunk kernel (stages are
    cut where the K+V tiles would not fit in shared memory); programs_per_sm: how many
    chunk programs the longest segments of a batch should give per SM (wave tails and
    uneven segments shrink as it grows; the combine pass grows with it); min_chunk: the
    fewest rows per chunk, a multiple of block_n (short programs spend their time in the
    prologue).
    """

    block_n: int = attrs.field(default=64, validator=_power_of_two)
    num_warps: int = attrs.field(default=4, validator=_power_of_two)
    num_stages: int = attrs.field(default=3, validator=integer(1))
    programs_per_sm: int = attrs.field(default=8, validator=integer(1))
    min_chunk: int = attrs.field(default=256, validator=integer(1))

    def __attrs_post_init__(self) -> None:
        if not 16 <= self.block_n <= 256:
            raise ValueError(f"block_n must be in [16, 256], got {self.block_n}")
        if self.min_chunk % self.block_n:
            raise ValueError(f"min_chunk ({self.min_chunk}) must be a multiple of block_n ({self.block_n})")


@attrs.frozen
class ChunkPlan:
    """chunk: rows per program (a multiple of block_n); n_chunks: programs per segment."""

    chunk: int
    n_chunks: int


def plan_chunks(max_length: int, batch: int, kv_heads: int, n_sm: int, config: DecodeConfig,
                work: int | None = None) -> ChunkPlan:  # fmt: skip
    """Split segments of up to ``max_length`` rows into equal chunks, so that a batch whose
    segments are all that long gives about ``programs_per_sm * n_sm`` programs (B=1, H_kv=8
    on 132 SMs, defaults: 128 chunks a head, 1024 programs, of 256 rows at 32K, 1024 at
    128K, 1792 at 224K). ``work``: the rows of all segments together, when the caller knows
    them (host int): then the chunk is sized so that those rows, not max-length segments,
    give that many programs (segments of uneven lengths would otherwise leave a last wave
    mostly empty). Depends on host ints only, so fixed arguments give a fixed grid (CUDA
    graphs)."""
    target = config.programs_per_sm * n_sm
    if work is not None:
        chunk = -(-max(1, work) // target)
    else:
        chunk = -(-max(1, max_length) // max(1, -(-target // max(1, batch * kv_heads))))
    chunk = max(config.min_chunk, -(-chunk // config.block_n) * config.block_n)
    return ChunkPlan(chunk=chunk, n_chunks=max(1, -(-max_length // chunk)))


def _validate(
    q: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
    max_length: Optional[int], out: Optional[torch.Tensor],
) -> None:  # fmt: skip
    """Shapes, dtypes and devices only: nothing here reads device memory."""
    for name, t in (("q", q), ("kv", kv), ("starts", starts), ("lengths", lengths)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 3:
        raise ValueError(f"q must be [B, H_q, D], got shape {tuple(q.shape)}")
    if kv.ndim != 3 or kv.shape[1] != 2 or kv.shape[2] != q.shape[2]:
        raise ValueError(f"kv must be [S, 2, D] with D = {q.shape[2]}, got shape {tuple(kv.shape)}")
    if q.dtype not in DTYPES or kv.dtype != q.dtype:
        raise ValueError(f"q and kv must share one dtype of {DTYPES}, got {q.dtype} and {kv.dtype}")
    if q.shape[2] < 1 or q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {q.shape[2]}")
    if starts.ndim != 2 or starts.shape[0] != q.shape[0] or lengths.shape != starts.shape:
        raise ValueError(
            f"starts and lengths must both be [B, H_kv] with B = {q.shape[0]}, got "
            f"{tuple(starts.shape)} and {tuple(lengths.shape)}"
        )
    if starts.dtype != torch.int64 or lengths.dtype != torch.int64:
        raise ValueError(f"starts and lengths must be int64, got {starts.dtype} and {lengths.dtype}")
    if starts.shape[1] < 1 or q.shape[1] % starts.shape[1]:
        raise ValueError(f"H_q ({q.shape[1]}) must be a multiple of H_kv ({starts.shape[1]})")
    devices = {t.device for t in (q, kv, starts, lengths)}
    if len(devices) != 1:
        raise ValueError(f"q, kv, starts and lengths must be on one device, got {sorted(map(str, devices))}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 0):
        raise ValueError(f"max_length must be None or an int >= 0, got {max_length!r}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
            f"{tuple(out.shape)}, {out.dtype}, {out.device}"
        )


def ragged_decode_attention(
    q: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, scale: float, *,
    max_length: Optional[int] = None, out: Optional[torch.Tensor] = None, config: Optional[DecodeConfig] = None,
) -> torch.Tensor:  # fmt: skip
    """q: [B, H_q, D] (one new token per sequence, H_q = G * H_kv); kv: [S, 2, D] of q's
    dtype (bf16, fp16 or fp32); starts, lengths: [B, H_kv] int64 on q's device. Returns
    ``out`` (or a new tensor) [B, H_q, D] in q's dtype: query head h * G + g (g < G)
    attends to rows ``starts[b, h] : starts[b, h] + lengths[b, h]`` with weights
    softmax(scale * q k^T).

    max_length: a host upper bound of ``lengths`` that sizes the grid; give it (a fixed
    capacity) in the decode loop: then the call never syncs the host and can be captured
    in a CUDA graph. None reads ``lengths.max()`` once (one host sync). A length above
    ``max_length`` is a caller error: on CUDA its excess rows may be ignored (the
    reference raises).
    Zero-length segments give zeros. Segment bounds are not checked on CUDA (that would
    sync); the reference checks them. config: kernel launch settings (CUDA only).
    """
    _validate(q, kv, starts, lengths, max_length, out)
    if not q.is_cuda or not have_triton():
        return ragged_decode_reference(q, kv, starts, lengths, scale, max_length=max_length, out=out)
    from hcpolicy.kernels._ragged_decode_triton import ragged_decode_triton

    if max_length is None:
        max_length = int(lengths.max()) if lengths.numel() else 0  # the one host sync, documented above
    return ragged_decode_triton(q, kv, starts, lengths, float(scale), max_length, out, config or DecodeConfig())


def ragged_decode_reference(
    q: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, scale: float, *,
    max_length: Optional[int] = None, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    """Same contract as ``ragged_decode_attention``, in plain torch with float32
    accumulation, one (b, h) segment at a time. Reads starts/lengths on the host (a sync on
    CUDA) and raises ValueError for a segment outside ``kv`` or longer than max_length."""
    _validate(q, kv, starts, lengths, max_length, out)
    batch, h_q, dim = q.shape
    h_kv = starts.shape[1]
    group = h_q // h_kv
    host_starts, host_lengths = starts.tolist(), lengths.tolist()  # the reference is not a hot path
    result = torch.zeros(batch, h_q, dim, dtype=torch.float32, device=q.device)  # [B, H_q, D]
    for b in range(batch):
        for h in range(h_kv):
            start, length = host_starts[b][h], host_lengths[b][h]
            if length < 0 or start < 0 or start + length > kv.shape[0]:
                raise ValueError(f"segment ({b}, {h}) = rows [{start}, {start + length}) is outside kv [0, {len(kv)})")
            if max_length is not None and length > max_length:
                raise ValueError(f"segment ({b}, {h}) has length {length} > max_length {max_length}")
            if length == 0:
                continue
            rows = kv[start : start + length].float()  # [L, 2, D]
            heads = slice(h * group, (h + 1) * group)
            scores = (q[b, heads].float() @ rows[:, 0].T) * scale  # [G, L]
            result[b, heads] = torch.softmax(scores, dim=-1) @ rows[:, 1]  # [G, D]
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)

