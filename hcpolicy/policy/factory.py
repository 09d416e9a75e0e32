"""Building a registered policy by name with a compression, the way the CLI and runner do."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import attrs

from hcpolicy._validate import check_compression
from hcpolicy.policy.base import Policy
from hcpolicy.profile import HeadProfile
from hcpolicy.registry import POLICIES

PROFILES_PACKAGE = "hcpolicy.profiles"


def build_policy(name: str, compression: float, *, profile: HeadProfile | None = None) -> Policy:
    """``POLICIES.get(name)`` built with ``compression`` (and ``profile``) where it takes them.

    Raises ValueError when ``compression`` is not a real number in (0, 1] (checked for
    every policy, those that keep everything too), the policy needs a profile and none is
    given, or it refuses the compression (heterocache below its profile's floor).
    """
    compression = check_compression(compression)
    cls = POLICIES.get(name)
    fields = {f.alias or f.name for f in attrs.fields(cls) if f.init} if attrs.has(cls) else set()
    kwargs: dict[str, object] = {}
    if "compression" in fields:
        kwargs["compression"] = compression
    if "profile" in fields:
        if profile is None:
            raise ValueError(f"{name} needs a head profile: run `hc profile --output P.json` and pass --profile P.json")
        kwargs["profile"] = profile
    return cls(**kwargs)


def default_profile_path(model_name: str) -> Path | None:
    """The profile shipped inside the package for ``model_name``, if there is one."""
    path = resources.files(PROFILES_PACKAGE) / f"{model_name}.json"
    return Path(str(path)) if path.is_file() else None
