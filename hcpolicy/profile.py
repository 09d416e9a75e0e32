"""HeadProfile: the offline artifact that says what each KV head is and how much it keeps.

Saved as versioned JSON with the fingerprint of the model it was measured on; loading it
for a model with another fingerprint fails with a message naming the difference.
"""

from __future__ import annotations

import enum
import json
import numbers
from pathlib import Path
from typing import Any

import attrs

from hcpolicy.spec import ModelSpec

FORMAT = "hcpolicy.head_profile"
VERSION = 1
# fingerprint fields added after version 1 was released: older files lack them
OPTIONAL_FINGERPRINT = frozenset({"num_query_heads"})


class Role(enum.Enum):
    ANCHOR = "anchor"  # unique, stable: compressed, never refreshed
    VOLATILE = "volatile"  # unique, drifting: full KV on the device
    PIVOT = "pivot"  # centre of a similar-head cluster: full KV, monitors drift
    SATELLITE = "satellite"  # member of a cluster: compressed, full KV on the host, recalled

    @property
    def full(self) -> bool:
        """Whether heads of this role keep their full KV on the device."""
        return self in (Role.VOLATILE, Role.PIVOT)


def _grid(value: Any) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(row) for row in value)


def _role(layer: int, head: int, value: Any) -> Role:
    try:
        return Role(value)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise ValueError(f"layer {layer} head {head}: unknown role {value!r} (known: {known})") from None


def _roles(value: Any) -> tuple[tuple[Role, ...], ...]:
    return tuple(tuple(_role(layer, head, r) for head, r in enumerate(row)) for layer, row in enumerate(value))


def _cluster_layer(layer: int, value: Any) -> dict[int, tuple[int, ...]]:
    try:
        return {_head(p): tuple(_head(s) for s in sats) for p, sats in value.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"layer {layer}: clusters must map pivot heads to lists of satellite heads, "
                         f"got {value!r}") from None  # fmt: skip


def _head(value: Any) -> int:
    """A head index from JSON: an int, or a string of one (JSON object keys)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(value)
    return int(value)


def _clusters(value: Any) -> tuple[dict[int, tuple[int, ...]], ...]:
    return tuple(_cluster_layer(layer, row) for layer, row in enumerate(value))


@attrs.frozen
class HeadProfile:
    """Per layer and KV head: role, stability, budget ratio; per layer: pivot -> satellites.

    roles/stability/ratios are [num_layers][num_kv_heads]; ratios are None for full heads.
    clusters[layer] maps each pivot to its satellites. ``settings`` records how the profile
    was measured (thresholds, k, pooling, calibration size) for reports.
    """

    fingerprint: dict[str, Any] = attrs.field(converter=dict)
    roles: tuple[tuple[Role, ...], ...] = attrs.field(converter=_roles)
    stability: tuple[tuple[float, ...], ...] = attrs.field(converter=_grid)
    ratios: tuple[tuple[float | None, ...], ...] = attrs.field(converter=_grid)
    clusters: tuple[dict[int, tuple[int, ...]], ...] = attrs.field(converter=_clusters)
    settings: dict[str, Any] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        layers = self.fingerprint.get("num_layers")
        heads = self.fingerprint.get("num_kv_heads")
        for name in ("roles", "stability", "ratios"):
            grid = getattr(self, name)
            if len(grid) != layers or any(len(row) != heads for row in grid):
                raise ValueError(f"profile {name} must be [{layers}][{heads}] to match its fingerprint")
        if len(self.clusters) != layers:
            raise ValueError(f"profile clusters must list {layers} layers")
        for layer, (roles, ratios, clusters) in enumerate(zip(self.roles, self.ratios, self.clusters)):
            self._check_layer(layer, roles, ratios, clusters)

    @staticmethod
    def _check_layer(
        layer: int, roles: tuple[Role, ...], ratios: tuple[float | None, ...], clusters: dict[int, tuple[int, ...]]
    ) -> None:
        for head, (role, ratio) in enumerate(zip(roles, ratios)):
            if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)):
                raise ValueError(f"layer {layer} head {head}: ratio must be a number or None, got {ratio!r}")
            if role.full != (ratio is None):
                raise ValueError(f"layer {layer} head {head}: a {role.value} head must have ratio "
                                 f"{'None' if role.full else 'a number'}, got {ratio!r}")
            if ratio is not None and not ratio > 0:
                raise ValueError(f"layer {layer} head {head}: ratio must be > 0, got {ratio}")
        for pivot, sats in clusters.items():
            for head in (pivot, *sats):
                if not 0 <= head < len(roles):
                    raise ValueError(f"layer {layer}: cluster {pivot} -> {list(sats)} names head {head}, "
                                     f"outside 0..{len(roles) - 1}")  # fmt: skip
        members = [s for sats in clusters.values() for s in sats]
        if len(members) != len(set(members)):
            raise ValueError(f"layer {layer}: a satellite belongs to more than one pivot")
        for pivot, sats in clusters.items():
            if roles[pivot] is not Role.PIVOT:
                raise ValueError(f"layer {layer}: cluster centre {pivot} is a {roles[pivot].value}, not a pivot")
            for s in sats:
                if roles[s] is not Role.SATELLITE:
                    raise ValueError(f"layer {layer}: cluster member {s} is a {roles[s].value}, not a satellite")
        orphans = [h for h, r in enumerate(roles) if r is Role.SATELLITE and h not in members]
        if orphans:
            raise ValueError(f"layer {layer}: satellites {orphans} have no pivot")

    # -- derived counts -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.roles)

    @property
    def total_heads(self) -> int:
        return sum(len(row) for row in self.roles)

    @property
    def num_full_heads(self) -> int:
        return sum(r.full for row in self.roles for r in row)

    @property
    def min_compression(self) -> float:
        """The fraction of the KV the full heads hold; compression must exceed it."""
        return self.num_full_heads / self.total_heads

    def role_counts(self) -> dict[str, int]:
        counts = {role.value: 0 for role in Role}
        for row in self.roles:
            for r in row:
                counts[r.value] += 1
        return counts

    def heads(self, layer: int, role: Role) -> tuple[int, ...]:
        return tuple(h for h, r in enumerate(self.roles[layer]) if r is role)

    # -- compatibility and persistence -----------------------------------------------------
    def check(self, spec: ModelSpec) -> None:
        """Raise ValueError if this profile was measured on a model other than ``spec``.

        Fields in ``OPTIONAL_FINGERPRINT`` that a profile lacks (files written before they
        were recorded) are unknown, not a mismatch; present, they must match."""
        expected = spec.fingerprint()
        diffs = [
            f"{k}: profile has {self.fingerprint.get(k)!r}, model has {v!r}"
            for k, v in expected.items()
            if self.fingerprint.get(k) != v and not (k in OPTIONAL_FINGERPRINT and k not in self.fingerprint)
        ]
        if diffs:
            raise ValueError("head profile does not match this model (" + "; ".join(diffs) + ")")

    def shard(self, rank: int, ranks: int) -> "HeadProfile":
        """The profile of tensor-parallel rank ``rank`` of ``ranks``: KV heads are split into
        ``ranks`` contiguous slices (as SGLang and vLLM split them), and this rank's slice is
        renumbered from 0. A pivot and its satellites must fall in one slice (the satellites
        are recalled from the pivot's attention, which only its rank computes): otherwise a
        ValueError names the cluster and the tensor-parallel sizes this profile does fit."""
        heads = self.fingerprint["num_kv_heads"]
        if ranks < 1 or not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} of {ranks} ranks")
        if heads % ranks:
            raise ValueError(f"{heads} KV heads do not split evenly over {ranks} tensor-parallel ranks "
                             "(replicated KV heads are not supported)")  # fmt: skip
        crossing = self._crossing(ranks)
        if crossing:
            fits = [n for n in range(1, heads + 1) if heads % n == 0 and not self._crossing(n)]
            layer, pivot, sats = crossing
            raise ValueError(
                f"layer {layer}: pivot {pivot} and its satellites {list(sats)} fall on different tensor-parallel "
                f"ranks at --tp-size {ranks}; this profile fits --tp-size {', '.join(map(str, fits))}"
            )
        width = heads // ranks
        lo, hi = rank * width, (rank + 1) * width
        fingerprint = dict(self.fingerprint, num_kv_heads=width)
        if "num_query_heads" in fingerprint:
            fingerprint["num_query_heads"] = fingerprint["num_query_heads"] // ranks
        clusters = [{p - lo: tuple(s - lo for s in sats) for p, sats in layer.items() if lo <= p < hi}
                    for layer in self.clusters]  # fmt: skip
        return HeadProfile(
            fingerprint=fingerprint, roles=[row[lo:hi] for row in self.roles],
            stability=[row[lo:hi] for row in self.stability], ratios=[row[lo:hi] for row in self.ratios],
            clusters=clusters, settings=dict(self.settings, tensor_parallel=[rank, ranks]),
        )  # fmt: skip

    def _crossing(self, ranks: int) -> tuple[int, int, tuple[int, ...]] | None:
        """The first cluster whose heads span two of ``ranks`` slices, or None."""
        width = self.fingerprint["num_kv_heads"] // ranks
        for layer, clusters in enumerate(self.clusters):
            for pivot, sats in clusters.items():
                if any(s // width != pivot // width for s in sats):
                    return layer, pivot, sats
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "roles": [[r.value for r in row] for row in self.roles],
            "stability": [list(row) for row in self.stability],
            "ratios": [list(row) for row in self.ratios],
            "clusters": [{str(p): list(s) for p, s in layer.items()} for layer in self.clusters],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadProfile":
        if not isinstance(data, dict):
            raise ValueError(f"not a head profile: expected a JSON object with \"format\": {FORMAT!r}, "
                             f"got a {type(data).__name__}")  # fmt: skip
        if data.get("format") != FORMAT:
            raise ValueError(f"not a head profile (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"head profile version {data.get('version')!r} is not supported (expected {VERSION})")
        try:
            return cls(
                fingerprint=data["fingerprint"],
                roles=data["roles"],
                stability=data["stability"],
                ratios=data["ratios"],
                clusters=data["clusters"],
                settings=data.get("settings", {}),
            )
        except KeyError as missing:
            raise ValueError(f"head profile is missing the field {missing}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, spec: ModelSpec | None = None) -> "HeadProfile":
        """Read a profile; with ``spec``, also check it belongs to that model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no head profile at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        try:
            profile = cls.from_dict(data)
            if spec is not None:
                profile.check(spec)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return profile
