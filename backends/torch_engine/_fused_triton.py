"""Triton kernels of ``fused`` and of the fused KV append (imported only on CUDA with triton).

Every kernel computes in float32 and rounds to the tensor dtype where the torch reference
rounds (each bf16 op's result), so the two differ only by reduction order and libm ulps.
Shapes are fixed by the inputs and nothing reads the host: all of them run inside the
captured decode graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, t_ptr, n, eps, stride_x, stride_r, stride_y, stride_t,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    dtype = x.dtype
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        total = (h + r).to(dtype)  # the residual stream stays in the model dtype, as x + r in torch
        tl.store(t_ptr + row * stride_t + offs, total, mask=ok)
        h = total.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n
    normed = (h * tl.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (normed.to(tl.float32) * w).to(dtype), mask=ok)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """x, residual: [..., N] -> (rmsnorm(x + residual) * weight, x + residual) (None without residual)."""
    n = x.shape[-1]
    if weight.shape != (n,) or x.stride(-1) != 1 or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: x {tuple(x.shape)}, residual, weight {tuple(weight.shape)} do not agree")
    x2 = x.reshape(-1, n)
    r2 = x2 if residual is None else residual.reshape(-1, n)
    y = torch.empty_like(x2)
    total = torch.empty_like(x2) if residual is not None else y
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, y, total, n, eps, x2.stride(0), r2.stride(0), y.stride(0), total.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return y.view(x.shape), (total.view(x.shape) if residual is not None else None)


@triton.jit
def _rope_kernel(
    qkv_ptr, pos_ptr, inv_ptr, q_ptr, k_ptr, q_len, stride_row, H_Q, H_KV,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # b * Q + t
    head = tl.program_id(1)  # q heads first, then k heads
    b = row // q_len
    t = row % q_len
    offs = tl.arange(0, BLOCK)
    ok = offs < HALF
    src = qkv_ptr + row * stride_row + head * D
    if head < H_Q:
        dst = q_ptr + ((b * H_Q + head) * q_len + t) * D
    else:
        dst = k_ptr + ((b * H_KV + (head - H_Q)) * q_len + t) * D
    x1 = tl.load(src + offs, mask=ok, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=ok, other=0.0)
    dtype = x1.dtype
    freq = tl.load(pos_ptr + row).to(tl.float32) * tl.load(inv_ptr + offs, mask=ok, other=0.0)
    c = libdevice.cos(freq).to(dtype).to(tl.float32)  # cos/sin tables are in the model dtype in torch
    s = libdevice.sin(freq).to(dtype).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    out1 = (a1 * c).to(dtype).to(tl.float32) + (-a2 * s).to(dtype).to(tl.float32)
    out2 = (a2 * c).to(dtype).to(tl.float32) + (a1 * s).to(dtype).to(tl.float32)
    tl.store(dst + offs, out1.to(dtype), mask=ok)
    tl.store(dst + HALF + offs, out2.to(dtype), mask=ok)


def rope_qk(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, h_q: int, h_kv: int,
            d: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """qkv: [B, Q, (H_q + 2 H_kv) D]; positions: [B, Q] int64; inv_freq [D / 2] float32 ->
    q [B, H_q, Q, D], k [B, H_kv, Q, D] contiguous, rotate-half RoPE applied."""
    b, q_len, width = qkv.shape
    if width != (h_q + 2 * h_kv) * d or qkv.stride(-1) != 1 or qkv.stride(0) != q_len * qkv.stride(1):
        raise ValueError(f"rope_qk: qkv {tuple(qkv.shape)} is not a row-major [B, Q, (H_q + 2 H_kv) D]")
    if positions.shape != (b, q_len) or not positions.is_contiguous() or inv_freq.dtype != torch.float32:
        raise ValueError("rope_qk: positions must be contiguous [B, Q] and inv_freq float32")
    q = torch.empty(b, h_q, q_len, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(b, h_kv, q_len, d, dtype=qkv.dtype, device=qkv.device)
    half = d // 2
    _rope_kernel[(b * q_len, h_q + h_kv)](
        qkv, positions, inv_freq, q, k, q_len, qkv.stride(1), h_q, h_kv,
        D=d, HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1,
    )  # fmt: skip
    return q, k


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, inter, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=ok, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)  # F.silu rounds to the dtype before the mul
    tl.store(y_ptr + row * stride_y + offs, (act.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 I] (gate then up) -> silu(gate) * up [..., I]."""
    two = gate_up.shape[-1]
    if two % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul: last dim must be even and contiguous, got {tuple(gate_up.shape)}")
    x = gate_up.reshape(-1, two)
    inter = two // 2
    y = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](x, y, inter, x.stride(0), y.stride(0), BLOCK=block,
                                                              num_warps=4)  # fmt: skip
    return y.view(*gate_up.shape[:-1], inter)


@triton.jit
def _append_kernel(
    kv_ptr, pos_ptr, table_ptr, lengths_ptr, k_ptr, v_ptr, logical_ptr, page_size, max_pages,
    stride_kvs, stride_kvt, stride_tb, stride_th, stride_lb, stride_lh, stride_kb, stride_kh, stride_vb, stride_vh,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    b = tl.program_id(1)
    length_ptr = lengths_ptr + b * stride_lb + h * stride_lh
    length = tl.load(length_ptr)
    page = tl.load(table_ptr + b * stride_tb + h * stride_th + tl.minimum(length // page_size, max_pages - 1))
    row = page * page_size + length % page_size
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs, mask=ok)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs, mask=ok)
    tl.store(kv_ptr + row * stride_kvs + offs, k, mask=ok)
    tl.store(kv_ptr + row * stride_kvs + stride_kvt + offs, v, mask=ok)
    tl.store(pos_ptr + row, tl.load(logical_ptr + b))
    tl.store(length_ptr, length + 1)


def append_kv(kv: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, logical: torch.Tensor, page_size: int) -> None:  # fmt: skip
    """One token per (sequence, KV head): k, v [B, H, 1, D] into pool rows at each head's
    length (kv [R, 2, D], positions [R]; table [B, H, M], lengths [B, H] int64, bumped by
    one); logical [B] the token's position."""
    b, h, _, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv.stride(-1) != 1 or table.stride(-1) != 1:
        raise ValueError("append_kv: last dims must be contiguous")
    if lengths.shape != (b, h) or table.shape[:2] != (b, h) or logical.shape != (b,):
        raise ValueError("append_kv: table, lengths and logical disagree with k's [B, H]")
    _append_kernel[(h, b)](
        kv, positions, table, lengths, k, v, logical, page_size, table.shape[-1],
        kv.stride(0), kv.stride(1), table.stride(0), table.stride(1), lengths.stride(0), lengths.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), D=d, BLOCK_D=triton.next_power_of_2(d), num_warps=1,
    )  # fmt: skip
