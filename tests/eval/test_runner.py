"""The evaluation loop with a scripted generator: cells, sharing, skipping, refusals."""

import attrs
import pytest

from hcpolicy.classify import build_profile
from hcpolicy.eval import ResultStore
from hcpolicy.eval.runner import EvalPlan, make_samples, pending, run
from hcpolicy.eval.tasks import TASKS
from hcpolicy.policy.factory import build_policy
from hcpolicy.spec import ModelSpec

import torch


@attrs.define
class FakeGen:
    text: str
    kv_bytes_device: int
    kv_bytes_full: int
    host_bytes: int = 0
    recalls: int = 0


class ScriptedGenerator:
    """Answers correctly for 'full', never for the others; counts the calls it gets."""

    model_name = "fake"

    def __init__(self):
        self.calls = []

    def count_tokens(self, text):
        return len(text.split())

    def generate(self, samples, protocol, policies, *, on_policy_done=None):
        self.calls.append((protocol, len(samples), sorted(policies)))
        out = {}
        for label, policy in policies.items():
            right = label.startswith("full")
            c = getattr(policy, "compression", 1.0)
            out[label] = [
                FakeGen(" ".join(s.answers) if right else "no idea", int(1000 * c), 1000) for s in samples
            ]
            if on_policy_done is not None:
                on_policy_done(label)
        return out


def plan(**kw):
    base = dict(policies=["full", "snapkv"], compressions=[0.4, 0.5], tasks=["niah_single"],
                protocols=["agnostic", "aware"], context_length=300, samples=3, batch_size=2)  # fmt: skip
    base.update(kw)
    return EvalPlan(**base)


def test_cells_records_and_prefill_sharing(tmp_path):
    gen = ScriptedGenerator()
    store = ResultStore(tmp_path)
    records, skipped = run(plan(), gen, lambda n, c: build_policy(n, c), store)
    assert not skipped
    assert len(records) == 2 * 3  # two protocols x (full + snapkv at two compressions)
    # one generate call per batch carries every policy: the prefill is shared
    assert gen.calls == [(p, n, ["full@1", "snapkv@0.4", "snapkv@0.5"]) for p in ("agnostic", "aware") for n in (2, 1)]
    full = [r for r in records if r.policy == "full"]
    assert all(r.score == 1.0 and r.samples == 3 and len(r.sample_scores) == 3 for r in full)
    snap = {(r.protocol, r.compression): r for r in records if r.policy == "snapkv"}
    assert snap[("aware", 0.4)].score == 0.0
    assert snap[("aware", 0.4)].device_fraction == pytest.approx(0.4)


def test_rerun_skips_finished_cells(tmp_path):
    run(plan(), ScriptedGenerator(), lambda n, c: build_policy(n, c), ResultStore(tmp_path))
    gen = ScriptedGenerator()
    records, _ = run(plan(compressions=[0.4, 0.5, 0.6]), gen, lambda n, c: build_policy(n, c), ResultStore(tmp_path))
    assert [(r.policy, r.compression) for r in records] == [("snapkv", 0.6)] * 2
    assert all(call[2] == ["snapkv@0.6"] for call in gen.calls)
    assert len(ResultStore(tmp_path)) == 8


def test_progress_counts_sample_runs_over_the_whole_run(tmp_path):
    ticks = []
    run(plan(), ScriptedGenerator(), lambda n, c: build_policy(n, c), ResultStore(tmp_path),
        progress=lambda label, done, total: ticks.append((label, done, total)))  # fmt: skip
    total = 2 * 3 * 3  # protocols x cells x samples
    assert {t[2] for t in ticks} == {total}
    assert ticks[0] == ("niah_single / agnostic", 0, total)  # shown before the first generation
    done = [t[1] for t in ticks]
    assert done == sorted(done) and done[-1] == total
    # after every policy of every batch: batches of 2 then 1 sample
    assert ("niah_single / aware / snapkv@0.5", total - 0) in [(t[0], t[1]) for t in ticks]
    assert ("niah_single / agnostic / full@1", 2) in [(t[0], t[1]) for t in ticks]


def test_pending_names_the_cells_a_rerun_skips(tmp_path):
    store = ResultStore(tmp_path)
    run(plan(compressions=[0.4]), ScriptedGenerator(), lambda n, c: build_policy(n, c), store)
    todo, done = pending(plan(), "fake", store, ["full@1", "snapkv@0.4", "snapkv@0.5"])
    assert [(p.protocol, p.labels) for p in todo] == [("agnostic", ("snapkv@0.5",)), ("aware", ("snapkv@0.5",))]
    assert sorted((c.protocol, c.policy, c.compression) for c in done) == [
        ("agnostic", "full", 1.0), ("agnostic", "snapkv", 0.4), ("aware", "full", 1.0), ("aware", "snapkv", 0.4)
    ]  # fmt: skip


def test_heterocache_below_its_floor_is_refused_not_fatal(tmp_path):
    spec = ModelSpec("x", 2, 4, 2, 8)
    adj = torch.zeros(2, 2, 2, dtype=torch.bool)
    adj[:, 0, 1] = True
    profile = build_profile(spec, torch.full((2, 2), 0.7), adj, tau_stable=0.5)  # floor 0.5
    records, skipped = run(
        plan(policies=["heterocache"], compressions=[0.4, 0.6], protocols=["aware"]), ScriptedGenerator(),
        lambda n, c: build_policy(n, c, profile=profile), ResultStore(tmp_path),
    )  # fmt: skip
    assert [r.compression for r in records] == [0.6]
    assert len(skipped) == 1 and "choose compression > 0.5000" in skipped[0].reason


def test_samples_are_deterministic_per_seed_and_index():
    task = TASKS.get("niah_single")()
    a = make_samples(task, "niah_single", plan(samples=2), lambda t: len(t.split()))
    b = make_samples(task, "niah_single", plan(samples=3), lambda t: len(t.split()))
    assert a == b[:2]
    assert a[0] != a[1]


def test_plan_validation():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        plan(compressions=[0.0])
    with pytest.raises(ValueError):
        plan(samples=0)


def test_build_policy_needs_a_profile_for_heterocache():
    with pytest.raises(ValueError, match="needs a head profile"):
        build_policy("heterocache", 0.5)
    assert build_policy("full", 0.3).__class__.__name__ == "FullKV"
    assert build_policy("snapkv", 0.3).compression == 0.3
