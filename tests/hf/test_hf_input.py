"""Bad input to the HF backend fails at its boundary with what to fix, not inside
transformers or a policy; the valid input next to it still runs."""

import pytest
import torch

from hcpolicy.actions import Recall, Selection
from hcpolicy.backends.hf import HFBackend
from hcpolicy.policy.baselines import SnapKV
from hcpolicy.policy.heterocache import HeteroCachePolicy

from test_hf_exactness import prompt, synthetic_profile

GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_an_empty_prompt_is_refused(llama):
    backend = HFBackend(llama)
    with pytest.raises(ValueError, match=r"the input is empty \(input_ids of shape \(1, 0\)\)"):
        backend.generate(prompt(length=0), SnapKV(compression=0.5), **GEN)
    cache = backend.new_cache(SnapKV(compression=0.5))
    with backend.attach(), pytest.raises(ValueError, match="the input is empty"):
        backend.forward(prompt(length=0), cache)
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, tokens\] tensor"):
        backend.generate(prompt(length=4)[0], SnapKV(compression=0.5), **GEN)
    out, _ = backend.generate(prompt(length=1), SnapKV(compression=0.5), **GEN)
    assert out.shape == (1, 4)


def test_a_prompt_past_the_models_context_names_both_lengths(llama):
    backend = HFBackend(llama)
    limit = backend.spec.max_position
    assert limit == 1024
    with pytest.raises(ValueError, match=r"the prompt of 1030 tokens exceed the model's context of 1024 tokens"):
        backend.generate(prompt(length=1030), None, **GEN)
    with pytest.raises(ValueError, match=r"the prompt \(1023 tokens\) \+ max_new_tokens \(3\) exceed .* 1024 tokens"):
        backend.generate(prompt(length=1023), None, **GEN)
    cache = backend.new_cache(None)
    with backend.attach():
        backend.forward(prompt(length=1000), cache)
        with pytest.raises(ValueError, match=r"1000 cached \+ 30 new tokens exceed the model's context of 1024"):
            backend.forward(prompt(length=30), cache)
        backend.forward(prompt(length=24), cache)  # exactly the context
    assert cache.get_seq_length() == 1024


def test_a_sequence_that_is_all_padding_is_refused(llama):
    backend = HFBackend(llama)
    ids = prompt(batch=3, length=6)
    mask = torch.ones_like(ids)
    mask[1] = 0
    mask[2, :5] = 0  # one real token: fine
    with pytest.raises(ValueError, match=r"sequences \[1\] of the batch are all padding"):
        backend.generate(ids, SnapKV(compression=0.5), attention_mask=mask, **GEN)
    cache = backend.new_cache(SnapKV(compression=0.5))
    with backend.attach(), pytest.raises(ValueError, match="all padding"):
        backend.forward(ids, cache, attention_mask=mask)
    mask[1, -2:] = 1
    out, cache = backend.generate(ids, SnapKV(compression=0.5), attention_mask=mask, **GEN)
    assert out.shape == (3, 9) and cache.starts.tolist() == [0, 4, 5]


def test_a_released_cache_says_so(llama):
    backend = HFBackend(llama)
    policy = HeteroCachePolicy(profile=synthetic_profile(backend.spec), compression=0.7)
    _, cache = backend.generate(prompt(length=32), policy, **GEN)
    layer = cache.layers[0]
    satellite = 1
    kept = layer.host_resident[(0, satellite)]
    recall = Recall(layer=0, heads=[satellite], selection=Selection(
        indices=torch.arange(kept).view(1, 1, -1), lengths=torch.tensor([[kept]])))  # fmt: skip
    layer.apply([recall])  # valid while the cache lives
    cache.release()
    with pytest.raises(ValueError, match=r"this HeadwiseCache was released \(cache.release\(\)\)"):
        layer.apply([recall])
    with backend.attach(), pytest.raises(ValueError, match="was released"):
        backend.forward(prompt(length=1), cache)
    with pytest.raises(ValueError, match="was released"):
        layer.offloaded_view([satellite])
    with pytest.raises(ValueError, match="was released"):
        cache.fork(None)
