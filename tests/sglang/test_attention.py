"""Attention through the hcpolicy wrapper over SGLang's torch-native backend.

Keep-everything must be SGLang's own output bit for bit; a compressing policy must give,
for every (layer, KV head), dense attention over exactly the tokens that head kept: the
oracle is ``hcpolicy.reference.ReferenceCache`` fed the same K/V and the same actions
(float64 pools, so the tolerance is rounding only).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from sglang_helpers import (
    SPEC,
    Scheduler,
    attention_layers,
    decode_batch,
    extend_batch,
    make_pools,
    make_tree,
    policy_backend,
    run_layers,
    synthetic_profile,
    torch_native,
)

from hcpolicy.actions import Action, Recall
from hcpolicy.drift import WindowedOverlap
from hcpolicy.observe import Observation, Phase
from hcpolicy.policy.base import Policy
from hcpolicy.policy.baselines import AdaSnapKV, FullKV, StreamingLLM
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.reference import ReferenceCache
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

LAYERS = attention_layers(SPEC)
D, HQ, HKV = SPEC.head_dim, SPEC.num_query_heads, SPEC.num_kv_heads


class Recording(Policy):
    """Runs ``inner`` and logs its actions by (phase, step, layer)."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.log: dict[tuple[Phase, int, int], list[Action]] = {}

    def requirements(self):
        return self.inner.requirements()

    def reset(self, spec, batch_size):
        self.inner.reset(spec, batch_size)

    def observed_heads(self, layer):
        return self.inner.observed_heads(layer)

    def prefill(self, obs: Observation) -> Sequence[Action]:
        return self._record(obs, self.inner.prefill(obs))

    def decode(self, obs: Observation) -> Sequence[Action]:
        return self._record(obs, self.inner.decode(obs))

    def _record(self, obs: Observation, actions: Sequence[Action]) -> list[Action]:
        # keyed by the step the actions follow: the last of an observation's queries (a
        # policy with a decode period observes that many steps at once)
        last = obs.step + obs.queries.shape[2] - 1 if obs.phase == Phase.DECODE else obs.step
        self.log[(obs.phase, last, obs.layer)] = list(actions)
        return list(actions)


class Session:
    """Prefill then decode steps of a batch through ``backend``, with random q/k/v fed to
    SGLang's ``RadixAttention`` layers; remembers what it fed."""

    def __init__(self, backend, sched: Scheduler, seed: int) -> None:
        self.backend, self.sched = backend, sched
        self.gen = torch.Generator().manual_seed(seed)
        self.outputs: list[torch.Tensor] = []  # per forward: [layers, T, H_q * D]
        self.fed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _qkv(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def randn(width: int) -> torch.Tensor:
            return torch.randn(SPEC.num_layers, tokens, width, generator=self.gen, dtype=torch.float64)

        qkv = (randn(HQ * D), randn(HKV * D), randn(HKV * D))
        self.fed.append(qkv)
        return qkv

    def prefill(self, reqs) -> None:
        loc = torch.cat([self.sched.row(r)[r.prefix_len :].long() for r in reqs])
        self.outputs.append(run_layers(self.backend, LAYERS, extend_batch(reqs, loc), *self._qkv(len(loc))))

    def decode(self, reqs, token: int) -> None:
        loc = torch.cat([self.sched.decode_slot(r, token) for r in reqs])
        self.outputs.append(run_layers(self.backend, LAYERS, decode_batch(reqs, loc), *self._qkv(len(reqs))))


def serve(backend, tree, pools, prompts: list[list[int]], steps: int, *, first: list[int] | None = None):
    """Optionally serve ``first`` to completion (so the tree holds it), then prefill
    ``prompts`` as one batch and decode ``steps`` tokens. Returns (session, requests, prefix K/V)."""
    sched = Scheduler(pools, tree)
    session = Session(backend, sched, seed=7)
    if first is not None:
        done = sched.admit(first, write_kv=False)
        session.prefill([done])
        sched.finish(done)
    reqs = [sched.admit(p, write_kv=False) for p in prompts]
    prefix_kv = [_pool_kv(pools, sched.row(r)[: r.prefix_len].long()) for r in reqs]  # the tree's, before the forward
    session.prefill(reqs)
    for step in range(steps):
        session.decode(reqs, token=1000 + step)
    return session, reqs, prefix_kv


def _pool_kv(pools, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(pools.kv.get_key_buffer(l)[slots].clone(), pools.kv.get_value_buffer(l)[slots].clone())
            for l in range(SPEC.num_layers)]  # fmt: skip


PROMPTS = [list(range(1, 25)) + list(range(200, 216)), list(range(300, 337))]  # 40 and 37 tokens
FIRST = list(range(1, 25)) + [77, 78]  # shares 24 tokens with PROMPTS[0]


def test_keep_everything_is_sglang_bit_for_bit():
    plain_pools, aware_pools = make_pools(), make_pools()
    plain_tree = make_tree(plain_pools, "unified-python", aware=False)
    aware_tree = make_tree(aware_pools, "unified-python")
    plain, _, _ = serve(torch_native(plain_pools), plain_tree, plain_pools, PROMPTS, steps=4, first=FIRST)
    wrapped, reqs, _ = serve(policy_backend(aware_pools, FullKV, aware_tree), aware_tree, aware_pools, PROMPTS,
                             steps=4, first=FIRST)  # fmt: skip
    assert reqs[0].prefix_len == 24  # the batch really reused the cached prefix
    for ours, theirs in zip(wrapped.outputs, plain.outputs, strict=True):
        assert torch.equal(ours, theirs)
    assert aware_pools.allocator.available_size() == plain_pools.allocator.available_size()


def _reference_outputs(session: Session, reqs, prefix_kv, policies: list[Recording], steps: int) -> list[list]:
    """ReferenceCache outputs per request per decode step per layer: [H_q, D] float64."""
    q_pre, k_pre, v_pre = session.fed[-1 - steps]
    starts = torch.tensor([0] + [r.kv.kv_committed_len - steps - r.prefix_len for r in reqs]).cumsum(0)
    results = []
    for b, (req, policy) in enumerate(zip(reqs, policies)):
        new = slice(int(starts[b]), int(starts[b + 1]))
        keys, values = [], []
        for layer in range(SPEC.num_layers):
            k_new = k_pre[layer, new].view(-1, HKV, D)
            v_new = v_pre[layer, new].view(-1, HKV, D)
            k_old, v_old = prefix_kv[b][layer]
            keys.append(torch.cat([k_old, k_new]).transpose(0, 1)[None])  # [1, H_kv, L, D]
            values.append(torch.cat([v_old, v_new]).transpose(0, 1)[None])
        ref = ReferenceCache(keys, values)
        for layer in range(SPEC.num_layers):
            ref.apply(policy.log.get((Phase.PREFILL, 0, layer), []))
        prompt = keys[0].shape[2]
        per_step = []
        for step in range(steps):
            q, k, v = session.fed[len(session.fed) - steps + step]
            outs = []
            for layer in range(SPEC.num_layers):
                ref.append(layer, k[layer, b].view(1, HKV, D), v[layer, b].view(1, HKV, D), prompt + step)
                ref.apply(policy.log.get((Phase.DECODE, step, layer), []))
                outs.append(ref.attend(layer, q[layer, b].view(1, HQ, D))[0])
            per_step.append(outs)
        results.append(per_step)
    return results


POLICIES = {
    "streamingllm": lambda: StreamingLLM(compression=0.3, sinks=2),
    "adasnapkv": lambda: AdaSnapKV(compression=0.3, window=4),
    "heterocache": lambda: HeteroCachePolicy(
        profile=synthetic_profile(SPEC), compression=0.7, trigger=WindowedOverlap(window=2, tau=0.95)
    ),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_compressed_attention_is_dense_attention_over_kept_tokens(name):
    pools = make_pools()
    tree = make_tree(pools, "unified-python")
    policies: list[Recording] = []

    def factory() -> Recording:
        policies.append(Recording(POLICIES[name]()))
        return policies[-1]

    steps = 6
    backend = policy_backend(pools, factory, tree)
    session, reqs, prefix_kv = serve(backend, tree, pools, PROMPTS, steps=steps, first=FIRST)
    policies = policies[1:]  # the first belongs to FIRST, served alone and released
    reference = _reference_outputs(session, reqs, prefix_kv, policies, steps)
    for step in range(steps):
        ours = session.outputs[len(session.outputs) - steps + step]  # [layers, B, H_q * D]
        for b in range(len(reqs)):
            for layer in range(SPEC.num_layers):
                torch.testing.assert_close(ours[layer, b].view(HQ, D), reference[b][step][layer], rtol=0, atol=1e-12)
    states = [backend.store.get(r.kv.req_pool_idx).kv for r in reqs]
    if name == "heterocache":
        assert any(isinstance(a, Recall) for p in policies for acts in p.log.values() for a in acts)
    # head-major: each request holds fewer pages than its own positions took slots, and the
    # rest went back to SGLang's allocator
    assert all(s.head_major and 0 < s.pages.num_pages < s.length - s.protected for s in states)
    in_rows = sum(int((pools.req_to_token.req_to_token[r.kv.req_pool_idx, : r.kv.kv_committed_len] != 0).sum())
                  for r in reqs)  # fmt: skip
    assert in_rows == sum(s.protected for s in states)  # only the tree's slots remain in the rows


def _random_qkv(gen: torch.Generator, *lead: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 q, k, v of every layer: [layers, *lead, H * D] for H = H_q, H_kv, H_kv."""
    return tuple(torch.randn(SPEC.num_layers, *lead, w, generator=gen, dtype=torch.float64)
                 for w in (HQ * D, HKV * D, HKV * D))  # fmt: skip


def _world(name: str):
    """Fresh pools, SGLang's default tree, the wrapper with POLICIES[name], a scheduler."""
    pools = make_pools()
    tree = make_tree(pools, "unified-python")
    return pools, tree, policy_backend(pools, POLICIES[name], tree), Scheduler(pools, tree)


def _finish_all(pools, tree, sched: Scheduler, reqs) -> None:
    """Finish ``reqs``, empty the tree, and check every slot and page came back."""
    for req in reqs:
        sched.finish(req)
    tree.evict(EvictParams(num_tokens=10_000))
    assert pools.allocator.available_size() == 512


@pytest.mark.parametrize("name", ["streamingllm", "adasnapkv"])
def test_chunked_prefill_compresses_after_the_last_chunk(name):
    """A prompt computed in two chunks (SGLang's chunked prefill, with its checkpoint in
    between) gives the same decode outputs as one prefill: the policy runs on the last
    chunk over the whole prompt, and the tree never took the first chunk's slots."""
    from sglang.srt.mem_cache.common import checkpoint_kv_cache

    prompt, steps, cut = PROMPTS[1], 3, 20
    gen = torch.Generator().manual_seed(3)
    q, k, v = _random_qkv(gen, len(prompt) + steps)
    outputs = {}
    for chunked in (False, True):
        pools, tree, backend, sched = _world(name)
        req = sched.admit(prompt, write_kv=False)
        loc = sched.row(req).long()
        bounds = [0, cut, len(prompt)] if chunked else [0, len(prompt)]
        for lo, hi in zip(bounds, bounds[1:]):
            req.kv.kv_committed_len = req.extend_end = hi
            req.prefix_len = lo
            batch = extend_batch([req], loc[lo:hi])
            batch.orig_seq_lens = torch.tensor([len(prompt)])
            run_layers(backend, LAYERS, batch, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
            if hi < len(prompt):
                checkpoint_kv_cache(req, tree)  # what SGLang does between chunks
                assert backend.store.get(req.kv.req_pool_idx) is None  # no policy yet
        kv = backend.store.get(req.kv.req_pool_idx).kv
        assert kv.head_major and kv.prompt_length == len(prompt) and kv.protected == 0
        assert req.kv.cache_protected_len == 0 and tree.evictable_size() + tree.protected_size() == 0
        outs = []
        for step in range(steps):
            slot = sched.decode_slot(req, token=500 + step)
            at = len(prompt) + step
            outs.append(run_layers(backend, LAYERS, decode_batch([req], slot), q[:, at : at + 1], k[:, at : at + 1],
                                   v[:, at : at + 1]))  # fmt: skip
        outputs[chunked] = torch.stack(outs)
        _finish_all(pools, tree, sched, [req])
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=1e-12)


def _padded_decode(reqs, loc: torch.Tensor, bs: int):
    """A decode batch padded to ``bs`` rows the way SGLang's graph runner pads a replay
    (padding rows: request row 0, length 1, slot 0)."""
    batch = decode_batch(reqs, loc)
    pad = bs - len(reqs)
    batch.batch_size = bs
    batch.req_pool_indices = torch.cat([batch.req_pool_indices.long(), torch.zeros(pad, dtype=torch.int64)])
    batch.req_pool_indices_cpu = batch.req_pool_indices
    batch.seq_lens = torch.cat([batch.seq_lens.long(), torch.ones(pad, dtype=torch.int64)])
    batch.seq_lens_cpu = batch.seq_lens
    batch.seq_lens_sum = int(batch.seq_lens.sum())
    batch.out_cache_loc = torch.cat([loc, torch.zeros(pad, dtype=loc.dtype)])
    batch.input_ids = torch.zeros(bs, dtype=torch.int64)
    batch.positions = batch.seq_lens - 1
    batch.num_padding = pad
    return batch


@pytest.mark.parametrize("name", ["streamingllm", "adasnapkv"])
def test_captured_decode_equals_eager_decode(name):
    """The decode step a CUDA graph records (fixed shapes: both kernels over every row of a
    padded batch, each row keeping its own) gives the eager step's outputs. On the CPU the
    recorded code is run as it was captured, after each replay's host preparation."""
    steps, bs = 3, 4
    gen = torch.Generator().manual_seed(5)
    q, k, v = _random_qkv(gen, steps, bs)
    prompt_qkv = _random_qkv(gen, sum(len(p) for p in PROMPTS))
    outputs = {}
    for graphs in (False, True):
        pools, tree, backend, sched = _world(name)
        reqs = [sched.admit(p) for p in PROMPTS]
        loc = torch.cat([sched.row(r).long() for r in reqs])
        run_layers(backend, LAYERS, extend_batch(reqs, loc), *prompt_qkv)
        if graphs:
            backend.inner.init_cuda_graph_state = lambda *args: None  # torch-native has no graph state
            backend.init_cuda_graph_state(bs, bs)
            capture = _padded_decode([], torch.zeros(0, dtype=torch.int64), bs)
            backend.init_forward_metadata_out_graph(capture, in_capture=True)
            with forward_context(ForwardContext(attn_backend=backend)):
                for i, layer in enumerate(LAYERS):  # the recorded (warm-up) run
                    layer(q[i, 0], k[i, 0], v[i, 0], capture)
        outs = []
        for step in range(steps):
            slots = torch.cat([sched.decode_slot(r, 900 + step) for r in reqs])
            if graphs:
                batch = _padded_decode(reqs, slots, bs)
                backend.init_forward_metadata_out_graph(batch)  # the replay's host preparation
                assert backend._capturing is False
                backend._capturing = True  # what replay runs is the recorded static step
                with forward_context(ForwardContext(attn_backend=backend)):
                    out = torch.stack([layer(q[i, step], k[i, step], v[i, step], batch) for i, layer in enumerate(LAYERS)])
                backend._capturing = False
            else:
                batch = decode_batch(reqs, slots)
                out = run_layers(backend, LAYERS, batch, q[:, step, : len(reqs)], k[:, step, : len(reqs)],
                                 v[:, step, : len(reqs)])  # fmt: skip
            outs.append(out[:, : len(reqs)])
        assert all(backend.store.get(r.kv.req_pool_idx).kv.head_major for r in reqs)
        outputs[graphs] = torch.stack(outs)
        _finish_all(pools, tree, sched, reqs)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=1e-12)
