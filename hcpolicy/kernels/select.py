"""The k-th largest value of each row of non-negative scores, and how many copies of it
the top-k takes.

Selecting the top-k of ``x [R, L]`` by a threshold needs two numbers per row: the k-th
largest value v, and ties = k - count(x > v), the copies of v the top-k keeps (>= 1):
"x > v, plus the first ``ties`` elements equal to v" is exactly k elements.

On CUDA the work runs as a radix select over the float bits, see ``_select_triton``: a
fixed number of launches, no host sync, so it can be captured in a CUDA graph. Elsewhere
(and on CUDA without triton) it runs ``kth_largest_reference``: torch.topk (or a sort, for
per-row k) and one comparison.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Union

import torch

from hcpolicy.kernels._triton import have_triton

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")


class KthLargest(NamedTuple):
    """values: [R] float32, the k-th largest value of each row (+0.0 for a zero);
    ties: [R] int64, k - count(x[r] > values[r]), in [1, k]."""

    values: torch.Tensor
    ties: torch.Tensor


def _validate(x: torch.Tensor, k: Union[int, torch.Tensor]) -> None:
    """Shapes, dtypes and devices only: nothing here reads device memory."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be [R, L], got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")
    rows, length = x.shape
    if length < 1:
        raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
    if isinstance(k, torch.Tensor):
        if k.dtype == torch.bool or k.dtype.is_floating_point or k.dtype.is_complex:
            raise ValueError(f"a tensor k must have an integer dtype, got {k.dtype}")
        if k.shape not in ((), (rows,)):
            raise ValueError(f"a tensor k must be a scalar or [R] with R = {rows}, got shape {tuple(k.shape)}")
        if k.device != x.device:
            raise ValueError(f"k must be on x's device ({x.device}), got {k.device}")
    elif isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int or an integer tensor, got {type(k).__name__}")
    elif not 1 <= k <= length:
        raise ValueError(f"k must be in [1, L] = [1, {length}], got {k}")


def _resolve(backend: str, x: torch.Tensor) -> str:
    """'triton' or 'torch'; an explicit 'triton' that cannot run raises instead of falling back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    usable = x.is_cuda and have_triton()
    if backend == "triton" and not usable:
        raise ValueError(
            f"backend='triton' needs a CUDA tensor and triton installed, got a {x.device.type} tensor"
            f"{'' if have_triton() else ' and no triton'}"
        )
    return "triton" if usable else "torch"


def kth_largest(x: torch.Tensor, k: Union[int, torch.Tensor], *, backend: Backend = "auto",
                top_histogram: torch.Tensor | None = None) -> KthLargest:  # fmt: skip
    """x: [R, L] float32, contiguous, every value >= 0 and finite (probabilities, scores);
    k: a host int in [1, L], or an integer tensor (a scalar or [R], per row) on x's device.
    Returns ``KthLargest(values [R] float32, ties [R] int64)``: ``values[r]`` equals
    ``x[r].sort(descending=True).values[k - 1]`` (torch.topk's last value; a zero comes
    back as +0.0, -0.0 counts as 0) and ``ties[r] = k - count(x[r] > values[r])``.

    Neither path syncs the host, so with a host int k (or a tensor k) the call can be
    captured in a CUDA graph. Not checked, since that would sync: x's values (a negative
    or NaN gives unspecified results) and a tensor k's values (both paths clamp them into
    [1, L]). top_histogram: [R, 256] int32, the counts of each row's top byte (bits 24-31
    of ``x``'s float32 bits, sign cleared), if the kernel that wrote ``x`` counted them
    (``window_scores`` can): the Triton path then skips its first pass over ``x`` (it
    zeroes the tensor as it goes; the torch path ignores it). backend: 'auto' runs triton
    on CUDA when it is installed, torch otherwise;
    'triton' raises ValueError where it cannot run.
    """
    _validate(x, k)
    if _resolve(backend, x) == "torch":
        return kth_largest_reference(x, k)
    from hcpolicy.kernels._select_triton import kth_largest_triton

    return kth_largest_triton(x, k, top_histogram=top_histogram)


def kth_largest_reference(x: torch.Tensor, k: Union[int, torch.Tensor]) -> KthLargest:
    """Same contract as ``kth_largest``, in plain torch: torch.topk for a host int k, a
    descending sort and a gather for a tensor k."""
    _validate(x, k)
    rows, length = x.shape
    if isinstance(k, torch.Tensor):
        k_rows = k.to(torch.int64).clamp(1, length).expand(rows)  # [R]
        ordered = x.sort(dim=1, descending=True).values  # [R, L]
        values = ordered.gather(1, (k_rows - 1)[:, None]).squeeze(1)  # [R]
    else:
        k_rows = torch.full((rows,), k, dtype=torch.int64, device=x.device)  # [R]
        values = torch.topk(x, k, dim=1).values[:, -1]  # [R]
    values = values + 0.0  # -0.0 + 0.0 = +0.0: the radix select returns +0.0 for a zero
    ties = k_rows - (x > values[:, None]).sum(dim=1)  # [R]
    return KthLargest(values, ties)
