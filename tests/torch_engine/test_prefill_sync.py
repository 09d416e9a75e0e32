"""Prefill never waits for the device: HeteroCache's per-layer compress (its budgets, the
Select and Offload it returns, the executor's repack) runs without a host sync, and the
Selects' validity checks wait on the device for one read at the end of the prefill
(``PagedExecutor.check_deferred``). On CPU: the deferred check still raises; on CUDA
(``gpu``): ``Prefill.run`` under ``set_sync_debug_mode("error")``, and the cache it leaves
equals the one the eager checks (one host read per Select) leave."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine_helpers import small_engine, small_llama, synthetic_profile, token_ids
from hcpolicy.actions import ActionError, Select, Selection
from hcpolicy.backends.torch_engine.prefill import Prefill
from hcpolicy.classify import build_profile
from hcpolicy.drift import EveryN
from hcpolicy.policy.baselines import SnapKV
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.profile import HeadProfile
from hcpolicy.spec import ModelSpec


def scattered_profile(spec: ModelSpec) -> HeadProfile:
    """Per layer: head 1 a pivot with satellites 0 and 3 (head 2 an anchor where it is
    stable): compressed heads and satellites are not consecutive (device index tensors)."""
    stab = torch.linspace(0.2, 0.9, spec.num_layers * spec.num_kv_heads).view(spec.num_layers, -1)
    adj = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.num_kv_heads, dtype=torch.bool)
    adj[:, 1, 0] = adj[:, 1, 3] = True
    return build_profile(spec, stab, adj, tau_stable=0.3)


PROFILES = {"synthetic": synthetic_profile, "scattered": scattered_profile}


class BadSelect(SnapKV):
    """SnapKV, except that layer ``bad_layer`` gets a Select that ``how`` spoils; records the
    layers it was asked for."""

    def __init__(self, bad_layer: int, how: str) -> None:
        super().__init__(compression=0.5, window=8)
        self.bad_layer, self.how, self.layers = bad_layer, how, []

    def prefill(self, obs):
        self.layers.append(obs.layer)
        (select,) = super().prefill(obs)
        sel = select.selection
        host = sel.lengths.clone()  # the CPU test: a host copy costs nothing
        if obs.layer == self.bad_layer:
            indices = sel.indices.clone()
            if self.how == "missing":
                indices[0, 0, 0] = 9999
            elif self.how == "descending":
                indices[0, 0, :2] = indices[0, 0, :2].flip(0)
            elif self.how == "host":
                host[0, 0] -= 1
            sel = Selection(indices=indices, lengths=sel.lengths, host_lengths=host)
        else:
            sel = Selection(indices=sel.indices, lengths=sel.lengths, host_lengths=host)
        return [Select(layer=obs.layer, heads=select.heads, selection=sel)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return small_engine(small_llama(tmp_path_factory.mktemp("llama")))


@pytest.mark.parametrize("how, match", [
    ("missing", "layer 0: Select names positions that are not on the device"),
    ("descending", r"layer 0: Select names .*\(or not ascending\)"),
    ("host", "layer 0: Select's host_lengths differ from its lengths"),
])  # fmt: skip
def test_deferred_select_check_raises_at_prefill_end(engine, how, match):
    policy = BadSelect(bad_layer=0, how=how)
    with pytest.raises(ActionError, match=match):
        engine.prefill(token_ids(60), policy, max_new_tokens=4)
    assert policy.layers == [0, 1]  # not raised at apply time: every layer was compressed first
    # the next prefill starts clean: its Selects are checked (and pass)
    engine.prefill(token_ids(60), BadSelect(bad_layer=-1, how="none"), max_new_tokens=4)
    assert torch.equal(engine.kv.lengths.cpu(), engine.kv.host_lengths)


def test_select_without_host_lengths_still_raises_at_apply(engine):
    """A selection without host lengths is read (and checked) when it is applied, as is
    any Select outside a prefill."""

    class Missing(SnapKV):
        def prefill(self, obs):
            (select,) = super().prefill(obs)
            indices = select.selection.indices.clone()
            indices[0, 0, 0] = 9999
            return [Select(layer=obs.layer, heads=select.heads,
                           selection=Selection(indices=indices, lengths=select.selection.lengths))]  # fmt: skip

    with pytest.raises(ActionError, match="layer 0: Select names positions that are not on the device"):
        engine.prefill(token_ids(60), Missing(compression=0.5, window=8), max_new_tokens=4)
    engine.prefill(token_ids(60), SnapKV(compression=0.5, window=8), max_new_tokens=4)
    sel = Selection(indices=torch.tensor([[[9999]]]), lengths=torch.tensor([[1]]), host_lengths=torch.tensor([[1]]))
    with pytest.raises(ActionError, match="not on the device"):  # after the prefill: at once
        engine.executor.apply([Select(layer=0, heads=[0], selection=sel)])


def test_selection_host_lengths_are_checked():
    indices, lengths = torch.zeros(1, 2, 3, dtype=torch.int64), torch.tensor([[1, 3]])
    Selection(indices=indices, lengths=lengths, host_lengths=torch.tensor([[1, 3]]))
    for bad in (torch.tensor([[1, 4]]), torch.tensor([[-1, 0]]), torch.tensor([[1]]), torch.tensor([[1.0, 3.0]])):
        with pytest.raises(ValueError, match="host_lengths"):
            Selection(indices=indices, lengths=lengths, host_lengths=bad)
    sel = Selection(indices=indices, lengths=lengths, host_lengths=torch.tensor([[1, 3]]))
    assert sel.head(1).host_lengths.tolist() == [[3]]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_heterocache_selects_defer_their_checks(engine, profile):
    """Each layer's Select carries host lengths (the budgets), so the executor defers its
    checks: check_deferred finds one flag pair per layer, all clear."""
    seen = []
    check = engine.executor.check_deferred

    def spy():
        seen.append(len(engine.executor._deferred or []))
        check()

    engine.executor.check_deferred = spy
    try:
        policy = HeteroCachePolicy(profile=PROFILES[profile](engine.spec), compression=0.7, trigger=EveryN(n=2))
        gen = torch.Generator().manual_seed(3)
        engine.prefill([torch.randint(3, 96, (n,), generator=gen).tolist() for n in (57, 40)], policy,
                       max_new_tokens=4)  # fmt: skip
    finally:
        del engine.executor.check_deferred
    assert seen == [engine.mc.num_layers]
    assert torch.equal(engine.kv.lengths.cpu(), engine.kv.host_lengths)


# -- CUDA: no host sync ---------------------------------------------------------------------------
@contextlib.contextmanager
def syncs_raise():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def gpu_engine():
    from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model

    config = ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4,
                         num_heads=8, num_kv_heads=4, head_dim=32, max_position=4096)  # fmt: skip
    model = random_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    return Engine(model, EngineConfig(max_batch_size=2, max_seq_len=2048, page_size=16, prefill_chunk=512))


def cache_state(engine) -> dict:
    """Kept positions, K/V and device lengths per (layer, sequence, head); the host store's
    rows per key and their positions."""
    torch.cuda.synchronize()
    kv, exe = engine.kv, engine.executor
    state = {"lengths": kv.lengths.cpu(), "host_lengths": kv.host_lengths.clone()}
    for layer in range(kv.num_layers):
        keys, values, positions = kv.entries_view(layer)
        for b in range(kv.batch_size):
            for h in range(kv.num_kv_heads):
                n = int(kv.host_lengths[layer, b, h])
                state[(layer, b, h)] = (positions[b, h, :n].cpu(), keys[b, h, :n].cpu(), values[b, h, :n].cpu())
    for key in engine.runtime._store:
        state[("host", *key)] = engine.runtime._store.get(key).typed().clone()
    for key, pos in exe.host_positions.items():
        state[("host_positions", *key)] = pos.cpu()
    return state


@pytest.mark.gpu
@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("lengths", [[1200], [700, 1200]])
@pytest.mark.parametrize("random", [False, True])
def test_heterocache_prefill_never_syncs(monkeypatch, profile, lengths, random):
    """Every layer's forward and compress (Prefill.run / run_random) under
    set_sync_debug_mode("error"); the cache equals the eager-check run's (one host read
    per Select, as before deferral), bit for bit, and the lengths agree on both sides."""
    engine = gpu_engine()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]
    engine.prefill(prompts, None, max_new_tokens=4)  # lazy CUDA/Triton set-up, outside the check

    def run() -> tuple[dict, torch.Tensor | None]:
        policy = HeteroCachePolicy(profile=PROFILES[profile](engine.spec), compression=0.6, trigger=EveryN(n=2))
        if random:
            engine.prefill_random(lengths, policy, max_new_tokens=4, seed=5)
            logits = None
        else:
            logits = engine.prefill(prompts, policy, max_new_tokens=4).cpu()
        return cache_state(engine), logits

    with monkeypatch.context() as m:
        for name in ("run", "run_random"):
            original = getattr(Prefill, name)

            def strict(self, *args, _original=original, **kwargs):
                with syncs_raise():
                    return _original(self, *args, **kwargs)

            m.setattr(Prefill, name, strict)
        state, logits = run()
    with monkeypatch.context() as m:
        m.setattr(engine.executor, "defer_checks", lambda: None)  # every Select read and checked at once
        eager, eager_logits = run()
    assert torch.equal(state["lengths"], state["host_lengths"])
    assert state.keys() == eager.keys()
    for key, value in state.items():
        other = eager[key]
        if isinstance(value, tuple):
            assert all(torch.equal(a, b) for a, b in zip(value, other)), key
        else:
            assert torch.equal(value, other), key
    assert (logits is None) or torch.equal(logits, eager_logits)
    assert any(k[0] == "host" for k in state)  # compressed heads went to the host store
