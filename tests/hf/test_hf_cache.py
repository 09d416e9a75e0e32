"""Compression is real (memory drops), exact against the reference executor, and recalls
bring back the offloaded bytes."""

import math

import pytest
import torch

from hcpolicy.actions import Offload, Recall, Select, Selection
from hcpolicy.backends.hf import HFBackend
from hcpolicy.backends.hf.attention import ragged_attention
from hcpolicy.backends.hf.compat import cache_kwarg
from hcpolicy.drift import EveryN
from hcpolicy.policy.baselines import AdaSnapKV, SnapKV
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.policy.quest import Quest
from hcpolicy.actions import ActionError
from hcpolicy.reference import ReferenceCache

from test_hf_exactness import prompt, synthetic_profile


def prefill(backend, policy, ids, **cache_options):
    cache = backend.new_cache(policy, **cache_options)
    with backend.attach():
        logits = backend.forward(ids, cache).logits
    return cache, logits


def test_device_bytes_follow_the_policy(llama):
    backend = HFBackend(llama)
    ids = prompt(length=200)
    cache, _ = prefill(backend, AdaSnapKV(compression=0.25, window=8), ids, headroom=0)
    full = cache.kv_bytes_full(4)
    # storage tensors really shrink: the bytes are those of the kept rows, nothing padded
    assert cache.kv_bytes_device() == pytest.approx(0.25 * full, rel=0.01)
    lengths = [n for layer in cache.layers for row in layer.ragged.host_lengths for n in row]
    assert len(set(lengths)) > 1  # Ada budgets differ per head, and so do the stored lengths
    assert sum(lengths) * 2 * 16 * 4 == cache.kv_bytes_device()


def test_ragged_attention_matches_the_reference_executor(llama):
    """The backend's attention over a compressed layer equals float64 attention over exactly
    the kept tokens (ReferenceCache), for a mix of head lengths."""
    backend = HFBackend(llama)
    ids = prompt(length=64)
    recorder, _ = prefill(backend, None, ids, record_window=None)
    layer = recorder.layers[0]
    keys, values = layer.keys.clone(), layer.values.clone()
    ref = ReferenceCache([keys], [values])
    gen = torch.Generator().manual_seed(3)
    chosen = [sorted(torch.randperm(64, generator=gen)[:n].tolist()) for n in (9, 40)]
    sel = Selection(
        indices=torch.tensor([[c + [0] * (40 - len(c)) for c in chosen]]), lengths=torch.tensor([[9, 40]])
    )
    actions = [Select(layer=0, heads=(0, 1), selection=sel)]
    ref.apply(actions)
    layer.apply(actions)
    q = torch.randn(1, 4, 1, 16, generator=gen)
    out = ragged_attention(q, layer.view(), torch.tensor([64]), scaling=16**-0.5)  # [B, Q, H_q, D]
    expected = ref.attend(0, q[:, :, 0])  # [B, H_q, D]
    torch.testing.assert_close(out[:, 0].double(), expected, rtol=0, atol=1e-6)
    assert layer.ragged.host_lengths == [[9, 40]]


def test_offload_then_recall_brings_back_the_exact_rows(llama):
    backend = HFBackend(llama)
    ids = prompt(length=64)
    cache, _ = prefill(backend, None, ids, record_window=None)
    layer = cache.layers[1]
    dense_k, dense_v = layer.keys.clone(), layer.values.clone()
    keep = Selection(indices=torch.tensor([[[1, 5, 9, 20]]]), lengths=torch.tensor([[4]]))
    layer.apply([Offload(layer=1, heads=(1,)), Select(layer=1, heads=(1,), selection=keep)])
    assert cache.host_bytes() == 64 * 2 * 16 * 4
    back = Selection(indices=torch.tensor([[[0, 33, 62, 63]]]), lengths=torch.tensor([[4]]))
    layer.apply([Recall(layer=1, heads=(1,), selection=back)])
    view = layer.view([1])
    assert view.positions[0, 0, :4].tolist() == [0, 33, 62, 63]
    assert torch.equal(view.keys[0, 0, :4], dense_k[0, 1, [0, 33, 62, 63]])
    assert torch.equal(view.values[0, 0, :4], dense_v[0, 1, [0, 33, 62, 63]])
    with pytest.raises(ActionError, match="never offloaded|not on the device|Recall"):
        layer.apply([Recall(layer=1, heads=(0,), selection=back)])
    with pytest.raises(ActionError, match="not on the device"):
        layer.apply([Select(layer=1, heads=(1,), selection=Selection(
            indices=torch.tensor([[[2]]]), lengths=torch.tensor([[1]])))])  # fmt: skip


def test_heterocache_recalls_during_generate(llama):
    backend = HFBackend(llama)
    ids = prompt(length=96)
    policy = HeteroCachePolicy(profile=synthetic_profile(backend.spec), compression=0.7, trigger=EveryN(n=2))
    seq, cache = backend.generate(ids, policy, max_new_tokens=6, do_sample=False)
    # 6 new tokens = prefill + 5 decode forwards (steps 0-4): EveryN(2) fires at steps 1 and 3
    assert cache.recalls == 2 * 2
    assert cache.host_bytes() == 2 * 96 * 2 * 16 * 4  # one satellite per layer, offloaded in full
    assert cache.runtime.counters().h2d_bytes > 0
    # device bytes: C of the prompt KV plus the generated tokens and the headroom
    # five decoded tokens were appended to both heads of both layers, headroom = 6 rows
    prompt_bytes = cache.kv_bytes_device() - 2 * 2 * 6 * 2 * 16 * 4
    assert prompt_bytes == pytest.approx(0.7 * 2 * 2 * 96 * 2 * 16 * 4, rel=0.03)


def test_fork_equals_inline_compression(llama):
    backend = HFBackend(llama)
    ids = prompt(length=80)
    recorder, logits = prefill(backend, None, ids, record_window=None)
    for policy in (SnapKV(compression=0.4, window=8), Quest(compression=0.5)):
        inline, inline_logits = prefill(backend, type(policy)(**_options(policy)), ids)
        forked = recorder.fork(policy)
        torch.testing.assert_close(logits, inline_logits, rtol=0, atol=0)
        with backend.attach():
            nxt = logits[:, -1:].argmax(-1)
            a = backend.forward(nxt, inline).logits
            b = backend.forward(nxt, forked).logits
        assert torch.equal(a, b)
    assert all(layer.ragged is None for layer in recorder.layers)  # the recording is untouched


def _options(policy):
    import attrs

    return {f.alias or f.name: getattr(policy, f.name) for f in attrs.fields(type(policy)) if f.init}


def test_fork_refuses_a_short_recording(llama):
    backend = HFBackend(llama)
    recorder, _ = prefill(backend, None, prompt(length=40), record_window=4)
    with pytest.raises(ValueError, match="needs 32 prompt queries; this prefill recorded 4"):
        recorder.fork(SnapKV(compression=0.5))


def test_unsupported_model_type():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        HFBackend(model)


def test_decode_kernel_path_matches_the_padded_path(llama):
    """The GPU fast path (ragged decode kernel; its torch reference on CPU) computes the same
    attention as the padded SDPA path over a compressed layer."""
    from hcpolicy.backends.hf.attention import _ragged_decode

    backend = HFBackend(llama)
    cache, _ = prefill(backend, AdaSnapKV(compression=0.3, window=8), prompt(length=90))
    layer = cache.layers[1]
    q = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(5))
    fast = _ragged_decode(layer, q, 0.25)
    padded = ragged_attention(q, layer.view(), torch.tensor([90]), 0.25)
    torch.testing.assert_close(fast, padded, rtol=0, atol=1e-5)


def test_release_frees_host_copies_and_storage(llama):
    backend = HFBackend(llama)
    policy = HeteroCachePolicy(profile=synthetic_profile(backend.spec), compression=0.7)
    cache, _ = prefill(backend, policy, prompt(length=64))
    assert cache.host_bytes() > 0 and cache.kv_bytes_device() > 0
    cache.release()
    assert cache.host_bytes() == 0 and len(cache.runtime) == 0
    assert cache.kv_bytes_device() == 0
    assert all(layer.ragged is None and layer.keys is None for layer in cache.layers)


def test_a_reset_layer_forgets_its_offloaded_heads(llama):
    """Layer reset (what ``release`` and transformers' ``Cache.reset`` call) drops the host
    positions with the storage: no runtime key names an evicted copy, and a second release
    finds nothing to evict."""
    backend = HFBackend(llama)
    policy = HeteroCachePolicy(profile=synthetic_profile(backend.spec), compression=0.7)
    cache, _ = prefill(backend, policy, prompt(length=64))
    assert cache.runtime_keys()  # the satellites were offloaded
    cache.release()
    assert cache.runtime_keys() == []
    cache.release()  # idempotent: a stale key would raise KeyError from the runtime's evict
    assert cache.host_bytes() == 0
