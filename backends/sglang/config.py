"""The plugin's settings, read from environment variables.

SGLang runs the model in a spawned scheduler process and rebuilds ``ServerArgs`` there
from its own dataclass fields, so extra command-line flags would not reach it; the
environment does. Everything is parsed and checked when an ``hcpolicy_*`` attention
backend is built, and a bad value stops the server with an error naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs

from hcpolicy.policy.base import Policy
from hcpolicy.policy.factory import build_policy
from hcpolicy.profile import HeadProfile
from hcpolicy.registry import POLICIES

POLICY_VAR = "HCPOLICY_POLICY"
COMPRESSION_VAR = "HCPOLICY_COMPRESSION"
PROFILE_VAR = "HCPOLICY_PROFILE"
DEFAULT_COMPRESSION = 0.5


def _known_policy(_inst: object, _attr: attrs.Attribute, value: str) -> None:
    if value not in POLICIES:
        raise ValueError(f"{POLICY_VAR}={value!r} is not a policy; choices: {', '.join(POLICIES.names())}")


def _compression(_inst: object, _attr: attrs.Attribute, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{COMPRESSION_VAR} must be in (0, 1] (the fraction of the prompt's KV kept), got {value}")


@attrs.frozen
class PolicyConfig:
    """Which policy every request gets, at which compression, with which head profile."""

    policy: str = attrs.field(validator=_known_policy)
    compression: float = attrs.field(default=DEFAULT_COMPRESSION, validator=_compression)
    profile: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "PolicyConfig":
        """Read ``HCPOLICY_POLICY`` (required), ``HCPOLICY_COMPRESSION`` (default 0.5) and
        ``HCPOLICY_PROFILE`` (a head-profile JSON; heterocache needs one)."""
        env = os.environ if environ is None else environ
        name = env.get(POLICY_VAR, "").strip()
        if not name:
            raise ValueError(
                f"{POLICY_VAR} is not set: an hcpolicy_* attention backend needs a policy; "
                f"choices: {', '.join(POLICIES.names())}"
            )
        raw = env.get(COMPRESSION_VAR, "").strip()
        try:
            compression = float(raw) if raw else DEFAULT_COMPRESSION
        except ValueError:
            raise ValueError(f"{COMPRESSION_VAR} must be a number in (0, 1], got {raw!r}") from None
        profile = env.get(PROFILE_VAR, "").strip() or None
        if profile is not None and not Path(profile).is_file():
            raise ValueError(f"{PROFILE_VAR}={profile!r} is not a file")
        return cls(policy=name, compression=compression, profile=profile)

    def load_profile(self) -> HeadProfile | None:
        return None if self.profile is None else HeadProfile.load(self.profile)

    def make_policy(self, profile: HeadProfile | None) -> Policy:
        """A fresh policy instance (policies keep per-generation state: one per request)."""
        try:
            return build_policy(self.policy, self.compression, profile=profile)
        except ValueError as exc:
            if profile is None and "profile" in str(exc):
                raise ValueError(f"{exc} (for SGLang: set {PROFILE_VAR}=P.json)") from None
            raise
