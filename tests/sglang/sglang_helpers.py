"""Driving SGLang 0.5.23's real classes on the CPU the way its scheduler does (page size 1).

Nothing of SGLang is mocked: the pools, allocator, radix caches, ``Req``, the admission
and release functions (``Req.init_next_round_input``, ``alloc_req_slots``,
``alloc_token_slots``, ``release_kv_cache``), ``ForwardBatch``, ``RadixAttention`` and the
torch-native attention backend are SGLang's own. What stands in for SGLang's scheduler
loop is ``Scheduler`` below: it calls those functions in the scheduler's order.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import tempfile
import types
from array import array
from pathlib import Path

import attrs
import pytest
import torch

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "sglang is not installed; install it with: pip install torch==2.13.0 -r backends/sglang/requirements-cpu.txt "
        "&& pip install --no-deps sglang==0.5.23",
        allow_module_level=True,
    )

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req  # noqa: E402
from sglang.srt.mem_cache.allocation import alloc_req_slots, alloc_token_slots  # noqa: E402
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.common import release_kv_cache  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: E402
from sglang.srt.mem_cache.unified_cache.components.base import ComponentType  # noqa: E402
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from hcpolicy.backends.sglang.attention import PolicyAttnBackend  # noqa: E402
from hcpolicy.backends.sglang.radix import PolicyRadixCache, PolicyUnifiedRadixCache  # noqa: E402
from hcpolicy.backends.sglang.store import PolicyStore  # noqa: E402
from hcpolicy.classify import build_profile  # noqa: E402
from hcpolicy.profile import HeadProfile  # noqa: E402
from hcpolicy.spec import ModelSpec  # noqa: E402

STUBS = Path(__file__).resolve().parent / "stubs"  # import-only torchvision and vllm (see conftest.py)
SPEC = ModelSpec(architecture="synthetic", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=8)
TREES = ("radix", "unified-python", "unified-rust")


@functools.cache
def runtime() -> None:
    """What SGLang's scheduler process sets up before building its classes: the published
    server args (its classes read them) and a world-size-1 process group (gloo)."""
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    args = ServerArgs(model_path="dummy", device="cpu", attention_backend="torch_native", page_size=1)
    reset_context()
    publish(args, role="test", ranks=SpawnRanks(world_rank=0))
    set_global_server_args_for_scheduler(args)
    if not torch.distributed.is_initialized():
        # a file store, not a TCP port: two test runs on one machine must not collide
        store = Path(tempfile.mkdtemp(prefix="hcpolicy-sglang-")) / "process-group"
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{store}")  # fmt: skip
        initialize_model_parallel(backend="gloo")


@attrs.define
class Pools:
    """SGLang's three memory classes of one worker."""

    kv: MHATokenToKVPool
    allocator: TokenToKVPoolAllocator
    req_to_token: ReqToTokenPool
    spec: ModelSpec


def make_pools(spec: ModelSpec = SPEC, *, slots: int = 512, rows: int = 8, context: int = 256,
               dtype: torch.dtype = torch.float64) -> Pools:  # fmt: skip
    runtime()
    kv = MHATokenToKVPool(
        size=slots, page_size=1, dtype=dtype, head_num=spec.num_kv_heads, head_dim=spec.head_dim,
        layer_num=spec.num_layers, device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    allocator = TokenToKVPoolAllocator(size=slots, dtype=dtype, device="cpu", kvcache=kv, need_sort=False)
    req_to_token = ReqToTokenPool(size=rows, max_context_len=context, device="cpu", enable_memory_saver=False)
    return Pools(kv, allocator, req_to_token, spec)


def make_tree(pools: Pools, kind: str, *, aware: bool = True):
    """SGLang's plain RadixCache or its default UnifiedRadixCache (python or rust tree core),
    as hcpolicy's compression-aware subclass (``aware``) or as SGLang ships it."""
    runtime()
    if kind == "radix":
        params = CacheInitParams(disable=False, req_to_token_pool=pools.req_to_token,
                                 token_to_kv_pool_allocator=pools.allocator, page_size=1)  # fmt: skip
        return (PolicyRadixCache if aware else RadixCache)(params)
    core = kind.removeprefix("unified-")
    from sglang.srt.environ import envs

    params = CacheInitParams(disable=False, req_to_token_pool=pools.req_to_token,
                             token_to_kv_pool_allocator=pools.allocator, page_size=1,
                             tree_components=(ComponentType.FULL,))  # fmt: skip
    with envs.SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND.override(core):
        tree = (PolicyUnifiedRadixCache if aware else UnifiedRadixCache)(params)
    assert tree._tree_core_backend == core
    return tree


def token_kv(spec: ModelSpec, tokens: list[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Deterministic K/V of each position given the tokens up to it, as a model's would be
    (a shared prompt prefix has the same KV in every request): [n, layers, 2, H_kv, D]."""
    out = []
    for p in range(len(tokens)):
        seed = int.from_bytes(hashlib.sha256(array("q", tokens[: p + 1]).tobytes()).digest()[:7], "little")
        gen = torch.Generator().manual_seed(seed)
        out.append(torch.randn(spec.num_layers, 2, spec.num_kv_heads, spec.head_dim, generator=gen, dtype=dtype))
    return torch.stack(out)


def torch_native(pools: Pools) -> TorchNativeAttnBackend:
    """SGLang's torch-native attention backend over ``pools`` (its constructor reads these
    three attributes of a ModelRunner)."""
    runner = types.SimpleNamespace(device="cpu", req_to_token_pool=pools.req_to_token, token_to_kv_pool=pools.kv)
    return TorchNativeAttnBackend(runner)


def policy_backend(pools: Pools, policy_factory, tree=None) -> PolicyAttnBackend:
    """hcpolicy's wrapper over SGLang's torch-native backend; attached to ``tree`` if given."""
    store = PolicyStore(spec=pools.spec, policy_factory=policy_factory, req_to_token_pool=pools.req_to_token,
                        pool=pools.kv, allocator=pools.allocator)  # fmt: skip
    if tree is not None:
        tree.attach(store)
    return PolicyAttnBackend(torch_native(pools), store)


def synthetic_profile(spec: ModelSpec) -> HeadProfile:
    """Per layer: head 0 a pivot with head 1 its satellite (needs >= 2 KV heads)."""
    stability = torch.full((spec.num_layers, spec.num_kv_heads), 0.8, dtype=torch.float64)
    adjacency = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.num_kv_heads, dtype=torch.bool)
    adjacency[:, 0, 1] = adjacency[:, 1, 0] = True
    return build_profile(spec, stability, adjacency, tau_stable=0.5)


class Scheduler:
    """Admission, decode-slot allocation and release, as SGLang's scheduler calls them."""

    def __init__(self, pools: Pools, tree) -> None:
        self.pools = pools
        self.tree = tree
        self._rids = 0

    def admit(self, tokens: list[int], *, write_kv: bool = True) -> Req:
        """Match the prompt in the tree, lock the match, take a row and slots for the rest,
        write the row; with ``write_kv``, store each new token's K/V (``token_kv``)."""
        self._rids += 1
        req = Req(rid=f"r{self._rids}", origin_input_text="", origin_input_ids=array("q", tokens),
                  sampling_params=SamplingParams(temperature=0, max_new_tokens=64))  # fmt: skip
        req.init_next_round_input(self.tree)
        req.lock = self.tree.lock(req.last_node)
        alloc_req_slots(self.pools.req_to_token, [req], self.tree)
        n, prefix = len(tokens), req.prefix_len
        row = req.kv.req_pool_idx
        if prefix:
            self.pools.req_to_token.write((row, slice(0, prefix)), self.tree.prefix_device_indices(req).to(torch.int32))
        loc = alloc_token_slots(self.tree, n - prefix)
        self.pools.req_to_token.write((row, slice(prefix, n)), loc.to(torch.int32))
        req.kv.kv_allocated_len = req.kv.kv_committed_len = n
        req.extend_end = n
        if write_kv:
            self.write_kv(loc, token_kv(self.pools.spec, tokens)[prefix:])
        return req

    def write_kv(self, loc: torch.Tensor, kv: torch.Tensor) -> None:
        """kv: [n, layers, 2, H_kv, D] for slots ``loc`` [n]."""
        for layer in range(self.pools.spec.num_layers):
            self.pools.kv.set_kv_buffer(None, loc, kv[:, layer, 0], kv[:, layer, 1], layer_id_override=layer)

    def decode_slot(self, req: Req, token: int) -> torch.Tensor:
        """One more position: a slot, written into the row at the logical position."""
        loc = alloc_token_slots(self.tree, 1)
        position = req.kv.kv_committed_len
        self.pools.req_to_token.write((req.kv.req_pool_idx, slice(position, position + 1)), loc.to(torch.int32))
        req.output_ids.append(token)
        req.kv.kv_allocated_len = req.kv.kv_committed_len = position + 1
        return loc

    def finish(self, req: Req) -> None:
        """What the scheduler does when a request ends: checkpoint into the tree and free."""
        req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
        release_kv_cache(req, self.tree, checkpoint=True)

    def row(self, req: Req) -> torch.Tensor:
        return self.pools.req_to_token.req_to_token[req.kv.req_pool_idx, : req.kv.kv_committed_len]


def extend_batch(reqs: list[Req], out_cache_loc: torch.Tensor) -> ForwardBatch:
    """The ForwardBatch of a prefill of ``reqs`` (admitted by ``Scheduler.admit``)."""
    seq = [r.kv.kv_committed_len for r in reqs]
    prefix = [r.prefix_len for r in reqs]
    extend = [s - p for s, p in zip(seq, prefix)]
    positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix, seq)])
    input_ids = torch.cat([torch.tensor(r.origin_input_ids[p:s]) for r, p, s in zip(reqs, prefix, seq)])
    return ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(reqs), input_ids=input_ids,
        req_pool_indices=torch.tensor([r.kv.req_pool_idx for r in reqs]), seq_lens=torch.tensor(seq),
        out_cache_loc=out_cache_loc, seq_lens_sum=sum(seq), positions=positions, extend_num_tokens=sum(extend),
        extend_seq_lens=torch.tensor(extend), extend_prefix_lens=torch.tensor(prefix),
        extend_start_loc=torch.tensor([0, *torch.tensor(extend).cumsum(0)[:-1].tolist()]),
        extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=extend, seq_lens_cpu=torch.tensor(seq),
        req_pool_indices_cpu=torch.tensor([r.kv.req_pool_idx for r in reqs]),
        capture_hidden_mode=CaptureHiddenMode.NULL,
    )  # fmt: skip


def decode_batch(reqs: list[Req], out_cache_loc: torch.Tensor) -> ForwardBatch:
    """The ForwardBatch of one decode step of ``reqs`` (after ``Scheduler.decode_slot``)."""
    seq = [r.kv.kv_committed_len for r in reqs]
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=len(reqs), input_ids=torch.tensor([r.output_ids[-1] for r in reqs]),
        req_pool_indices=torch.tensor([r.kv.req_pool_idx for r in reqs]), seq_lens=torch.tensor(seq),
        out_cache_loc=out_cache_loc, seq_lens_sum=sum(seq), positions=torch.tensor([s - 1 for s in seq]),
        seq_lens_cpu=torch.tensor(seq), req_pool_indices_cpu=torch.tensor([r.kv.req_pool_idx for r in reqs]),
        capture_hidden_mode=CaptureHiddenMode.NULL,
    )  # fmt: skip


def attention_layers(spec: ModelSpec) -> list[RadixAttention]:
    return [
        RadixAttention(spec.num_query_heads, spec.head_dim, spec.head_dim**-0.5, spec.num_kv_heads, layer_id=i)
        for i in range(spec.num_layers)
    ]


def run_layers(backend, layers: list[RadixAttention], batch: ForwardBatch, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Every layer's attention through ``backend`` as a model forward would call it.
    q: [layers, T, H_q * D]; k, v: [layers, T, H_kv * D] -> [layers, T, H_q * D]."""
    backend.init_forward_metadata(batch)
    with forward_context(ForwardContext(attn_backend=backend)):
        return torch.stack([layer(q[i], k[i], v[i], batch) for i, layer in enumerate(layers)])
