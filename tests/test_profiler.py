import pytest
import torch

from hcpolicy.profile import Role
from hcpolicy.profiler import ProfileConfig, Profiler
from hcpolicy.spec import ModelSpec

L = 64


def rows_for(per_kv_head: list[list[int]], group: int, extra: int = 3) -> torch.Tensor:
    """Attention rows [1, H_q, L + extra] putting the mass of KV head h's queries on its tokens."""
    gen = torch.Generator().manual_seed(len(per_kv_head[0]))
    rows = torch.rand(1, len(per_kv_head) * group, L + extra, generator=gen) * 1e-3
    for h, tokens in enumerate(per_kv_head):
        rows[0, h * group : (h + 1) * group, tokens] += 1.0
    return rows


def test_profiler_recovers_designed_roles():
    spec = ModelSpec("synthetic", num_layers=1, num_query_heads=8, num_kv_heads=4, head_dim=8)
    cfg = ProfileConfig(top_k=8, pool_kernel=1, decode_steps=6)
    prof = Profiler(spec, cfg, prompt_length=L)
    stable = list(range(8))
    shared = list(range(20, 28))
    prof.observe(0, 0, rows_for([stable, shared, shared, list(range(40, 48))], group=2))
    for step in range(1, 7):
        moving = list(range(40 + step * 2, 48 + step * 2))  # head 3 drifts away from its prefill set
        prof.observe(0, step, rows_for([stable, shared, shared, moving], group=2))
    p = prof.finish()
    # heads 1 and 2 share their set: one pivot, one satellite; 0 stays put: anchor; 3 drifts: volatile
    assert p.roles[0] == (Role.ANCHOR, Role.PIVOT, Role.SATELLITE, Role.VOLATILE)
    assert p.stability[0][0] == pytest.approx(1.0)
    assert p.stability[0][3] < 0.5
    assert p.settings["k"] == 8 and p.settings["steps"] == 6


def test_profiler_needs_decode_steps_and_checks_shapes():
    spec = ModelSpec("synthetic", num_layers=1, num_query_heads=2, num_kv_heads=2, head_dim=8)
    prof = Profiler(spec, ProfileConfig(top_k=4, decode_steps=3), prompt_length=L)
    prof.observe(0, 0, torch.rand(1, 2, L))
    with pytest.raises(ValueError, match="at least one decode step"):
        prof.finish()
    with pytest.raises(ValueError, match=r"rows must be \[N, 2, >= 64\]"):
        prof.observe(0, 1, torch.rand(1, 2, L - 1))
    with pytest.raises(ValueError, match="step 4 outside"):
        prof.observe(0, 4, torch.rand(1, 2, L))
    with pytest.raises(ValueError, match="samples"):
        prof.observe(0, 1, torch.rand(2, 2, L))


def test_faithful_constants_and_fractional_k():
    cfg = ProfileConfig.faithful()
    assert (cfg.top_k, cfg.pool_kernel, cfg.gqa, cfg.tau_stable, cfg.tau_sim, cfg.decode_steps) == (
        1024, 5, "mean", 0.5, 0.5, 100,
    )
    assert cfg.k_for(5000) == 1024 and cfg.k_for(300) == 300
    assert ProfileConfig(top_k=0.2).k_for(2400) == 480
    with pytest.raises(ValueError):
        ProfileConfig(top_k=1.5)
    with pytest.raises(ValueError):
        ProfileConfig(tau_sim=2.0)
