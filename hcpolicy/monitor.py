"""Window monitors as data: a policy's drift decisions in a form a backend can run on the device.

A policy whose decode-time decisions are "every ``window`` steps, score each monitored
head's buffered queries over its prompt keys, compare each query's top-``k`` set with a
reference set, and let a trigger fire on the window's overlaps" (HeteroCache) can hand
that recipe to a backend as a ``WindowPlan`` (``Policy.window_plan``). A backend that
records the monitored heads' prompt logits inside its decode step (the torch engine's
decode kernel does, for free, since it reads those keys anyway) then computes, on the
device and without a host sync:

    probs   = softmax over the prompt of each query head's logits      [W, P, B, G, L]
    scores  = pool(reduce over the G query heads of the group)          [W, P, B, L]
    overlap = |top-k(scores) ∩ reference| / k                           [P, B, W]
    fired   = plan.fire(overlap)                                        [P, B] bool

and asks the policy for actions only where something fired (``plan.act``): one host
read per window instead of the policy's Python scoring. The policy stays the authority:
``fire`` and ``act`` are its own code, and ``references`` its own state.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from hcpolicy.actions import Action
from hcpolicy.kernels.window_scores import overlap_counts
from hcpolicy.scores import Reduce

# (fired [P, B] on the device, fired_host: the same as host lists (monitor, sequence),
#  newest scores [P, B, L] of the window's last query (probabilities), positions [B, L] of the
#  prompt, ascending along L) -> actions per layer
Act = Callable[[torch.Tensor, list[list[bool]], torch.Tensor, torch.Tensor], dict[int, list[Action]]]


@attrs.frozen
class WindowPlan:
    """monitors: (layer, KV head) of each monitored head, in layer order (index p of the
    tensors above); window: queries per decision; k: the top-k size; pool_kernel, gqa: as
    ``scores.pool1d`` (average, edges count only real neighbours) and ``group_reduce``;
    references: () -> [P, B, k] int64, the reference sets now; fire: overlaps [P, B, W] ->
    fired [P, B] (device ops only: it is captured in CUDA graphs); act: see ``Act``."""

    monitors: tuple[tuple[int, int], ...]
    window: int
    k: int
    pool_kernel: int
    gqa: Reduce
    references: Callable[[], torch.Tensor]
    fire: Callable[[torch.Tensor], torch.Tensor]
    act: Act


def reference_masks(references: torch.Tensor, universe: int) -> torch.Tensor:
    """Index sets [P, B, k] -> membership masks [P, B, universe] bool."""
    masks = torch.zeros(*references.shape[:-1], universe, dtype=torch.bool, device=references.device)
    return masks.scatter_(-1, references, True)


def window_overlaps(scores: torch.Tensor, thresholds: torch.Tensor, ties: torch.Tensor, masks: torch.Tensor,
                    k: int) -> torch.Tensor:  # fmt: skip
    """Overlap of each row's top-k set with its reference, from the k-th largest value.

    scores: [W, P, B, L]; thresholds, ties: [W, P, B] (the k-th largest value and how many
    entries equal to it the top-k takes); masks: [P, B, L] reference membership.
    Returns [P, B, W] float32. Entries above the threshold are in the top-k; of those
    equal to it, reference members count first (a top-k breaks such ties arbitrarily).
    """
    w, p, b, n = scores.shape
    counts = overlap_counts(scores.reshape(-1, n), thresholds.reshape(-1), masks.reshape(-1, n)).view(w, p, b, 2)
    inter = counts[..., 0] + torch.minimum(counts[..., 1], ties)
    return (inter.float() / float(k)).permute(1, 2, 0)
