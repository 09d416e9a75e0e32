"""One ``sglang.Engine`` on the CPU, for ``test_engine.py``: ``python engine_script.py SPEC``.

SPEC (JSON): model (a transformers checkpoint folder), policy ("plain": SGLang alone;
else the plugin, configured by the HCPOLICY_* environment), tokens (the KV pool's size),
new (greedy tokens per prompt), prompts (token ids), page_size (SGLang's, default 1), ignore_eos (default true; false lets
SGLang's admission count on early stops, so it may admit more than fits and retract). Prints one JSON line: each prompt's
output ids and the pool's size. The Engine spawns its scheduler: hence ``__main__``.
"""

import json
import sys

if __name__ == "__main__":
    import sglang as sgl

    spec = json.loads(sys.argv[1])
    kwargs = dict(
        model_path=spec["model"], device="cpu", skip_tokenizer_init=True, sampling_backend="pytorch",
        grammar_backend="none", dtype="float32", disable_cuda_graph=True, max_total_tokens=spec["tokens"],
        mem_fraction_static=0.5, log_level="info", random_seed=0, decode_log_interval=1,
        page_size=spec.get("page_size", 1),
    )  # fmt: skip
    if spec["policy"] == "plain":
        kwargs["attention_backend"] = "torch_native"
    else:
        kwargs.update(attention_backend="hcpolicy_torch_native", radix_cache_backend="hcpolicy")
    engine = sgl.Engine(**kwargs)
    try:
        params = {"temperature": 0, "max_new_tokens": spec["new"], "ignore_eos": spec.get("ignore_eos", True)}
        out = engine.generate(input_ids=spec["prompts"], sampling_params=params)
        info = engine.get_server_info()
        print(json.dumps({"tokens": [o["output_ids"] for o in out], "pool": info["max_total_num_tokens"]}), flush=True)
    finally:
        engine.shutdown()
