import json

import attrs
import pytest
import torch

from hcpolicy.classify import build_profile
from hcpolicy.profile import HeadProfile, Role
from hcpolicy.spec import ModelSpec

SPEC = ModelSpec("synthetic", num_layers=2, num_query_heads=8, num_kv_heads=4, head_dim=16)


def make_profile(spec: ModelSpec = SPEC) -> HeadProfile:
    stab = torch.tensor([[0.9, 0.8, 0.2, 0.7], [0.3, 0.6, 0.6, 0.55]])[: spec.num_layers]
    adj = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.num_kv_heads, dtype=torch.bool)
    adj[0, 0, 1] = True  # layer 0: 0 pivot, 1 satellite; 2 volatile; 3 anchor
    adj[1, 1, 2] = adj[1, 1, 3] = True  # layer 1: 1 pivot of 2 and 3; 0 volatile
    return build_profile(spec, stab, adj, tau_stable=0.5, settings={"note": "test"})


def test_roles_and_counts():
    p = make_profile()
    assert p.roles[0] == (Role.PIVOT, Role.SATELLITE, Role.VOLATILE, Role.ANCHOR)
    assert p.roles[1] == (Role.VOLATILE, Role.PIVOT, Role.SATELLITE, Role.SATELLITE)
    assert p.role_counts() == {"anchor": 1, "volatile": 2, "pivot": 2, "satellite": 3}
    assert p.clusters == ({0: (1,)}, {1: (2, 3)})
    assert p.min_compression == pytest.approx(4 / 8)


def test_ratios_are_inverse_stability_with_global_mean_one():
    p = make_profile()
    comp = [(0, 1), (0, 3), (1, 2), (1, 3)]
    inv = [1 / (p.stability[l][h] + 1e-6) for l, h in comp]
    mean = sum(inv) / len(inv)
    for (l, h), w in zip(comp, inv):
        assert p.ratios[l][h] == pytest.approx(w / mean)
    assert sum(p.ratios[l][h] for l, h in comp) / 4 == pytest.approx(1.0)
    assert p.ratios[0][0] is None and p.ratios[1][0] is None


def test_json_roundtrip(tmp_path):
    p = make_profile()
    path = p.save(tmp_path / "p.json")
    q = HeadProfile.load(path, spec=SPEC)
    assert q == p
    assert json.loads(path.read_text())["version"] == 1


def test_load_for_other_model_fails_clearly(tmp_path):
    path = make_profile().save(tmp_path / "p.json")
    other = ModelSpec("synthetic", num_layers=2, num_query_heads=8, num_kv_heads=4, head_dim=32)
    with pytest.raises(ValueError, match="head_dim: profile has 16, model has 32"):
        HeadProfile.load(path, spec=other)
    with pytest.raises(ValueError, match="num_layers"):
        make_profile().check(ModelSpec("synthetic", 3, 8, 4, 16))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        HeadProfile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadProfile.load(bad)
    data = make_profile().to_dict()
    data["version"] = 99
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        HeadProfile.load(bad)
    data = make_profile().to_dict()
    del data["roles"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing the field 'roles'"):
        HeadProfile.load(bad)


def test_inconsistent_profiles_rejected():
    data = make_profile().to_dict()
    data["roles"][0][1] = "anchor"  # a cluster member that is not a satellite
    with pytest.raises(ValueError, match="not a satellite"):
        HeadProfile.from_dict(data)
    data = make_profile().to_dict()
    data["ratios"][0][0] = 1.0  # a pivot with a ratio
    with pytest.raises(ValueError, match="pivot head must have ratio None"):
        HeadProfile.from_dict(data)
    data = make_profile().to_dict()
    data["stability"][1] = data["stability"][1][:3]
    with pytest.raises(ValueError, match=r"stability must be \[2\]\[4\]"):
        HeadProfile.from_dict(data)
    data = make_profile().to_dict()
    data["clusters"][1] = {"1": [2]}  # satellite 3 loses its pivot
    with pytest.raises(ValueError, match=r"satellites \[3\] have no pivot"):
        HeadProfile.from_dict(data)


@pytest.mark.parametrize("clusters, message", [
    ({"-2": [1]}, r"layer 0: cluster -2 -> \[1\] names head -2, outside 0\.\.3"),
    ({"4": [1]}, r"layer 0: cluster 4 -> \[1\] names head 4, outside 0\.\.3"),
    ({"0": [7]}, r"layer 0: cluster 0 -> \[7\] names head 7, outside 0\.\.3"),
    ({"0": [-1]}, r"names head -1"),
    ([[0, 1]], r"layer 0: clusters must map pivot heads to lists of satellite heads"),
    ({"zero": [1]}, r"layer 0: clusters must map"),
    ({"0": [1.5]}, r"layer 0: clusters must map"),
])  # fmt: skip
def test_cluster_heads_out_of_range_name_layer_and_head(clusters, message):
    """A negative head once indexed from the end (it ran as another head); one past the
    heads raised IndexError."""
    data = make_profile().to_dict()
    data["clusters"][0] = clusters
    with pytest.raises(ValueError, match=message):
        HeadProfile.from_dict(data)


def test_unknown_role_and_bad_ratio_name_layer_and_head():
    data = make_profile().to_dict()
    data["roles"][1][2] = "satelite"
    with pytest.raises(ValueError, match=r"layer 1 head 2: unknown role 'satelite' \(known: anchor, volatile, pivot"):
        HeadProfile.from_dict(data)
    data = make_profile().to_dict()
    data["ratios"][0][3] = "0.7"
    with pytest.raises(ValueError, match=r"layer 0 head 3: ratio must be a number or None, got '0\.7'"):
        HeadProfile.from_dict(data)


@pytest.mark.parametrize("content, kind", [("[1, 2]", "list"), ('"profile"', "str"), ("3", "int"), ("null", "NoneType")])
def test_a_json_file_that_is_not_an_object_names_the_file(tmp_path, content, kind):
    path = tmp_path / "list.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"list\.json: not a head profile: expected a JSON object .* got a {kind}"):
        HeadProfile.load(path)
    with pytest.raises(ValueError, match="not a head profile"):
        HeadProfile.from_dict(json.loads(content))


def test_fingerprint_carries_the_query_heads():
    """A profile made on a model with another H_q (same H_kv) is refused; a file written
    before the fingerprint had ``num_query_heads`` still loads (unknown is not a mismatch)."""
    profile = make_profile()
    assert profile.fingerprint["num_query_heads"] == 8
    other = ModelSpec("synthetic", num_layers=2, num_query_heads=16, num_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="num_query_heads: profile has 8, model has 16"):
        profile.check(other)
    old = make_profile().to_dict()
    del old["fingerprint"]["num_query_heads"]
    legacy = HeadProfile.from_dict(old)
    legacy.check(SPEC)
    legacy.check(other)  # unknown: the other fields decide
    with pytest.raises(ValueError, match="head_dim"):
        legacy.check(ModelSpec("synthetic", 2, 8, 4, 32))


def test_load_names_the_file_of_a_mismatch(tmp_path):
    path = make_profile().save(tmp_path / "mine.json")
    other = ModelSpec("synthetic", num_layers=2, num_query_heads=16, num_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match=r"mine\.json: head profile does not match this model \(num_query_heads"):
        HeadProfile.load(path, spec=other)


def test_the_shipped_profile_fingerprints_smollm2():
    from hcpolicy.policy.factory import default_profile_path

    path = default_profile_path("smollm2-135m-instruct")
    smollm2 = ModelSpec("LlamaForCausalLM", num_layers=30, num_query_heads=9, num_kv_heads=3, head_dim=64)
    assert HeadProfile.load(path, spec=smollm2).fingerprint == smollm2.fingerprint()
    with pytest.raises(ValueError, match="num_query_heads: profile has 9, model has 6"):
        HeadProfile.load(path, spec=attrs.evolve(smollm2, num_query_heads=6))


def test_model_spec_validation():
    with pytest.raises(ValueError, match="multiple"):
        ModelSpec("x", 1, 6, 4, 8)
    with pytest.raises(ValueError, match="num_layers must be > 0"):
        ModelSpec("x", 0, 4, 4, 8)


def test_tensor_parallel_shards_keep_clusters_on_one_rank():
    stab = torch.tensor([[0.9, 0.8, 0.2, 0.7], [0.3, 0.6, 0.9, 0.8]])
    adj = torch.zeros(2, 4, 4, dtype=torch.bool)
    adj[0, 0, 1] = True  # layer 0: 0 -> 1 (rank 0 of 2)
    adj[1, 2, 3] = True  # layer 1: 2 -> 3 (rank 1 of 2)
    p = build_profile(SPEC, stab, adj, tau_stable=0.5)
    local = ModelSpec("synthetic", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=16)
    first, second = p.shard(0, 2), p.shard(1, 2)
    first.check(local)
    second.check(local)
    assert first.roles == tuple(row[:2] for row in p.roles) and second.roles == tuple(row[2:] for row in p.roles)
    assert first.clusters == ({0: (1,)}, {}) and second.clusters == ({}, {0: (1,)})  # renumbered from 0
    assert second.ratios == tuple(row[2:] for row in p.ratios)
    with pytest.raises(ValueError, match=r"layer 0: pivot 0 and its satellites \[1\] fall on different .* "
                                         r"--tp-size 4; this profile fits --tp-size 1, 2"):  # fmt: skip
        p.shard(0, 4)
    with pytest.raises(ValueError, match="do not split evenly over 3"):
        p.shard(0, 3)
    with pytest.raises(ValueError, match="layer 1: pivot 1 .* this profile fits --tp-size 1$"):
        make_profile().shard(0, 2)  # layer 1's pivot 1 leads satellites 2 and 3 on the other rank
