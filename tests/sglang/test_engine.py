"""A real ``sglang.Engine`` (scheduler, model runner, detokenizer: SGLang's processes) on the
CPU, with and without the plugin, on a tiny Llama checkpoint with random weights.

- SGLang alone and SGLang with ``full`` give transformers' greedy tokens;
- a compressing policy through the plugin gives the HF backend's greedy tokens under the
  same policy (float32: the same argmax at every step);
- SGLang's own scheduler runs more requests at once when the policy compresses (its
  ``#running-req`` log lines), since compressed requests give their slots back.

Each Engine runs ``engine_script.py`` in a subprocess (SGLang spawns its scheduler).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from sglang_helpers import STUBS, synthetic_profile

from hcpolicy.backends.hf import HFBackend
from hcpolicy.policy.factory import build_policy
from hcpolicy.spec import ModelSpec

SCRIPT = Path(__file__).resolve().parent / "engine_script.py"
SPEC = ModelSpec(architecture="LlamaForCausalLM", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=16)
PROMPTS = [[(7 * i + 3) % 125 + 3 for i in range(40)], [(11 * i + 5) % 125 + 3 for i in range(57)]]
NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama with weights large enough that attention decides the tokens, and the
    head profile HeteroCache uses on it."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    synthetic_profile(SPEC).save(folder / "profile.json")
    return folder


def run_engine(checkpoint: Path, policy: str, *, compression: float = 0.5, prompts=PROMPTS, new: int = NEW,
               tokens: int = 4096, ignore_eos: bool = True, page_size: int = 1) -> tuple[dict, str]:  # fmt: skip
    """(the script's JSON, the Engine's log: its scheduler's lines included)."""
    env = dict(os.environ, SGLANG_PLUGINS="none" if policy == "plain" else "hcpolicy",
               HCPOLICY_POLICY=policy, HCPOLICY_COMPRESSION=str(compression),
               HCPOLICY_PROFILE=str(checkpoint / "profile.json"), OMP_NUM_THREADS="1")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(STUBS)]))
    spec = dict(model=str(checkpoint), policy=policy, tokens=tokens, new=new, prompts=prompts, ignore_eos=ignore_eos,
                page_size=page_size)  # fmt: skip
    done = subprocess.run([sys.executable, str(SCRIPT), json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def hf_tokens(checkpoint: Path, policy: str, compression: float = 0.5) -> list[list[int]]:
    """Greedy tokens of PROMPTS through transformers and the HF backend under ``policy``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    backend = HFBackend(model)
    profile = None
    if policy == "heterocache":
        from hcpolicy.profile import HeadProfile

        profile = HeadProfile.load(checkpoint / "profile.json")
    out = []
    for prompt in PROMPTS:
        cache = backend.new_cache(build_policy(policy, compression, profile=profile))
        tokens = []
        with torch.no_grad(), backend.attach():
            logits = backend.forward(torch.tensor([prompt]), cache).logits[0, -1]
            for _ in range(NEW):
                tokens.append(int(logits.argmax()))
                logits = backend.forward(torch.tensor([[tokens[-1]]]), cache).logits[0, -1]
        out.append(tokens)
    return out


def test_plain_and_full_give_transformers_tokens(checkpoint):
    expected = hf_tokens(checkpoint, "full")
    plain, _ = run_engine(checkpoint, "plain")
    full, log = run_engine(checkpoint, "full")
    assert plain["tokens"] == expected and full["tokens"] == expected
    assert "head-major" not in log  # keep-everything never leaves SGLang's own layout


@pytest.mark.parametrize("policy, compression, page_size", [
    ("streamingllm", 0.4, 1), ("streamingllm", 0.4, 4), ("heterocache", 0.7, 1),
])  # fmt: skip
def test_compressed_engine_gives_the_hf_backends_tokens(checkpoint, policy, compression, page_size):
    """Pages of 4 slots: a head-major page is 4 x 2 rows a layer, and SGLang's paged decode
    allocation (a fresh page every 4 steps) feeds it."""
    expected = hf_tokens(checkpoint, policy, compression)  # heterocache: a full pivot in 2 heads, so above 0.5
    assert expected != hf_tokens(checkpoint, "full")  # the policy changes the answer: the check can fail
    got, log = run_engine(checkpoint, policy, compression=compression, page_size=page_size)
    assert got["tokens"] == expected
    released = re.findall(r"released (\d+) head-major pages \((\d+) rows\) for (\d+) positions", log)
    assert len(released) == len(PROMPTS)
    for pages, _, positions in released:  # a page holds one row of each KV head: fewer pages than positions
        assert 0 < int(pages) < int(positions)


def _most_running(log: str) -> int:
    return max(int(n) for n in re.findall(r"Decode batch, #running-req: (\d+)", log))


def test_sglang_admits_more_requests_when_the_policy_compresses(checkpoint):
    """12 prompts of 240 tokens on a pool of 1,600 slots, 100 new tokens each: SGLang's own
    admission runs as many at once as the slots they hold allow."""
    prompts = [[(13 * i + 7 * r) % 125 + 3 for i in range(240)] for r in range(12)]
    plain, plain_log = run_engine(checkpoint, "plain", prompts=prompts, new=100, tokens=1600)
    ours, our_log = run_engine(checkpoint, "streamingllm", compression=0.25, prompts=prompts, new=100, tokens=1600)
    assert plain["pool"] == ours["pool"] == 1600
    most_plain, most_ours = _most_running(plain_log), _most_running(our_log)
    print(f"most running at once: SGLang {most_plain}, with the plugin {most_ours}")
    assert most_ours >= 1.8 * most_plain, (most_plain, most_ours)


def test_sglang_retracts_compressed_requests_before_pages_run_out(checkpoint):
    """Without ignore_eos SGLang admits on expected early stops and retracts when a decode
    step no longer fits. A compressed request may need more pages in a step than the one
    slot SGLang gives it: the plugin adds them to SGLang's count, so SGLang retracts in time
    (not a failed allocation in the forward pass), the retracted request is computed again,
    and SGLang's own check at idle finds every slot back (a leak stops the Engine)."""
    prompts = [[(13 * i + 7 * r) % 125 + 3 for i in range(240)] for r in range(10)]
    got, log = run_engine(checkpoint, "streamingllm", compression=0.25, prompts=prompts, new=400, tokens=1400,
                          ignore_eos=False)  # fmt: skip
    assert "Retract requests" in log
    assert len(got["tokens"]) == len(prompts) and all(0 < len(t) <= 400 for t in got["tokens"])
    assert len(re.findall(r"released \d+ head-major pages", log)) > len(prompts)  # a retracted request twice
