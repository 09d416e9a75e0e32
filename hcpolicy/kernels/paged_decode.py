"""Decode attention over paged per-head KV: one new query token per sequence.

Head (b, h) holds ``lengths[b, h]`` entries; entry i is row
``table[b, h, i // page_size] * page_size + i % page_size`` of both ``keys`` and ``values``:
[R, D] each, last dim contiguous, each with its own row stride (the torch engine passes
the K and V halves of its [R, 2, D] pool, row stride 2D; over SGLang's pool, a layer's
``k_buffer`` and ``v_buffer`` [slots, H, D] read as [slots * H, D] rows, row stride D).
Tables and lengths are int32 or int64. Each of the G = H_q / H_kv query heads of KV head
h attends to all of them (every cached token precedes the new one: no mask). Two
implementations with one contract:

- ``paged_decode_triton`` (CUDA): split-K flash-decoding, each head's pages read once for
  its G query heads; see ``_paged_decode_triton``.
- ``paged_decode_torch``: gathers the rows and takes a float32 softmax; fixed shapes
  given ``width``, so it runs anywhere (CPU tests, CUDA without triton, graph capture).

A head with no entries gives zeros. ``page_size = 1`` turns the table into a row table
(Attend views use that).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch

from hcpolicy.kernels._triton import have_triton
from hcpolicy.kernels.ragged_decode import DecodeConfig

DecodeKernel = Literal["auto", "triton", "torch"]
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # float64: the torch path only
INDEX_DTYPES = (torch.int32, torch.int64)  # of tables and lengths: SGLang keeps int32 ones
LOG2E = math.log2(math.e)


@attrs.frozen
class Tap:
    """Where a decode step leaves its monitored heads' prompt logits (``monitor``).

    heads: [H_kv] int32, the monitor index p of each KV head of the layer (-1: none), and
    pairs: the same as host (p, KV head) pairs; logits: [W, P, B, G, prompt] float32, the
    base-2 logits (q.k * scale * log2 e) of the entries below ``prompt``, written at W
    index ``slot`` ([1] int64, on the device); stats: [W, P, B, G, ceil(prompt / tile), 2]
    float32, per tile of ``tile`` entries a reference m at or above the max of those
    logits (the torch path: that max; the Triton kernel: its running max) and the sum of
    exp2(logit - m), so that the prompt's softmax normaliser is their combination
    (``kernels.window_scores.softmax_sums``). The Triton kernel's tiles are its BLOCK_N
    rows: they must agree.
    """

    heads: torch.Tensor
    pairs: tuple[tuple[int, int], ...]
    logits: torch.Tensor
    stats: torch.Tensor
    slot: torch.Tensor
    prompt: int
    tile: int


def resolve_kernel(kernel: DecodeKernel, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA with triton installed, else 'torch'. Asking for 'triton'
    where it cannot run is an error, not a silent fallback."""
    if kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"decode kernel must be 'auto', 'triton' or 'torch', got {kernel!r}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and have_triton() else "torch"
    if kernel == "triton" and (device.type != "cuda" or not have_triton()):
        raise ValueError("decode kernel 'triton' needs a CUDA device and the triton package")
    return kernel


def check_inputs(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
    page_size: int,
) -> None:  # fmt: skip
    """Shapes, dtypes, strides and devices (never reads device memory)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [B, H_q, D], got {tuple(q.shape)}")
    if keys.ndim != 2 or keys.shape != values.shape or keys.shape[1] != q.shape[2]:
        raise ValueError(
            f"keys and values must be [R, D] each, one R, D = {q.shape[2]}, got {tuple(keys.shape)} and "
            f"{tuple(values.shape)}"
        )
    if q.dtype not in DTYPES or keys.dtype != q.dtype or values.dtype != q.dtype:
        raise ValueError(
            f"q, keys and values must share one dtype of {DTYPES}, got {q.dtype}, {keys.dtype} and {values.dtype}"
        )
    if keys.stride(1) != 1 or values.stride(1) != 1:
        raise ValueError(
            f"keys' and values' last dims must be contiguous (row strides may differ), got strides {keys.stride()} "
            f"and {values.stride()}"
        )
    if table.ndim != 3 or lengths.ndim != 2 or table.shape[:2] != lengths.shape or table.shape[0] != q.shape[0]:
        raise ValueError(
            f"table must be [B, H_kv, M] and lengths [B, H_kv] with B = {q.shape[0]}, got "
            f"{tuple(table.shape)} and {tuple(lengths.shape)}"
        )
    if table.dtype not in INDEX_DTYPES or lengths.dtype not in INDEX_DTYPES:
        raise ValueError(f"table and lengths must be int32 or int64, got {table.dtype} and {lengths.dtype}")
    if q.shape[1] % lengths.shape[1]:
        raise ValueError(f"H_q ({q.shape[1]}) must be a multiple of H_kv ({lengths.shape[1]})")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if len({t.device for t in (q, keys, values, table, lengths)}) != 1:
        raise ValueError("q, keys, values, table and lengths must be on one device")


def paged_decode_torch(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
    page_size: int, scale: float, width: int, tap: Tap | None = None,
) -> torch.Tensor:  # fmt: skip
    """q: [B, H_q, D] -> [B, H_q, D]. ``width``: a host bound of ``lengths`` (entries read
    per head; a fixed width gives fixed shapes); ``tap``: see ``Tap``."""
    check_inputs(q, keys, values, table, lengths, page_size)
    b, h_q, d = q.shape
    h_kv = lengths.shape[1]
    width = max(1, width)
    entries = torch.arange(width, device=q.device)  # [W]
    pages = table.gather(-1, (entries // page_size).clamp(max=table.shape[-1] - 1).expand(b, h_kv, width))
    rows = pages.long() * page_size + entries % page_size  # [B, H_kv, W] int64 (int32 tables too)
    exact = torch.float64 if q.dtype == torch.float64 else torch.float32  # float64: rounding-level references
    k = keys[rows].to(exact)  # [B, H_kv, W, D]
    v = values[rows].to(exact)
    qg = q.to(exact).view(b, h_kv, h_q // h_kv, d)  # [B, H_kv, G, D]
    scores = torch.einsum("bhgd,bhwd->bhgw", qg, k) * scale  # [B, H_kv, G, W]
    valid = (entries < lengths.unsqueeze(-1)).unsqueeze(2)  # [B, H_kv, 1, W]
    if tap is not None:
        _write_tap(tap, scores)
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgw,bhwd->bhgd", weights, v)  # [B, H_kv, G, D]
    return out.reshape(b, h_q, d).to(q.dtype)


def _write_tap(tap: Tap, scores: torch.Tensor) -> None:
    """The torch path's Tap: scores [B, H_kv, G, width] (scaled logits, width >= prompt)."""
    n, tile = tap.prompt, tap.tile
    tiles = -(-n // tile)
    for p, h in tap.pairs:
        s = scores[:, h, :, :n].float() * LOG2E  # [B, G, n]
        tap.logits[:, p].index_copy_(0, tap.slot, s.unsqueeze(0))
        padded = torch.nn.functional.pad(s, (0, tiles * tile - n), value=float("-inf")).unflatten(-1, (tiles, tile))
        m = padded.amax(-1)  # every tile holds an entry: finite
        total = torch.exp2(padded - m.unsqueeze(-1)).sum(-1)
        tap.stats[:, p].index_copy_(0, tap.slot, torch.stack([m, total], dim=-1).unsqueeze(0))


def paged_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
    page_size: int, scale: float, *, max_length: int, kernel: str = "torch", config: DecodeConfig | None = None,
    tap: Tap | None = None, work: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """q: [B, H_q, D]; keys, values: [R, D]; table: [B, H_kv, M]; lengths: [B, H_kv] ->
    [B, H_q, D]. Dispatch to ``kernel`` ('triton' or 'torch', see ``resolve_kernel``).
    ``max_length`` is a host bound of ``lengths``: it sizes the grid (triton) or the gather
    (torch) and must cover ``tap.prompt``; ``tap``: see ``Tap``; ``work``: the heads' total
    entries, a host estimate that balances the Triton grid (``plan_chunks``; any value is
    correct)."""
    if tap is not None and max_length < tap.prompt:
        raise ValueError(f"max_length {max_length} does not cover the tapped prompt ({tap.prompt})")
    if kernel == "triton":
        from hcpolicy.kernels._paged_decode_triton import paged_decode_triton

        check_inputs(q, keys, values, table, lengths, page_size)
        if q.dtype == torch.float64:
            raise ValueError("the Triton paged decode kernel takes bf16, fp16 or fp32; float64 runs with kernel='torch'")
        return paged_decode_triton(q, keys, values, table, lengths, page_size, float(scale), max_length,
                                   config or DecodeConfig(), tap=tap, work=work)  # fmt: skip
    if kernel == "torch":
        return paged_decode_torch(q, keys, values, table, lengths, page_size, scale, max_length, tap)
    raise ValueError(f"decode kernel must be 'triton' or 'torch', got {kernel!r}")
