"""The evaluation path: prefill once, fork per policy, both protocols, padding in batches."""

import pytest
import torch

from hcpolicy.backends.hf import HFBackend
from hcpolicy.backends.hf.evaluate import HFEvaluator
from hcpolicy.policy.baselines import FullKV, SnapKV
from hcpolicy.policy.heterocache import HeteroCachePolicy

from hf_helpers import tiny_model
from test_hf_exactness import synthetic_profile

tokenizers = pytest.importorskip("tokenizers")


def char_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny models' vocabulary of 96."""
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]  # 95 printable characters
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars[:94])}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]", eos_token="~")
    return fast


@pytest.fixture
def evaluator():
    return HFEvaluator(HFBackend(tiny_model("llama", layers=2)), char_tokenizer(), "tiny")


def plain_greedy(model, ids, steps):
    return model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)[0, len(ids) :].tolist()


@pytest.mark.parametrize("protocol", ["aware", "agnostic"])
def test_full_kv_matches_plain_generation_sample_by_sample(evaluator, protocol):
    texts = [("the cat sat on the mat " * 6, " Q: where? A:"), ("a b c d e f " * 9, " Q: letters? A: "),
             ("zzz " * 20, " end")]  # fmt: skip
    prompts = [evaluator.encode(c, s, 6) for c, s in texts]
    out = evaluator.run(prompts, protocol, {"full": FullKV()})["full"]
    for p, gen in zip(prompts, out):
        expected = plain_greedy(evaluator.backend.model, p.context + p.suffix, 6)
        assert gen.text == evaluator._text(expected)
        assert gen.kv_bytes_device == gen.kv_bytes_full > 0


def test_policies_share_one_prefill_and_report_bytes(evaluator):
    prompts = [evaluator.encode("x y z w " * 30, " Q?", 4), evaluator.encode("p q r s " * 25, " Q?", 4)]
    profile = synthetic_profile(evaluator.backend.spec)
    policies = {
        "full": FullKV(),
        "snapkv": SnapKV(compression=0.5, window=4),
        "heterocache": HeteroCachePolicy(profile=profile, compression=0.75),
    }
    out = evaluator.run(prompts, "agnostic", policies)
    fractions = {k: sum(g.kv_bytes_device for g in v) / sum(g.kv_bytes_full for g in v) for k, v in out.items()}
    assert fractions["full"] == 1.0
    assert fractions["snapkv"] == pytest.approx(0.5, abs=0.01)
    assert fractions["heterocache"] == pytest.approx(0.75, abs=0.02)
    assert all(g.host_bytes > 0 for g in out["heterocache"])  # satellites offloaded
    assert all(g.host_bytes == 0 for g in out["snapkv"])


def test_bad_protocol(evaluator):
    with pytest.raises(ValueError, match="protocol"):
        evaluator.run([evaluator.encode("abc", "d", 1)], "sideways", {"full": None})


def test_stops_at_the_models_stop_tokens_and_early_stop_changes_no_text(evaluator):
    assert evaluator.stops == {2}  # the tiny llama's generation config, not the tokenizer's '~'
    prompts = [evaluator.encode("the cat sat on the mat " * 4, " Q:", 12), evaluator.encode("a b c d " * 9, " A:", 9)]
    rows = []
    evaluator._text = lambda ids, text=evaluator._text: rows.append(ids) or text(ids)
    evaluator.stops = frozenset()  # run every step
    evaluator.run(prompts, "agnostic", {"full": FullKV()})
    full_rows = list(rows)
    assert [len(r) for r in full_rows] == [12, 9]
    evaluator.stops = frozenset({full_rows[0][2], full_rows[1][1]})
    calls = []
    forward = evaluator.backend.forward
    evaluator.backend.forward = lambda *a, **k: calls.append(a[0].shape) or forward(*a, **k)
    out = evaluator.run(prompts, "agnostic", {"full": FullKV()})["full"]
    assert [g.text for g in out] == [evaluator._text(r) for r in full_rows]
    assert sum(shape[1] == 1 for shape in calls) <= 2  # decode forwards: stopped by the third token
