"""Periodic (batched) decode observations, deferred observation, recall landing modes and
incremental recall, on CPU (the same code paths the CUDA-graph step uses, minus streams)."""

import pytest
import torch

from engine_helpers import small_engine, small_llama, synthetic_profile, token_ids as ids
from hcpolicy.actions import Select, Selection
from hcpolicy.backends.torch_engine import EngineConfig
from hcpolicy.capabilities import Requirements
from hcpolicy.drift import EveryN, Never, WindowedOverlap
from hcpolicy.policy.base import Policy
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.policy.quest import Quest

pytest.importorskip("transformers")
NEW = 14


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_llama(tmp_path_factory.mktemp("llama"))



class Recorder(Policy):
    """Keeps everything; records what each decode call saw."""

    def __init__(self, period: int) -> None:
        self.period, self.calls = period, []

    def requirements(self) -> Requirements:
        return Requirements(decode_observations=True, decode_period=self.period)

    def prefill(self, obs):
        return []

    def decode(self, obs):
        self.calls.append((obs.layer, obs.step, obs.query_positions.tolist(), obs.queries.clone()))
        return []


def test_requirements_report_the_trigger_period():
    from hcpolicy.spec import ModelSpec

    spec = ModelSpec(architecture="LlamaForCausalLM", num_layers=2, num_query_heads=8, num_kv_heads=4, head_dim=8)
    profile = synthetic_profile(spec)
    needs = HeteroCachePolicy(profile=profile).requirements()
    assert needs.decode_observations and needs.decode_period == 5
    assert HeteroCachePolicy(profile=profile, trigger=EveryN(n=3)).requirements().decode_period == 3
    never = HeteroCachePolicy(profile=profile, trigger=Never(), refresh=False).requirements()
    assert not never.decode_observations and never.decode_period == 1
    # a chunk after prefill still needs the decode call when the policy refreshes on it
    assert HeteroCachePolicy(profile=profile, trigger=Never()).requirements().decode_observations
    with pytest.raises(ValueError, match="decode_period"):
        Requirements(decode_period=0)


@pytest.mark.parametrize("observe", ["inline", "deferred"])
def test_batched_observation_carries_the_period_of_queries(model, observe):
    runs = {}
    for batched in (False, True):
        policy = Recorder(period=3)
        small_engine(model, observe=observe, batch_observations=batched).generate(ids(40), NEW, policy)
        runs[batched] = policy.calls
    steps = NEW - 1  # decode steps after the prefill's token
    layers = 2
    assert len(runs[False]) == steps * layers and len(runs[True]) == (steps // 3) * layers
    for layer, step, positions, queries in runs[True]:
        assert step % 3 == 0 and positions == [40 + step + i for i in range(3)] and queries.shape[2] == 3
        singles = [q for lay, s, _, q in runs[False] if lay == layer and step <= s < step + 3]
        assert torch.equal(queries, torch.cat(singles, dim=2))  # the same queries, in step order


@pytest.mark.parametrize("observe", ["inline", "deferred"])
@pytest.mark.parametrize("trigger", [None, EveryN(n=3)], ids=["windowed", "every3"])
def test_batching_changes_nothing_but_the_calls(model, observe, trigger):
    outs = []
    for batched in (False, True):
        engine = small_engine(model, observe=observe, batch_observations=batched)
        policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=trigger)
        out = engine.generate(ids(80, seed=4), NEW, policy)
        outs.append((out, engine.executor.recalls, engine.executor.recalled_rows, policy.recalls))
    (a, *ra), (b, *rb) = outs
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)
    assert ra == rb
    if trigger is not None:
        assert ra[0] > 0  # the comparison covered recalls


def test_deferred_recalls_serve_the_next_step(model):
    """Deferred observation: a recall decided after step s changes step s + 1 on (in place)
    or, async, from the step after the one it landed behind (s + 2 on CPU, where copies are
    done when issued); the in-place modes agree with each other, and every mode recalls as
    often."""
    outs, recalls = {}, {}
    for landing in ("next_step", "eager_step", "async"):
        engine = small_engine(model, observe="deferred", recall_landing=landing)
        policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=EveryN(n=2))
        outs[landing] = engine.generate(ids(80, seed=4), NEW, policy)
        recalls[landing] = engine.executor.recalls
        assert engine.executor.recalls > 0
        if landing == "async":
            assert engine.executor.recaller.landed > 0
    assert torch.equal(outs["next_step"].logits, outs["eager_step"].logits)
    assert recalls["next_step"] == recalls["eager_step"] == recalls["async"]
    # logits [prefill, step 0, step 1, ...]: the first recall, decided after step 1, serves
    # step 2 in place, and lands behind step 2 when async
    assert torch.equal(outs["next_step"].logits[:, :3], outs["async"].logits[:, :3])
    assert not torch.equal(outs["next_step"].logits[:, 3], outs["async"].logits[:, 3])


def satellite_rows_match_host(engine, layer, b, h):
    host = engine.runtime._store.get((engine.executor.cache_id, layer, b, h)).typed()  # [N, 2, D]
    keys, values, positions = engine.kv.entries_view(layer, [h])
    n = engine.executor.resident[(layer, b, h)]
    pos = positions[b, 0, :n]
    assert torch.equal(keys[b, 0, :n], host[pos, 0]) and torch.equal(values[b, 0, :n], host[pos, 1])
    assert bool((pos[1:] > pos[:-1]).all())
    total = int(engine.kv.host_lengths[layer, b, h])
    generated = positions[b, 0, n:total]  # the tokens decoded so far follow, in order
    assert generated.tolist() == list(range(int(generated[0]), int(generated[0]) + total - n)) if total > n else True


@pytest.mark.parametrize("landing", ["next_step", "async"])
def test_recall_rows_pages_and_host_bytes(model, landing):
    engine = small_engine(model, observe="deferred", recall_landing=landing)
    free0 = engine.kv.allocator.free_pages
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=EveryN(n=2))
    engine.prefill(ids(90, seed=6, batch=2), policy, max_new_tokens=12)
    h2d0 = engine.runtime.counters().h2d_bytes
    tok = torch.tensor([5, 6])
    for _ in range(11):
        tok = engine.decode(tok).argmax(-1)
    engine.executor.recaller.land_ready()
    assert not engine.executor.recaller.inflight
    exe = engine.executor
    assert exe.recalls > 0 and exe.moved_rows > 0  # incremental: resident rows moved on the device
    row_bytes = 2 * engine.mc.head_dim * 4
    assert engine.runtime.counters().h2d_bytes - h2d0 == exe.recalled_rows * row_bytes  # only new rows came over
    for layer in range(2):
        for b in range(2):
            for h in (1, 2):
                satellite_rows_match_host(engine, layer, b, h)
    assert torch.equal(engine.kv.lengths, engine.kv.host_lengths)
    engine.release()
    assert engine.kv.allocator.free_pages == free0 and engine.host_bytes() == 0


def test_async_landing_bound_and_actions_land_first(model):
    engine = small_engine(model, observe="deferred", recall_landing="async", async_recall_pages=1)
    free0 = engine.kv.allocator.free_pages
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=EveryN(n=2))
    engine.prefill(ids(90, seed=7), policy, max_new_tokens=6)
    tok = torch.tensor([5])
    for _ in range(2):  # step 1 completes a period: recalls go in flight
        tok = engine.decode(tok).argmax(-1)
    rec = engine.executor.recaller
    # a 1-page bound: layer 1's recall landed layer 0's before going in flight itself
    assert {k[0] for k in rec.inflight} == {1} and rec.landed >= 2
    layer = next(iter(rec.inflight))[0]
    kept = engine.kv.entries_view(layer, [3])[2][0, 0, :4].clone()
    # any other action on the layer lands its recall first
    engine.executor.apply([Select(layer=layer, heads=[3], selection=Selection(indices=kept.view(1, 1, -1),
                                                                               lengths=torch.tensor([[4]])))])  # fmt: skip
    assert not any(k[0] == layer for k in rec.inflight)
    engine.release()
    assert engine.kv.allocator.free_pages == free0


def test_config_errors(model):
    with pytest.raises(ValueError, match="fused_kernels=True needs a CUDA device"):
        small_engine(model, fused_kernels=True)
    assert not small_engine(model).ops.fused  # the default on CPU: the torch reference ops
    with pytest.raises(ValueError, match="recall_landing"):
        EngineConfig(recall_landing="later")
    with pytest.raises(ValueError, match="async_recall_pages"):
        EngineConfig(async_recall_pages=0)
    engine = small_engine(model, observe="deferred")
    with pytest.raises(ValueError, match="Attend views"):
        engine.generate(ids(30), 3, Quest(compression=0.5, page_size=8))


class LayerByLayer(HeteroCachePolicy):
    """HeteroCache without the batched decision step: ``decode`` once per layer."""

    def decode_layers(self, observations):
        return Policy.decode_layers(self, observations)


@pytest.mark.parametrize("trigger", [WindowedOverlap(tau=0.9), EveryN(n=3)], ids=["windowed", "every3"])
@pytest.mark.parametrize("pivots_at_once", [1, None], ids=["chunked", "all"])
def test_batched_decision_step_decides_as_layer_by_layer(model, trigger, pivots_at_once, monkeypatch):
    """The deferred step's one-call decision (every pivot of every layer scored together,
    one host read) gives the same recalls, rows and tokens as calling decode per layer;
    a batch of two lengths covers left padding."""
    import hcpolicy.policy.heterocache as hc

    if pivots_at_once == 1:
        monkeypatch.setattr(hc, "SCORING_BYTES", 1)  # one pivot per scoring batch
    outs, calls = [], []
    for cls in (LayerByLayer, HeteroCachePolicy):
        engine = small_engine(model, observe="deferred")
        policy = cls(profile=synthetic_profile(engine.spec), compression=0.6, trigger=trigger)
        decode = policy.decode
        policy.decode = lambda obs, decode=decode: calls.append(cls) or decode(obs)
        prompts = [ids(80, seed=4)[0].tolist(), ids(61, seed=5)[0].tolist()]
        out = engine.generate(prompts, NEW, policy)
        outs.append((out, engine.executor.recalls, engine.executor.recalled_rows, policy.recalls))
    (a, *ra), (b, *rb) = outs
    assert ra[0] > 0  # the comparison covered recalls
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.logits, b.logits, atol=1e-6)
    assert ra == rb
    assert calls.count(LayerByLayer) > 0 and calls.count(HeteroCachePolicy) == 0  # the batched path ran
