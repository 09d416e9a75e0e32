import pytest
import torch

from hcpolicy.classify import build_profile, similarity_graph, stability, star_clusters
from hcpolicy.profile import Role
from hcpolicy.spec import ModelSpec


def adjacency(n: int, edges: list[tuple[int, int]]) -> torch.Tensor:
    a = torch.zeros(n, n, dtype=torch.bool)
    for i, j in edges:
        a[i, j] = a[j, i] = True
    return a


def test_star_clustering_takes_highest_degree_first():
    # 2 links to 0, 1, 3, 4; 5-6 is a separate pair; 7 is alone
    a = adjacency(8, [(2, 0), (2, 1), (2, 3), (2, 4), (0, 1), (5, 6)])
    assert star_clusters(a) == {2: (0, 1, 3, 4), 5: (6,)}


def test_star_clustering_ties_and_leftovers():
    # path 0-1-2-3: 1 and 2 both have degree 2; 1 wins (lower index), takes 0 and 2; 3 is left alone
    assert star_clusters(adjacency(4, [(0, 1), (1, 2), (2, 3)])) == {1: (0, 2)}
    assert star_clusters(adjacency(3, [])) == {}


def test_stability_is_median_of_overlap_with_prefill():
    prefill = torch.tensor([[[0, 1, 2, 3]]])  # [N=1, H=1, k=4]
    decode = torch.tensor([[[[0, 1, 2, 3]]], [[[0, 1, 8, 9]]], [[[7, 8, 9, 6]]]])  # overlaps 1, .5, 0
    assert stability(decode, prefill, universe=10).tolist() == [0.5]


def test_similarity_graph_threshold():
    sets = torch.tensor([[[[0, 1, 2, 3], [0, 1, 2, 9], [5, 6, 7, 8]]]])  # [T=1, N=1, H=3, k=4]
    g = similarity_graph(sets, universe=10, tau_sim=0.75)
    assert g.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert not similarity_graph(sets, universe=10, tau_sim=0.8).any()


def test_build_profile_thresholds():
    spec = ModelSpec("s", 1, 3, 3, 4)
    stab = torch.tensor([[0.5, 0.49, 0.9]])
    prof = build_profile(spec, stab, torch.zeros(1, 3, 3, dtype=torch.bool), tau_stable=0.5)
    assert prof.roles[0] == (Role.ANCHOR, Role.VOLATILE, Role.ANCHOR)


def test_build_profile_with_nothing_to_compress_fails():
    spec = ModelSpec("s", 1, 2, 2, 4)
    with pytest.raises(ValueError, match="nothing left to compress"):
        build_profile(spec, torch.tensor([[0.1, 0.1]]), torch.zeros(1, 2, 2, dtype=torch.bool), tau_stable=0.5)
