"""Engine.generate stops at stop tokens: the prefix it returns is what running every step
gives, ``lengths`` counts each sequence up to its stop, and checkpoints carry their stops."""

import json

import pytest
import torch

from engine_helpers import save, tiny_hf_model
from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, load_checkpoint, random_model


def engine() -> Engine:
    model = random_model(ModelConfig.preset("tiny"), seed=3)
    return Engine(model, EngineConfig(max_seq_len=128, max_batch_size=2, page_size=8, cuda_graphs=False))


def test_early_stop_returns_the_prefix_of_every_step():
    prompts = [list(range(5, 30)), list(range(40, 52))]
    eng = engine()
    full = eng.generate(prompts, 30)  # the tiny preset names no stop tokens
    assert full.tokens.shape == (2, 30) and full.lengths.tolist() == [30, 30]
    stops = {int(full.tokens[0, 2]), int(full.tokens[1, 1])}
    out = eng.generate(prompts, 30, eos_token_ids=stops)
    hit = [next(i for i, t in enumerate(row.tolist()) if t in stops) + 1 for row in full.tokens]
    assert out.lengths.tolist() == hit
    t = max(hit)
    assert torch.equal(out.tokens, full.tokens[:, :t]) and torch.equal(out.logits, full.logits[:, :t])
    assert eng.generate(prompts, 30, eos_token_ids=()).tokens.shape[1] == 30


def test_checkpoint_stops_come_from_generation_config(tmp_path):
    folder = save(tiny_hf_model("llama"), tmp_path)
    assert load_checkpoint(folder).config.eos_token_ids == (2,)  # config.json's
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [7, 2]}))
    assert load_checkpoint(folder).config.eos_token_ids == (2, 7)


@pytest.mark.slow
def test_smollm2_gguf_stops_at_im_end():
    """The embedded SmolLM2 (through the HF loader's cache): a chat answer ends at <|im_end|>."""
    pytest.importorskip("gguf")
    from hcpolicy.backends.hf.loading import ModelLoadError, default_gguf, load
    from hcpolicy.backends.torch_engine import load_gguf

    try:
        path = default_gguf()
    except ModelLoadError as err:
        pytest.skip(str(err))
    tok = load(str(path)).tokenizer
    model = load_gguf(path)
    assert 2 in model.config.eos_token_ids and 1 not in model.config.eos_token_ids  # <|im_end|>, <|im_start|>
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    out = Engine(model, EngineConfig(max_seq_len=256, page_size=16)).generate([tok(text)["input_ids"]], 48)
    answer = out.tokens[0, : out.lengths[0]].tolist()
    assert answer[-1] == 2 and len(answer) < 48 and out.tokens.shape[1] == len(answer)
    assert "Paris" in tok.decode(answer[:-1]) and "<|im_" not in tok.decode(answer[:-1])
