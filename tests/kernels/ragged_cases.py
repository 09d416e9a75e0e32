"""Random ragged KV layouts and the float64 dense attention they are checked against."""

from __future__ import annotations

import torch


def random_layout(
    lengths: list[list[int]], dim: int, dtype: torch.dtype, gen: torch.Generator, *,
    device: str | torch.device = "cpu", max_gap: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """kv [S, 2, D], starts and lengths [B, H_kv] int64: segments placed in random order, each
    with spare capacity and a gap of up to ``max_gap`` rows before the next (gap rows hold
    random data too, so reading past a segment shows up as an error)."""
    batch, heads = len(lengths), len(lengths[0])
    order = torch.randperm(batch * heads, generator=gen, device=gen.device).tolist()
    starts = [[0] * heads for _ in range(batch)]

    def gap() -> int:
        return int(torch.randint(0, max_gap + 1, (), generator=gen, device=gen.device))

    at = gap()
    for i in order:
        b, h = divmod(i, heads)
        starts[b][h] = at
        at += lengths[b][h] + gap() + gap()  # spare capacity, then a gap
    rows = at + gap()
    kv = torch.randn(rows, 2, dim, generator=gen, device=gen.device).to(device=device, dtype=dtype)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return kv, as_tensor(starts), as_tensor(lengths)


def dense_attention_f64(
    q: torch.Tensor, kv: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """The padded-and-masked formulation the kernel replaces, in float64: gather every
    segment into [B, H_kv, L_max, D], mask rows past each length, softmax, weight V.
    Returns [B, H_q, D] float64; a zero-length segment gives zeros."""
    batch, h_q, dim = q.shape
    h_kv = starts.shape[1]
    l_max = max(1, int(lengths.max()))
    pos = torch.arange(l_max, device=kv.device)  # [L]
    valid = pos < lengths[..., None]  # [B, H_kv, L]
    idx = torch.where(valid, starts[..., None] + pos, 0)  # [B, H_kv, L]
    keys = kv[idx, 0].double()  # [B, H_kv, L, D]
    values = kv[idx, 1].double()
    qg = q.double().view(batch, h_kv, h_q // h_kv, dim)  # [B, H_kv, G, D]
    scores = torch.einsum("bhgd,bhld->bhgl", qg, keys) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)  # all-masked rows: zeros
    return torch.einsum("bhgl,bhld->bhgd", weights, values).reshape(batch, h_q, dim)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))
