"""The reference engine on the embedded SmolLM2-135M-Instruct with HeteroCache (CPU or GPU):
the same code as the README's "Reference engine" snippet."""

from transformers import AutoTokenizer

from hcpolicy.backends.hf.loading import default_gguf
from hcpolicy.backends.torch_engine import Engine, EngineConfig, load_gguf
from hcpolicy.policy.factory import build_policy, default_profile_path
from hcpolicy.profile import HeadProfile

gguf = default_gguf()  # the embedded SmolLM2-135M-Instruct; load_checkpoint("dir") reads config + safetensors
model = load_gguf(gguf)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
engine = Engine(model, EngineConfig(max_seq_len=4096))  # CUDA graphs and Triton kernels on a GPU
profile = HeadProfile.load(default_profile_path("smollm2-135m-instruct"))
ids = tokenizer("A long document ... What is the capital of France?")["input_ids"]
out = engine.generate([ids], max_new_tokens=16, policy=build_policy("heterocache", 0.6, profile=profile))
print(tokenizer.decode(out.tokens[0]), engine.kv_bytes_device(), engine.host_bytes())
