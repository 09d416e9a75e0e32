"""The SGLang plugin on a CPU, without a server: SGLang's own ``load_plugins()`` finds it,
SGLang's registries build its attention backend and radix cache, and a policy compresses
one request's KV during its prefill: what each (layer, KV head) keeps moves to head-major
pages of SGLang's own pool, and the slots it no longer needs go back to SGLang's allocator.

    HCPOLICY_POLICY=h2o HCPOLICY_COMPRESSION=0.25 python examples/sglang_plugin.py

Needs ``pip install hcpolicy[sglang]`` (on a CPU-only machine: see
backends/sglang/README_SECTION.md; without torchvision, prefix the command with
``PYTHONPATH=tests/sglang/stubs``). A real server runs the same objects; the parts of a
ModelRunner and scheduler this script stands in for are marked.
"""

from __future__ import annotations

import os
import tempfile
import types
from array import array
from importlib.metadata import entry_points

import torch
import transformers

os.environ.setdefault("HCPOLICY_POLICY", "h2o")
os.environ.setdefault("HCPOLICY_COMPRESSION", "0.25")

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, PROMPT = 2, 4, 2, 16, 64


def sglang_context(model_dir: str) -> None:
    """What SGLang's scheduler process publishes before it builds pools and caches."""
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    reset_context()
    args = ServerArgs(model_path=model_dir, device="cpu", page_size=1, attention_backend="hcpolicy_torch_native",
                      radix_cache_backend="hcpolicy")  # fmt: skip
    publish(args, role="example", ranks=SpawnRanks(world_rank=0))


def main() -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()  # what launch_server and every scheduler process run first
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "hcpolicy"]
    print(f"load_plugins() ran entry point {ep.name} = {ep.value}")

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
    from sglang.srt.mem_cache.allocation import alloc_req_slots, alloc_token_slots
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.common import release_kv_cache
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, get_radix_cache_factory
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.srt.runtime_context import get_server_args
    from sglang.srt.sampling.sampling_params import SamplingParams

    model_dir = tempfile.mkdtemp(prefix="tiny-llama-")
    config = transformers.LlamaConfig(hidden_size=Q_HEADS * HEAD_DIM, num_hidden_layers=LAYERS,
                                      num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                                      architectures=["LlamaForCausalLM"])  # fmt: skip
    config.save_pretrained(model_dir)
    sglang_context(model_dir)

    # One worker's memory, as SGLang's ModelRunner allocates it (here on the CPU, float32).
    kv_pool = MHATokenToKVPool(size=256, page_size=1, dtype=torch.float32, head_num=KV_HEADS, head_dim=HEAD_DIM,
                               layer_num=LAYERS, device="cpu", enable_memory_saver=False)  # fmt: skip
    allocator = TokenToKVPoolAllocator(size=256, dtype=torch.float32, device="cpu", kvcache=kv_pool, need_sort=False)
    rows = ReqToTokenPool(size=4, max_context_len=256, device="cpu", enable_memory_saver=False)
    runner = types.SimpleNamespace(  # the ModelRunner attributes the factories read
        device="cpu", model_config=ModelConfig(model_path=model_dir), tp_size=1, req_to_token_pool=rows,
        token_to_kv_pool=kv_pool, token_to_kv_pool_allocator=allocator,
    )  # fmt: skip
    backend = ATTENTION_BACKENDS["hcpolicy_torch_native"](runner)  # --attention-backend hcpolicy_torch_native
    ctx = TreeCacheBuildContext(
        server_args=get_server_args(), params=CacheInitParams(disable=False, req_to_token_pool=rows,
        token_to_kv_pool_allocator=allocator, page_size=1), is_hybrid_swa=False, is_hybrid_ssm=False,
        enable_hierarchical_cache=False, disable_radix_cache=False,
        tp_worker=types.SimpleNamespace(model_runner=runner), model_config=runner.model_config, tp_size=1,
        tp_rank=0, tp_group=None,
    )  # fmt: skip
    runner.attn_backend = backend
    tree = get_radix_cache_factory("hcpolicy")(ctx)  # --radix-cache-backend hcpolicy
    print(f"policy {os.environ['HCPOLICY_POLICY']} at compression {os.environ['HCPOLICY_COMPRESSION']}: "
          f"{type(backend).__name__} over {type(backend.inner).__name__}, {type(tree).__name__}")  # fmt: skip

    # Admission, as the scheduler does it: match the tree, lock, take a row and slots.
    free_at_start = allocator.available_size()
    req = Req(rid="demo", origin_input_text="", origin_input_ids=array("q", range(1, PROMPT + 1)),
              sampling_params=SamplingParams(temperature=0, max_new_tokens=1))  # fmt: skip
    req.init_next_round_input(tree)
    req.lock = tree.lock(req.last_node)
    (row,) = alloc_req_slots(rows, [req], tree)
    loc = alloc_token_slots(tree, PROMPT)
    rows.write((row, slice(0, PROMPT)), loc.to(torch.int32))
    req.kv.kv_allocated_len = req.kv.kv_committed_len = PROMPT
    live = int((rows.req_to_token[row, :PROMPT] != 0).sum())
    free = allocator.available_size()
    print(f"before: row {row} maps {PROMPT} positions to {live} live slots; allocator has {free} free")

    # The prefill forward: every layer's attention goes through the wrapper, whose policy
    # compresses the layer once its KV is in the pool.
    batch = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=torch.arange(1, PROMPT + 1),
        req_pool_indices=torch.tensor([row]), seq_lens=torch.tensor([PROMPT]), out_cache_loc=loc, seq_lens_sum=PROMPT,
        positions=torch.arange(PROMPT), extend_num_tokens=PROMPT, extend_seq_lens=torch.tensor([PROMPT]),
        extend_prefix_lens=torch.tensor([0]), extend_start_loc=torch.tensor([0]), extend_prefix_lens_cpu=[0],
        extend_seq_lens_cpu=[PROMPT], seq_lens_cpu=torch.tensor([PROMPT]), req_pool_indices_cpu=torch.tensor([row]),
        capture_hidden_mode=CaptureHiddenMode.NULL,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    backend.init_forward_metadata(batch)
    with forward_context(ForwardContext(attn_backend=backend)):
        for layer_id in range(LAYERS):
            layer = RadixAttention(Q_HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, layer_id=layer_id)
            q = torch.randn(PROMPT, Q_HEADS * HEAD_DIM, generator=gen)
            k, v = (torch.randn(PROMPT, KV_HEADS * HEAD_DIM, generator=gen) for _ in range(2))
            layer(q, k, v, batch)

    state = backend.store.get(row).kv
    for layer_id in range(LAYERS):
        kept = state.view(layer_id).lengths[0].tolist()
        print(f"layer {layer_id}: tokens each KV head sees: {kept} of {PROMPT}")
    live = int((rows.req_to_token[row, :PROMPT] != 0).sum())
    pages = state.pages.num_pages if state.head_major else 0
    print(f"after: row {row} maps {PROMPT} positions to {live} live slots; the request keeps {pages} pages of "
          f"head-major KV; allocator has {allocator.available_size()} free")  # fmt: skip

    # Release, as the scheduler does when the request ends: the tree takes the intact prefix.
    req.finished_reason = FINISH_LENGTH(length=0)
    release_kv_cache(req, tree, checkpoint=True)
    print(f"released: the radix tree holds {tree.evictable_size()} uncompressed tokens")
    tree.evict(EvictParams(num_tokens=10_000))
    print(f"after evicting the tree: {allocator.available_size()} free slots (started with {free_at_start})")


if __name__ == "__main__":
    main()
