"""attrs validators shared by the records; each raises ValueError with the field's name.

torch is imported only by the tensor validators, when they first run: records that hold no
tensors (results, tasks, specs, profiles) load without it, which keeps ``hc`` quick to start.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch


def positive(_inst: Any, attribute: attrs.Attribute, value: int | float) -> None:
    if isinstance(value, bool) or value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def non_negative(_inst: Any, attribute: attrs.Attribute, value: int | float) -> None:
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def integer(minimum: int) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Validator: an int (not a bool) >= ``minimum``."""

    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{attribute.name} must be an integer >= {minimum}, got {value!r}")

    return check


def real(name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (not a bool, not a string), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_compression(value: Any, name: str = "compression") -> float:
    """A compression: the fraction of the prompt's KV kept on the device, a real number in
    (0, 1]. Returns it as a float; raises ValueError saying what to pass otherwise."""
    if not 0.0 < real(name, value) <= 1.0:
        raise ValueError(
            f"{name} must be in (0, 1] (the fraction of the prompt's KV kept on the device), got {value!r}"
        )
    return float(value)


def is_compression(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: ``check_compression`` for an attrs field."""
    check_compression(value, attribute.name)


def fraction(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    """A real number in (0, 1]."""
    if not 0.0 < real(attribute.name, value) <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


def unit_interval(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    """A real number (a threshold) in [0, 1]."""
    if not 0.0 <= real(attribute.name, value) <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


def tensor(*, ndim: int, dtype: torch.dtype | None = None):
    """Validator: a torch.Tensor with ``ndim`` dimensions (and ``dtype`` when given)."""

    def check(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        import torch  # already imported by whoever made the tensor

        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{attribute.name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != ndim:
            raise ValueError(f"{attribute.name} must have {ndim} dims, got shape {tuple(value.shape)}")
        if dtype is not None and value.dtype != dtype:
            raise ValueError(f"{attribute.name} must be {dtype}, got {value.dtype}")

    return check


def optional_tensor(*, ndim: int, dtype: torch.dtype | None = None):
    inner = tensor(ndim=ndim, dtype=dtype)

    def check(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            inner(inst, attribute, value)

    return check
