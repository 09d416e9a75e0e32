"""The decoder's small elementwise steps, as one launch each (Triton) or as plain torch ops.

A decode step at batch 1 is bound by a few hundred tiny kernels more than by its GEMMs:
RMSNorm as pow/mean/add/rsqrt/mul/mul, RoPE as slices/neg/cat/mul/add for q and for k,
SiLU then mul, the residual adds. ``TritonOps`` does each of those in one launch:

- ``add_rms_norm``: ``residual = x + residual; y = rmsnorm(residual) * w`` (one read of each);
- ``rope_qkv``: RoPE of every q and k head of the fused qkv projection, cos/sin computed
  in the kernel from the positions (no cos/sin tensors per forward);
- ``silu_mul``: ``silu(gate) * up`` of the fused gate/up projection.

``TorchOps`` is the reference: the exact torch code the model ran before (so CPU results
and the exactness tests against transformers are unchanged). Both round where torch
rounds (each bf16 op's result), so they agree to a few bf16 ulps; tests state tolerances.

``resolve_ops``: ``fused=None`` picks Triton on CUDA with triton installed, torch
elsewhere; ``fused=True`` where Triton cannot run is an error; ``False`` forces torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hcpolicy.kernels._triton import have_triton

from .rope import apply_rope, rope_cos_sin

FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class TorchOps:
    """Reference implementations (any device)."""

    fused = False

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [..., N] -> [..., N]; float32 statistics, scaled in x's dtype (as transformers)."""
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """-> (rms_norm(x + residual), x + residual)."""
        total = x + residual
        return self.rms_norm(total, weight, eps), total

    def rope_setup(self, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> object:
        """What ``rope_qkv`` needs for one forward: here cos, sin [B, 1, Q, D]."""
        return rope_cos_sin(inv_freq, positions, dtype)

    def rope_qkv(self, qkv: torch.Tensor, rope: object, h_q: int, h_kv: int,
                 d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """qkv: [B, Q, (H_q + 2 H_kv) D] -> q [B, H_q, Q, D], k, v [B, H_kv, Q, D] (RoPE on q, k)."""
        cos, sin = rope  # type: ignore[misc]
        b, q_len, _ = qkv.shape
        q, k, v = qkv.split([h_q * d, h_kv * d, h_kv * d], dim=-1)
        q = q.view(b, q_len, h_q, d).transpose(1, 2)
        k = k.view(b, q_len, h_kv, d).transpose(1, 2)
        v = v.view(b, q_len, h_kv, d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2 I] (gate then up) -> [..., I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps(TorchOps):
    """One Triton launch per op (CUDA). Inputs are checked for what the kernels assume."""

    fused = True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from ._fused_triton import rms_norm

        return rms_norm(x, None, weight, eps)[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        from ._fused_triton import rms_norm

        y, total = rms_norm(x, residual, weight, eps)
        return y, total  # type: ignore[return-value]

    def rope_setup(self, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> object:
        return inv_freq, positions

    def rope_qkv(self, qkv: torch.Tensor, rope: object, h_q: int, h_kv: int,
                 d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        from ._fused_triton import rope_qk

        inv_freq, positions = rope  # type: ignore[misc]
        b, q_len, _ = qkv.shape
        q, k = rope_qk(qkv, positions, inv_freq, h_q, h_kv, d)
        v = qkv[..., (h_q + h_kv) * d :].view(b, q_len, h_kv, d).transpose(1, 2)  # a view: no copy
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        from ._fused_triton import silu_mul

        return silu_mul(gate_up)


TORCH_OPS = TorchOps()


def resolve_ops(fused: bool | None, device: torch.device, dtype: torch.dtype) -> TorchOps:
    """None: Triton ops on CUDA with triton (and a dtype they take), else torch; True:
    Triton or a ValueError saying why not; False: torch."""
    usable = device.type == "cuda" and have_triton() and dtype in FUSED_DTYPES
    if fused is None:
        return TritonOps() if usable else TORCH_OPS
    if fused and not usable:
        raise ValueError(
            f"fused_kernels=True needs a CUDA device, the triton package and a dtype of {FUSED_DTYPES}; "
            f"got device {device.type}, dtype {dtype}, triton {'present' if have_triton() else 'missing'}"
        )
    return TritonOps() if fused else TORCH_OPS
