"""A real forward pass of SGLang's own Llama model class on the CPU, with the plugin.

How far this goes, and what stops it: ``sglang.srt.models.llama.LlamaForCausalLM`` is
built from a transformers ``LlamaConfig`` (random weights, or a transformers model's
weights through SGLang's own ``load_weights``) and run with SGLang's ``ForwardBatch``,
``RadixAttention`` layers, logits processor and torch-native attention backend, on
SGLang's real pools, allocator and radix cache. What stands in for SGLang here is the
``ModelRunner`` and scheduler loop (``sglang_helpers.Scheduler`` calls SGLang's admission
and release functions in its order), so that a step can be inspected; ``test_engine.py``
runs the whole ``sglang.Engine`` (scheduler and model runner included). The rotary layer
imports vllm's op at construction on this platform (never runs it): ``stubs/vllm`` stands
in for that import only.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from sglang_helpers import (
    Scheduler,
    decode_batch,
    extend_batch,
    make_pools,
    make_tree,
    policy_backend,
    runtime,
    synthetic_profile,
    torch_native,
)

from hcpolicy.drift import WindowedOverlap
from hcpolicy.policy.baselines import FullKV, StreamingLLM
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.spec import ModelSpec
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)  # fmt: skip
SPEC = ModelSpec(architecture="LlamaForCausalLM", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=16)
PROMPTS = [[(7 * i + 3) % 128 for i in range(40)], [(11 * i + 5) % 128 for i in range(33)]]


@pytest.fixture(scope="module")
def models():
    """(SGLang's LlamaForCausalLM, transformers' LlamaForCausalLM) with the same weights."""
    runtime()
    from sglang.srt.models.llama import LlamaForCausalLM

    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.15)
    hf.set_attn_implementation("sdpa")
    sgl = LlamaForCausalLM(config).eval()
    sgl.load_weights((name, tensor.clone()) for name, tensor in hf.state_dict().items())
    return sgl, hf


def generate(model, backend, pools, tree, steps: int) -> list[torch.Tensor]:
    """Greedy prefill + ``steps`` decode steps of PROMPTS as one batch: logits per forward [B, V]."""
    sched = Scheduler(pools, tree)
    reqs = [sched.admit(p, write_kv=False) for p in PROMPTS]
    loc = torch.cat([sched.row(r).long() for r in reqs])
    logits = [_forward(model, backend, extend_batch(reqs, loc))]
    for _ in range(steps):
        loc = torch.cat([sched.decode_slot(r, int(logits[-1][i].argmax())) for i, r in enumerate(reqs)])
        logits.append(_forward(model, backend, decode_batch(reqs, loc)))
    return logits


def _forward(model, backend, batch) -> torch.Tensor:
    backend.init_forward_metadata(batch)
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        return model(batch.input_ids, batch.positions, batch).next_token_logits


def test_sglang_model_matches_transformers(models):
    sgl, hf = models
    pools = make_pools(SPEC, dtype=torch.float32)
    logits = generate(sgl, torch_native(pools), pools, make_tree(pools, "unified-python", aware=False), steps=0)[0]
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            expected = hf(torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)


def test_keep_everything_is_sglang_bit_for_bit(models):
    sgl, _ = models
    plain_pools, aware_pools = make_pools(SPEC, dtype=torch.float32), make_pools(SPEC, dtype=torch.float32)
    plain = generate(sgl, torch_native(plain_pools), plain_pools, make_tree(plain_pools, "radix", aware=False), 4)
    tree = make_tree(aware_pools, "radix")
    ours = generate(sgl, policy_backend(aware_pools, FullKV, tree), aware_pools, tree, 4)
    for a, b in zip(ours, plain, strict=True):
        assert torch.equal(a, b)


POLICIES = {
    "streamingllm": lambda: StreamingLLM(compression=0.4, sinks=2),
    "heterocache": lambda: HeteroCachePolicy(profile=synthetic_profile(SPEC), compression=0.7,
                                             trigger=WindowedOverlap(window=2, tau=0.95)),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_compressed_sglang_matches_the_hf_backend(models, name):
    """The same policy through SGLang (this plugin: head-major pages, the paged kernel's torch
    path) and through transformers (the HF backend) gives the same decode logits, to 1e-4 in
    float32: both keep the same tokens per head at logical positions."""
    from hcpolicy.backends.hf import HFBackend

    sgl, hf = models
    pools = make_pools(SPEC, dtype=torch.float32)
    tree = make_tree(pools, "unified-python")
    policy = POLICIES[name]
    backend = policy_backend(pools, policy, tree)
    ours = generate(sgl, backend, pools, tree, steps=4)
    assert len(backend.store) == 2
    for t in backend.store:  # head-major, with fewer pages than the request's positions took slots
        assert t.kv.head_major and t.kv.pages.num_pages < t.kv.length
    hf_backend = HFBackend(hf)
    for i, prompt in enumerate(PROMPTS):
        cache = hf_backend.new_cache(policy())
        with torch.no_grad(), hf_backend.attach():
            logits = hf_backend.forward(torch.tensor([prompt]), cache).logits[0, -1]
            for step in range(1, len(ours)):
                token = int(ours[step - 1][i].argmax())
                assert token == int(logits.argmax())
                logits = hf_backend.forward(torch.tensor([[token]]), cache).logits[0, -1]
                torch.testing.assert_close(ours[step][i], logits, rtol=1e-4, atol=1e-4)
