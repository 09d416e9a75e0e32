"""Policies through the engine: the same tokens as the HF backend (which executes the same
actions on transformers), real memory drops, pages return to the pool, offload/recall move
real bytes, and bad actions fail."""

import pytest
import torch

from engine_helpers import save, synthetic_profile, tiny_hf_model
from hcpolicy.actions import ActionError, Recall, Select, Selection
from hcpolicy.backends.torch_engine import Engine, EngineConfig, load_checkpoint
from hcpolicy.drift import EveryN, Never
from hcpolicy.policy.baselines import H2O, FullKV, PyramidKV, SnapKV, StreamingLLM
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.policy.quest import Quest

pytest.importorskip("transformers")
NEW = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF backend, engine) over one tiny Llama with 8 query / 4 KV heads."""
    from hcpolicy.backends.hf import HFBackend

    model = tiny_hf_model("llama", heads=8, kv_heads=4)
    folder = save(model, tmp_path_factory.mktemp("llama"))
    engine = Engine(load_checkpoint(folder), EngineConfig(max_seq_len=256, max_batch_size=3, page_size=8, prefill_chunk=32))
    return HFBackend(model), engine


POLICIES = {
    "full": lambda spec: FullKV(),
    "snapkv": lambda spec: SnapKV(compression=0.5, window=8),
    "streamingllm": lambda spec: StreamingLLM(compression=0.4),
    "h2o": lambda spec: H2O(compression=0.5),
    "pyramidkv": lambda spec: PyramidKV(compression=0.5, window=8),
    "heterocache": lambda spec: HeteroCachePolicy(profile=synthetic_profile(spec), compression=0.6),
    "heterocache_every3": lambda spec: HeteroCachePolicy(profile=synthetic_profile(spec), compression=0.6,
                                                         trigger=EveryN(n=3)),
    "heterocache_faithful": lambda spec: HeteroCachePolicy(profile=synthetic_profile(spec), compression=0.6,
                                                           faithful=True, trigger=EveryN(n=2)),
    "quest": lambda spec: Quest(compression=0.5, page_size=8),
}  # fmt: skip


def hf_generate(backend, ids, policy, **kwargs):
    out, cache = backend.generate(ids, policy, max_new_tokens=NEW, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, **kwargs)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1), cache


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_matches_hf_backend(pair, name):
    backend, engine = pair
    ids = torch.randint(3, 96, (1, 60), generator=torch.Generator().manual_seed(1))
    tokens, logits, cache = hf_generate(backend, ids, POLICIES[name](backend.spec))
    out = engine.generate(ids, NEW, POLICIES[name](engine.spec))
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    assert engine.executor.recalls == cache.recalls
    assert engine.kv.kept_tokens() == sum(
        int(layer.ragged.lengths.sum()) if layer.ragged is not None else layer.keys.shape[2] * layer.keys.shape[1]
        for layer in cache.layers
    )


@pytest.mark.parametrize("name", ["full", "snapkv", "heterocache_never"])
def test_batch_of_different_lengths_matches_hf_left_padding(pair, name):
    """Prompts of 40, 57 and 23 tokens in one batch; HF runs them left padded."""
    backend, engine = pair
    make = {"full": lambda s: None, "snapkv": POLICIES["snapkv"],
            "heterocache_never": lambda s: HeteroCachePolicy(profile=synthetic_profile(s), compression=0.7,
                                                             trigger=Never())}[name]  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (40, 57, 23)]
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = (torch.arange(longest) >= torch.tensor([longest - len(p) for p in prompts])[:, None]).long()
    tokens, logits, _ = hf_generate(backend, ids, make(backend.spec), attention_mask=mask)
    out = engine.generate(prompts, NEW, make(engine.spec))
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    for i, p in enumerate(prompts):  # and each sequence alone gives its row of the batch
        if name != "heterocache_never":
            assert torch.equal(engine.generate([p], NEW, make(engine.spec)).tokens[0], out.tokens[i])


def test_memory_follows_the_policy_and_pages_return(pair):
    _, engine = pair
    ids = torch.randint(3, 96, (1, 120), generator=torch.Generator().manual_seed(2))
    engine.prefill(ids, None, max_new_tokens=8)
    full_pages = engine.kv.allocator.used_pages
    engine.prefill(ids, SnapKV(compression=0.25, window=8), max_new_tokens=8)
    kept = engine.kv.host_lengths
    assert int(kept.max()) <= 0.25 * 120 + 1
    assert engine.kv.allocator.used_pages < 0.5 * full_pages  # evicted pages went back to the pool
    assert torch.equal(engine.kv.lengths.cpu(), kept)  # device lengths agree with the host mirror
    engine.release()
    assert engine.kv.allocator.used_pages == 0 and engine.host_bytes() == 0


def test_heterocache_offloads_satellites_and_recalls_real_bytes(pair):
    _, engine = pair
    ids = torch.randint(3, 96, (1, 80), generator=torch.Generator().manual_seed(4))
    # refresh=False: the engine never feeds a chunk of new tokens, so only satellites go out
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=EveryN(n=2),
                               refresh=False)  # fmt: skip
    engine.prefill(ids, policy, max_new_tokens=8)
    satellites = 2 * 2  # layers x satellites per layer
    per_token = 2 * engine.mc.head_dim * 4
    assert engine.host_bytes() == satellites * 80 * per_token
    layer, b, h = 1, 0, 1
    host = engine.runtime._store.get((engine.executor.cache_id, layer, b, h)).typed()  # [80, 2, D]
    tok = torch.tensor([5])
    for _ in range(4):
        tok = engine.decode(tok).argmax(-1)
    assert engine.executor.recalls > 0
    # the satellite's device rows are the host rows at the positions it now holds
    keys, values, positions = engine.kv.entries_view(layer, [h])
    n = engine.executor.resident[(layer, b, h)]
    pos = positions[0, 0, :n]
    assert torch.equal(keys[0, 0, :n], host[pos, 0]) and torch.equal(values[0, 0, :n], host[pos, 1])
    # generated tokens stay after the recalled ones
    assert int(engine.kv.host_lengths[layer, b, h]) == n + 4 and int(positions[0, 0, n]) == 80


def test_bad_actions_raise(pair):
    _, engine = pair
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    engine.prefill(ids, SnapKV(compression=0.5, window=8), max_new_tokens=4)

    def sel(*positions):
        return Selection(indices=torch.tensor([[list(positions)]]), lengths=torch.tensor([[len(positions)]]))

    kept = engine.kv.entries_view(0, [0])[2][0, 0, :3].tolist()
    with pytest.raises(ActionError, match="not on the device"):
        engine.executor.apply([Select(layer=0, heads=[0], selection=sel(kept[0], 9999))])
    with pytest.raises(ActionError, match="ascending"):
        engine.executor.apply([Select(layer=0, heads=[0], selection=sel(kept[1], kept[0]))])
    with pytest.raises(ActionError, match="without an earlier Offload"):
        engine.executor.apply([Recall(layer=0, heads=[0], selection=sel(kept[0]))])
    with pytest.raises(ActionError, match="out of range"):
        engine.executor.apply([Select(layer=7, heads=[0], selection=sel(kept[0]))])


def test_engine_rejects_bad_input(pair):
    _, engine = pair
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.prefill([[1] * 250], None, max_new_tokens=10)
    with pytest.raises(ValueError, match="batch size"):
        engine.prefill([[1, 2]] * 4, None, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        engine.prefill([[]], None, max_new_tokens=2)
    engine.prefill([[1, 2, 3]], None, max_new_tokens=2)
    engine.decode(torch.tensor([4]))
    with pytest.raises(RuntimeError, match="max_new_tokens"):
        engine.decode(torch.tensor([4]))


def test_engine_rejects_a_prompt_past_the_models_context():
    """max_seq_len sizes the engine's pages; the model's own context (max_position) is a
    separate limit that a prompt under max_seq_len can still pass."""
    from hcpolicy.backends.torch_engine import ModelConfig, random_model

    engine = Engine(random_model(ModelConfig.preset("tiny", max_position=64)), EngineConfig(max_seq_len=256, page_size=8))
    with pytest.raises(ValueError, match="prompt of 80 tokens is longer than the model's context of 64 tokens"):
        engine.generate([[5] * 80], 2)
    with pytest.raises(ValueError, match=r"prompt \(60\) \+ max_new_tokens \(8\) exceeds the model's context of 64"):
        engine.generate([[5] * 60], 8)
    assert engine.generate([[5] * 60], 4).tokens.shape[-1] == 4
