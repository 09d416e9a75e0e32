"""Policies: the Policy ABC, the scored-selection template, HeteroCache and the baselines."""

from hcpolicy.policy.base import Policy, ScoredPolicy

__all__ = ["Policy", "ScoredPolicy"]
