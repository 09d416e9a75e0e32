"""The contract every registered policy meets, run through the reference executor.

Adding a policy to the registry adds it here; give it a tolerance and bad options below.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from hcpolicy.actions import Action, Attend, Offload, Selection
from hcpolicy.observe import LayerCache, Observation, Phase
from hcpolicy.actions import ActionError
from hcpolicy.reference import ReferenceCache, simulate
from hcpolicy.policy.factory import build_policy
from hcpolicy.registry import POLICIES

NAMES = POLICIES.names()
BATCH, PROMPT, STEPS = 2, 64, 4
COMPRESSIONS = (0.4, 0.75)  # above the synthetic heterocache profile's floor of 4/12

# Device share of the prompt KV after prefill: (expected share, or None for the compression
# itself; tolerance). Per-head budgets are round(C * L) for uniform, Ada and (per layer)
# pyramid allocations, so within half a token per head; heterocache floors each compressed
# head's budget, so it may sit up to one token per head below C; full and Quest evict nothing.
DEVICE_SHARE: dict[str, tuple[float | None, float]] = {
    "full": (1.0, 0.0),
    "quest": (1.0, 0.0),
    "streamingllm": (None, 0.5 / PROMPT),
    "h2o": (None, 0.5 / PROMPT),
    "snapkv": (None, 0.5 / PROMPT),
    "pyramidkv": (None, 0.5 / PROMPT),
    "adasnapkv": (None, 0.5 / PROMPT),
    "heterocache": (None, 1.0 / PROMPT),
}
# Attend views: tokens per head may differ from C * (device entries) by this many (Quest
# works in whole pages of 16).
ATTEND_SLACK = {"quest": 16}

_SNAP_BAD = [{"window": 0}, {"kernel": 4}, {"kernel": 0}, {"pooling": "median"}, {"gqa": "min"}]
BAD_OPTIONS: dict[str, list[dict[str, object]]] = {
    "streamingllm": [{"sinks": -1}, {"sinks": 2.5}],
    "h2o": [{"recent": 1.5}, {"recent": -0.1}, {"chunk": 0}],
    "snapkv": _SNAP_BAD,
    "pyramidkv": _SNAP_BAD,
    "adasnapkv": _SNAP_BAD,
    "quest": [{"page_size": 0}],
    "heterocache": [{"compression": 0.3}, {"gqa": "min"}],  # 0.3 < 4/12 held by full heads
}


def _run(policy, spec, *, steps: int = STEPS, seed: int = 0):
    return simulate(policy, spec, batch_size=BATCH, prompt_length=PROMPT, decode_steps=steps, seed=seed)


def _calls(policy, spec, log: list[list[Action]]) -> list[tuple[Phase, int]]:
    """(phase, newest position) of each entry of simulate's log, in order."""
    calls = [(Phase.PREFILL, PROMPT - 1)] * spec.num_layers
    if policy.requirements().decode_observations:
        calls += [(Phase.DECODE, PROMPT + i // spec.num_layers) for i in range(len(log) - len(calls))]
    assert len(calls) == len(log)
    return calls


def _check_selection(sel: Selection, newest: int) -> None:
    assert sel.indices.shape[0] == BATCH
    k = sel.indices.shape[2]
    lengths = sel.lengths.tolist()
    for b, rows in enumerate(sel.as_lists()):
        for h, positions in enumerate(rows):
            assert 0 <= lengths[b][h] <= k, f"length {lengths[b][h]} outside 0..{k} (seq {b}, head {h})"
            assert all(0 <= p <= newest for p in positions), f"positions out of range: {positions}"
            assert positions == sorted(set(positions)), f"not strictly ascending: {positions}"


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", NAMES)
def test_actions_are_declared_valid_and_executable(name, compression, spec, make_policy):
    policy = make_policy(name, spec, compression)
    needs = policy.requirements()
    # simulate applies every action to a ReferenceCache, which raises ActionError on any
    # position that is not where the action says it is
    cache, log, _ = _run(policy, spec)
    for (phase, newest), actions in zip(_calls(policy, spec, log), log):
        for action in actions:
            assert type(action) in needs.actions, f"{name} emitted {type(action).__name__}, not declared"
            assert 0 <= action.layer < spec.num_layers
            assert max(action.heads) < spec.num_kv_heads
            if isinstance(action, Offload):
                continue
            _check_selection(action.selection, newest)
            if not needs.per_head_lengths:
                lengths = action.selection.lengths
                assert (lengths == lengths[:, :1]).all(), f"{name} needs per-head lengths but did not declare it"
            if isinstance(action, Attend):
                device = newest + 1  # nothing is evicted under an Attend-only policy
                slack = ATTEND_SLACK.get(name, 0.05 * device)
                got = action.selection.lengths.double()
                assert (got - compression * device).abs().max() <= slack
                assert (got >= 1).all()


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", NAMES)
def test_device_holds_about_compression_of_the_prompt(name, compression, spec, make_policy):
    policy = make_policy(name, spec, compression)
    cache, _, _ = _run(policy, spec, steps=0)
    share = cache.device_tokens() / (spec.num_layers * BATCH * spec.num_kv_heads * PROMPT)
    expected, tolerance = DEVICE_SHARE.get(name, (None, 0.05))
    expected = compression if expected is None else expected
    assert share == pytest.approx(expected, abs=tolerance + 1e-12), f"{name}: device share {share:.4f}"


def _dense_reference(spec, seed: int, steps: int) -> list[torch.Tensor]:
    """Decode outputs of plain dense attention in float64 over the draws simulate makes.

    Mirrors simulate's draw order (per-layer K, V, Q of the prompt, then per step and layer
    the new K, V and query); if that order ever changes, 'full' fails here first.
    """
    gen = torch.Generator().manual_seed(seed)
    b, h_q, h_kv, d = BATCH, spec.num_query_heads, spec.num_kv_heads, spec.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    keys = [randn(b, h_kv, PROMPT, d) for _ in range(spec.num_layers)]
    values = [randn(b, h_kv, PROMPT, d) for _ in range(spec.num_layers)]
    for _ in range(spec.num_layers):
        randn(b, h_q, PROMPT, d)  # prompt queries: not needed for decode outputs
    outputs = []
    for _ in range(steps):
        for layer in range(spec.num_layers):
            keys[layer] = torch.cat([keys[layer], randn(b, h_kv, 1, d)], dim=2)
            values[layer] = torch.cat([values[layer], randn(b, h_kv, 1, d)], dim=2)
            q = randn(b, h_q, d).double()
            k = keys[layer].double().repeat_interleave(spec.group_size, dim=1)  # [B, H_q, L, D]
            v = values[layer].double().repeat_interleave(spec.group_size, dim=1)
            w = torch.softmax(torch.einsum("bhd,bhld->bhl", q, k) / math.sqrt(d), dim=-1)
            outputs.append(torch.einsum("bhl,bhld->bhd", w, v))
    return outputs


@pytest.mark.parametrize("name", NAMES)
def test_keeping_everything_equals_dense_attention(name, spec, make_policy):
    policy = make_policy(name, spec, 1.0)
    _, _, outputs = _run(policy, spec, steps=3, seed=7)
    expected = _dense_reference(spec, seed=7, steps=3)
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def _same_actions(a: list[list[Action]], b: list[list[Action]]) -> bool:
    if len(a) != len(b):
        return False
    for xs, ys in zip(a, b):
        if [(type(x), x.layer, x.heads) for x in xs] != [(type(y), y.layer, y.heads) for y in ys]:
            return False
        for x, y in zip(xs, ys):
            if hasattr(x, "selection") and x.selection.as_lists() != y.selection.as_lists():
                return False
    return True


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_reset_clears_state(name, spec, make_policy):
    reused = make_policy(name, spec, 0.5)
    _, first, _ = _run(reused, spec, seed=3)
    _, fresh, _ = _run(make_policy(name, spec, 0.5), spec, seed=3)
    _, again, _ = _run(reused, spec, seed=3)  # the same instance, after a second reset
    assert _same_actions(first, fresh)
    assert _same_actions(first, again)


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_raise_value_error(name, spec, make_policy):
    cls = type(make_policy(name, spec, 0.5))  # defaults are valid
    cases = list(BAD_OPTIONS.get(name, []))
    if "compression" in inspect.signature(cls).parameters:
        cases += [{"compression": 0.0}, {"compression": 1.5}, {"compression": -0.2}]
    if not cases:
        pytest.skip(f"{name} has no options")
    for options in cases:
        options = dict(options)
        compression = options.pop("compression", 0.5)
        with pytest.raises(ValueError):
            make_policy(name, spec, compression, **options)


@pytest.mark.parametrize("name", NAMES)
def test_compression_must_be_a_real_number_in_range(name, spec, profile, make_policy):
    """Checked at construction, not deep in a budget at prefill; a bool is not a number."""
    takes = "compression" in inspect.signature(type(make_policy(name, spec, 0.5))).parameters
    for bad in ("0.5", True, False, None, [0.5], float("nan"), 0, 1.5):
        with pytest.raises(ValueError, match="compression must be"):
            build_policy(name, bad, profile=profile)
        if takes:
            with pytest.raises(ValueError, match="compression must be"):
                make_policy(name, spec, bad)
    assert build_policy(name, 1, profile=profile) is not None  # an int is a real number
    if takes:
        assert build_policy(name, 0.75, profile=profile).compression == 0.75


@pytest.mark.parametrize("name", NAMES)
def test_prefill_before_reset_is_a_clear_error(name, spec, make_policy):
    policy = make_policy(name, spec, 0.5)
    keys = torch.randn(1, spec.num_kv_heads, 8, spec.head_dim)
    obs = Observation(
        phase=Phase.PREFILL,
        layer=0,
        queries=torch.randn(1, spec.num_query_heads, 8, spec.head_dim),
        query_positions=torch.arange(8),
        cache=LayerCache.dense(keys, keys.clone()),
        prompt_length=8,
    )
    with pytest.raises(RuntimeError, match=r"reset\(spec, batch_size\)"):
        policy.prefill(obs)


def test_the_executor_rejects_attend_views_off_the_device():
    # the contract above relies on ReferenceCache raising ActionError for a bad view
    cache = ReferenceCache([torch.randn(1, 2, 4, 8)], [torch.randn(1, 2, 4, 8)])
    view = Selection(indices=torch.tensor([[[0, 5], [1, 2]]]), lengths=torch.tensor([[2, 2]]))
    with pytest.raises(ActionError, match="not on the device"):
        cache.apply([Attend(layer=0, heads=(0, 1), selection=view)])
    descending = Selection(indices=torch.tensor([[[2, 1], [1, 2]]]), lengths=torch.tensor([[2, 2]]))
    with pytest.raises(ActionError, match="ascending"):
        cache.apply([Attend(layer=0, heads=(0, 1), selection=descending)])
