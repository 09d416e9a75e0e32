"""Keeping everything must reproduce plain transformers."""

import pytest
import torch

from hcpolicy.backends.hf import HFBackend
from hcpolicy.backends.hf.compat import cache_kwarg
from hcpolicy.classify import build_profile
from hcpolicy.policy.baselines import FullKV, SnapKV, StreamingLLM
from hcpolicy.policy.heterocache import HeteroCachePolicy

GEN = dict(max_new_tokens=10, do_sample=False)


def prompt(batch: int = 1, length: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def synthetic_profile(spec):
    stab = torch.linspace(0.2, 0.9, spec.num_layers * spec.num_kv_heads).view(spec.num_layers, -1)
    adj = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.num_kv_heads, dtype=torch.bool)
    adj[:, 0, 1] = True  # head 0 pivot, head 1 satellite in every layer
    return build_profile(spec, stab, adj, tau_stable=0.5)


def test_full_kv_is_bit_identical_to_transformers(family_model):
    ids = prompt()
    expected = family_model.generate(ids, **GEN, output_scores=True, return_dict_in_generate=True)
    backend = HFBackend(family_model)
    cache = backend.new_cache(FullKV())
    with backend.attach():
        got = family_model.generate(ids, **{cache_kwarg(family_model): cache}, **GEN, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        assert torch.equal(a, b)
    assert cache.kv_bytes_device() == cache.kv_bytes_full(4)


@pytest.mark.parametrize("make", [
    lambda spec: SnapKV(compression=1.0, window=8),
    lambda spec: StreamingLLM(compression=1.0),
    lambda spec: HeteroCachePolicy(profile=synthetic_profile(spec), compression=1.0),
], ids=["snapkv", "streamingllm", "heterocache"])  # fmt: skip
def test_keep_everything_through_ragged_storage(family_model, make):
    """Policies that emit actions move every layer to ragged storage; at C = 1 the logits
    match transformers within 1e-5 (float32, a different but equivalent SDPA call)."""
    ids = prompt()
    expected = family_model.generate(ids, **GEN, output_logits=True, return_dict_in_generate=True)
    backend = HFBackend(family_model)
    cache = backend.new_cache(make(backend.spec))
    with backend.attach():
        got = family_model.generate(ids, **{cache_kwarg(family_model): cache}, **GEN, output_logits=True, return_dict_in_generate=True)
    assert all(layer.ragged is not None for layer in cache.layers)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_manual_decode_loop_matches_generate(llama):
    ids = prompt()
    backend = HFBackend(llama)
    seq, _ = backend.generate(ids, SnapKV(compression=0.5, window=8), **GEN)
    cache = backend.new_cache(SnapKV(compression=0.5, window=8))
    tokens = []
    with backend.attach():
        logits = backend.forward(ids, cache).logits[:, -1]
        for _ in range(GEN["max_new_tokens"]):
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits = backend.forward(nxt, cache).logits[:, -1]
    assert torch.equal(torch.cat(tokens, dim=1), seq[:, ids.shape[1] :])


def test_batch_with_left_padding(llama):
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # the second prompt is 7 tokens shorter, left padded
    ids[1, :7] = 0
    expected = llama.generate(ids, attention_mask=mask, **GEN)
    backend = HFBackend(llama)
    got, cache = backend.generate(ids, FullKV(), attention_mask=mask, **GEN)
    assert torch.equal(got, expected)
    got, cache = backend.generate(ids, SnapKV(compression=1.0, window=8), attention_mask=mask, **GEN)
    assert torch.equal(got, expected)
    assert cache.starts.tolist() == [0, 7]


def test_attach_restores_the_attention_implementation(llama):
    backend = HFBackend(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with backend.attach():
            assert llama.config._attn_implementation == "hcpolicy"
            raise RuntimeError("boom")
    assert llama.config._attn_implementation == "sdpa"
