"""A context prefilled (and compressed) once, then continued by generate(cache=...)."""

import pytest
import torch

from hcpolicy.backends.hf import HFBackend
from hcpolicy.policy.baselines import FullKV, SnapKV

from hf_helpers import tiny_model


def tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(seed))


def test_keep_everything_continues_as_one_generate():
    """Prefill the context, then ask two questions in turn: the same tokens as plain
    transformers generating over the whole conversation each time."""
    model = tiny_model("llama")
    backend = HFBackend(model)
    ids = tokens(40, 1)
    cache = backend.prefill(ids, FullKV())
    for seed in (2, 3):
        ids = torch.cat([ids, tokens(6, seed)], dim=1)
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        ids, same = backend.generate(ids, None, cache=cache, max_new_tokens=5, do_sample=False)
        assert same is cache
        assert torch.equal(ids, expected)


def test_the_context_is_compressed_before_the_question():
    model = tiny_model("llama")
    backend = HFBackend(model)
    ids = tokens(64, 1)
    policy = SnapKV(compression=0.5, window=8)
    cache = backend.prefill(ids, policy, headroom=0)  # device bytes count the spare rows too
    assert cache.kv_bytes_device() < 0.6 * cache.kv_bytes_full(backend.dtype_bytes)  # before any question
    out, _ = backend.generate(torch.cat([ids, tokens(6, 2)], dim=1), policy, cache=cache, max_new_tokens=3,
                              do_sample=False)  # fmt: skip
    assert out.shape[1] == 64 + 6 + 3


def test_another_policy_for_a_continued_cache_is_refused():
    backend = HFBackend(tiny_model("llama"))
    cache = backend.prefill(tokens(16, 1), FullKV())
    with pytest.raises(ValueError, match="continues that cache under its own policy"):
        backend.generate(tokens(20, 1), SnapKV(compression=0.5), cache=cache, max_new_tokens=2)
