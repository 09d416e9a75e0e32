"""Head classification: stability, similarity graph, greedy star clustering, budget ratios."""

from __future__ import annotations

from typing import Any

import torch

from hcpolicy.profile import HeadProfile, Role
from hcpolicy.scores import overlap
from hcpolicy.spec import ModelSpec


def stability(decode_sets: torch.Tensor, prefill_sets: torch.Tensor, universe: int) -> torch.Tensor:
    """S(h) = median over decode steps of O(topk_t, topk_prefill).

    decode_sets: [T, N, H, k]; prefill_sets: [N, H, k] (N calibration samples). The median is
    taken per sample, then averaged over samples. Returns float32 [H].
    """
    per_step = overlap(decode_sets, prefill_sets.unsqueeze(0), universe)  # [T, N, H]
    return per_step.median(dim=0).values.mean(dim=0)


def pairwise_overlap(sets: torch.Tensor, universe: int) -> torch.Tensor:
    """Overlap between every pair of heads of one layer: [..., H, k] -> [..., H, H]."""
    return overlap(sets.unsqueeze(-2), sets.unsqueeze(-3), universe)


def similarity_graph(step_sets: torch.Tensor, universe: int, tau_sim: float) -> torch.Tensor:
    """Edges between heads of one layer whose top-k sets overlap >= tau_sim.

    step_sets: [T, N, H, k] sets at the steps to compare (T = 1 for the reference code's
    single prefill step); the pairwise overlap is a median over steps, mean over samples.
    Returns bool [H, H] with an empty diagonal.
    """
    pair = pairwise_overlap(step_sets, universe).median(dim=0).values.mean(dim=0)  # [H, H]
    adj = pair >= tau_sim
    adj.fill_diagonal_(False)
    return adj


def star_clusters(adjacency: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """Greedy star clustering of an undirected graph [H, H] bool.

    Repeatedly take the unassigned head with the most unassigned neighbours (lowest index
    on ties) as a pivot and make those neighbours its satellites; stop when no unassigned
    head has an unassigned neighbour. Returns pivot -> satellites (ascending).
    """
    adj = adjacency.clone().bool().cpu()
    adj = adj | adj.T
    adj.fill_diagonal_(False)
    free = torch.ones(adj.shape[0], dtype=torch.bool)
    clusters: dict[int, tuple[int, ...]] = {}
    while True:
        live = adj & free.unsqueeze(0) & free.unsqueeze(1)
        degree = live.sum(dim=1)
        best = int(degree.argmax())
        if degree[best] == 0:
            return clusters
        members = tuple(int(j) for j in torch.nonzero(live[best]).flatten())
        clusters[best] = members
        free[best] = False
        free[list(members)] = False


def inverse_stability_ratios(stab: torch.Tensor, compressible: torch.Tensor, eps: float) -> torch.Tensor:
    """r_h = (1 / (S_h + eps)) / mean over compressible heads of 1 / (S + eps).

    stab, compressible: [num_layers, H_kv]; normalised over all layers at once (the global
    mean of r over compressible heads is 1). Entries of full heads are NaN.
    """
    weight = 1.0 / (stab.double() + eps)
    mean = weight[compressible].mean()
    return torch.where(compressible, weight / mean, torch.nan)


def build_profile(
    spec: ModelSpec,
    stab: torch.Tensor,
    adjacency: torch.Tensor,
    *,
    tau_stable: float,
    eps: float = 1e-6,
    settings: dict[str, Any] | None = None,
) -> HeadProfile:
    """Classify every head and assemble the profile.

    stab: [num_layers, H_kv] stability; adjacency: [num_layers, H_kv, H_kv] similarity edges.
    """
    roles: list[list[Role]] = []
    clusters: list[dict[int, tuple[int, ...]]] = []
    for layer in range(spec.num_layers):
        layer_clusters = star_clusters(adjacency[layer])
        row = [Role.ANCHOR if float(s) >= tau_stable else Role.VOLATILE for s in stab[layer]]
        for pivot, sats in layer_clusters.items():
            row[pivot] = Role.PIVOT
            for s in sats:
                row[s] = Role.SATELLITE
        roles.append(row)
        clusters.append(layer_clusters)
    compressible = torch.tensor([[not r.full for r in row] for row in roles])
    if not compressible.any():
        raise ValueError("every head is a pivot or volatile: nothing left to compress")
    ratios = inverse_stability_ratios(stab, compressible, eps)
    return HeadProfile(
        fingerprint=spec.fingerprint(),
        roles=[[r.value for r in row] for row in roles],
        stability=stab.double().tolist(),
        ratios=[[None if r.full else float(x) for r, x in zip(rrow, xrow)] for rrow, xrow in zip(roles, ratios)],
        clusters=clusters,
        settings=settings or {},
    )
