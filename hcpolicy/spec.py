"""ModelSpec: the attention shape a policy is planned against, and the fingerprint profiles carry."""

from __future__ import annotations

import attrs

from hcpolicy._validate import positive


@attrs.frozen
class ModelSpec:
    """Attention geometry of a decoder-only model.

    ``num_query_heads`` (H_q) must be a multiple of ``num_kv_heads`` (H_kv); G = H_q / H_kv.
    ``architecture`` is a free-form family name (``"LlamaForCausalLM"``, ``"synthetic"``).
    """

    architecture: str = attrs.field(validator=attrs.validators.min_len(1))
    num_layers: int = attrs.field(validator=positive)
    num_query_heads: int = attrs.field(validator=positive)
    num_kv_heads: int = attrs.field(validator=positive)
    head_dim: int = attrs.field(validator=positive)
    max_position: int | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.num_query_heads % self.num_kv_heads:
            raise ValueError(
                f"num_query_heads ({self.num_query_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.max_position is not None and self.max_position < 1:
            raise ValueError(f"max_position must be >= 1, got {self.max_position}")

    @property
    def group_size(self) -> int:
        """G: query heads sharing one KV head."""
        return self.num_query_heads // self.num_kv_heads

    @property
    def total_kv_heads(self) -> int:
        """KV heads over all layers (the H of the budget formula)."""
        return self.num_layers * self.num_kv_heads

    def fingerprint(self) -> dict[str, object]:
        """What a profile must match to be applied to this model."""
        return {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }
