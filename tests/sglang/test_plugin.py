"""The plugin as SGLang sees it: entry-point discovery by its own ``load_plugins()``, its
command line, its factories, and the configuration errors a user can make."""

from __future__ import annotations

import types
from importlib.metadata import entry_points

import attrs
import pytest
import torch
import transformers
from sglang_helpers import Pools, make_pools, runtime, torch_native

from hcpolicy.backends.sglang.attention import PolicyAttnBackend
from hcpolicy.backends.sglang.config import PolicyConfig
from hcpolicy.backends.sglang.plugin import attention_backend_names
from hcpolicy.backends.sglang.radix import PolicyUnifiedRadixCache, radix_cache_factory
from hcpolicy.backends.sglang.store import PolicyStore
from hcpolicy.policy.baselines import FullKV, SnapKV
from hcpolicy.registry import BACKENDS
from hcpolicy.spec import ModelSpec

SPEC = ModelSpec(architecture="LlamaForCausalLM", num_layers=2, num_query_heads=4, num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory as SGLang reads it (config only: nothing here loads weights)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             architectures=["LlamaForCausalLM"]).save_pretrained(path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def loaded():
    """SGLang's own plugin loader, as launch_server and the scheduler process run it."""
    from sglang.srt.plugins import load_plugins

    runtime()
    load_plugins()


def runner(pools: Pools, model_dir) -> types.SimpleNamespace:
    """The ModelRunner attributes an attention-backend factory reads (``test_engine.py`` runs
    a real one); the ModelConfig is SGLang's, read from disk."""
    from sglang.srt.configs.model_config import ModelConfig

    return types.SimpleNamespace(
        device="cpu", model_config=ModelConfig(model_path=str(model_dir)),
        req_to_token_pool=pools.req_to_token, token_to_kv_pool=pools.kv, token_to_kv_pool_allocator=pools.allocator,
    )  # fmt: skip


def test_load_plugins_discovers_and_registers(loaded):
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.registry import get_radix_cache_factory

    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "hcpolicy"]
    assert ep.value == "hcpolicy.backends.sglang.plugin:register"
    names = attention_backend_names()
    assert {"hcpolicy_triton", "hcpolicy_flashinfer", "hcpolicy_fa3", "hcpolicy_torch_native"} <= set(names)
    assert all(name in ATTENTION_BACKEND_CHOICES and name in ATTENTION_BACKENDS for name in names)
    assert get_radix_cache_factory("hcpolicy") is radix_cache_factory


def test_sglang_command_line_accepts_the_plugin(loaded, model_dir):
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(["--model-path", str(model_dir), "--attention-backend", "hcpolicy_triton",
                                "--radix-cache-backend", "hcpolicy"])  # fmt: skip
    assert (args.attention_backend, args.radix_cache_backend) == ("hcpolicy_triton", "hcpolicy")
    with pytest.raises(SystemExit):  # argparse's own rejection of an unknown backend
        prepare_server_args(["--model-path", str(model_dir), "--attention-backend", "hcpolicy_nonesuch"])


def test_factories_build_a_worker(loaded, model_dir, monkeypatch):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext
    from sglang.srt.runtime_context import get_server_args

    monkeypatch.setenv("HCPOLICY_POLICY", "snapkv")
    monkeypatch.setenv("HCPOLICY_COMPRESSION", "0.25")
    pools = make_pools(SPEC, dtype=torch.float32)
    worker = runner(pools, model_dir)
    backend = ATTENTION_BACKENDS["hcpolicy_torch_native"](worker)
    assert isinstance(backend, PolicyAttnBackend) and isinstance(backend.inner, TorchNativeAttnBackend)
    assert backend.store.spec == attrs.evolve(SPEC, max_position=512)  # from SGLang's ModelConfig
    policy = backend.store.policy_factory()
    assert isinstance(policy, SnapKV) and policy.compression == 0.25
    with pytest.raises(RuntimeError, match="--radix-cache-backend hcpolicy"):
        backend.store.start(1, length=8, protected=0)  # no compression-aware tree yet

    params = CacheInitParams(disable=False, req_to_token_pool=pools.req_to_token,
                             token_to_kv_pool_allocator=pools.allocator, page_size=1)  # fmt: skip
    ctx = TreeCacheBuildContext(
        server_args=get_server_args(), params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
        enable_hierarchical_cache=False, disable_radix_cache=False,
        tp_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(attn_backend=backend)),
        model_config=worker.model_config, tp_size=1, tp_rank=0, tp_group=None,
    )  # fmt: skip
    tree = radix_cache_factory(ctx)
    assert isinstance(tree, PolicyUnifiedRadixCache) and tree.store is backend.store and backend.store.tree_bound

    plain = types.SimpleNamespace(model_runner=types.SimpleNamespace(attn_backend=torch_native(pools)))
    with pytest.raises(ValueError, match="needs an hcpolicy attention backend"):
        radix_cache_factory(ctx.__class__(**{**ctx.__dict__, "tp_worker": plain}))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "HCPOLICY_POLICY is not set"),
        ({"HCPOLICY_POLICY": "h3o"}, r"HCPOLICY_POLICY='h3o' is not a policy; choices: .*heterocache.*snapkv"),
        ({"HCPOLICY_POLICY": "snapkv", "HCPOLICY_COMPRESSION": "half"}, "HCPOLICY_COMPRESSION must be a number"),
        ({"HCPOLICY_POLICY": "snapkv", "HCPOLICY_COMPRESSION": "1.5"}, r"HCPOLICY_COMPRESSION must be in \(0, 1\]"),
        ({"HCPOLICY_POLICY": "heterocache", "HCPOLICY_PROFILE": "/nonexistent.json"}, "is not a file"),
    ],
)
def test_configuration_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig.from_env(env)


def test_a_policy_needing_a_profile_says_how_to_give_one(loaded, model_dir, monkeypatch):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    monkeypatch.setenv("HCPOLICY_POLICY", "heterocache")
    monkeypatch.delenv("HCPOLICY_PROFILE", raising=False)
    with pytest.raises(ValueError, match="set HCPOLICY_PROFILE=P.json"):
        ATTENTION_BACKENDS["hcpolicy_torch_native"](runner(make_pools(SPEC, dtype=torch.float32), model_dir))


def test_hc_registry_lists_the_backend():
    cls = BACKENDS.get("sglang")
    assert cls.capabilities.per_head_lengths and not cls.capabilities.cuda_graphs
    with pytest.raises(ValueError, match="--attention-backend hcpolicy_triton"):
        cls.evaluator(None)


def test_a_pool_not_token_major_is_refused():
    pools = make_pools(SPEC, dtype=torch.float32)
    hnd = types.SimpleNamespace(get_key_buffer=lambda layer: torch.zeros(SPEC.num_kv_heads, 16, SPEC.head_dim).transpose(0, 1))
    with pytest.raises(ValueError, match="token-major KV layout"):
        PolicyStore(spec=SPEC, policy_factory=FullKV, req_to_token_pool=pools.req_to_token, pool=hnd,
                    allocator=pools.allocator)  # fmt: skip


def test_tensor_parallel_ranks_see_their_slice_of_heads(model_dir):
    from sglang.srt.configs.model_config import ModelConfig

    from hcpolicy.backends.sglang.store import model_spec

    config = ModelConfig(model_path=str(model_dir))  # 4 query heads, 2 KV heads
    whole, rank = model_spec(config), model_spec(config, 2)
    assert (whole.num_query_heads, whole.num_kv_heads) == (4, 2)
    assert (rank.num_query_heads, rank.num_kv_heads, rank.num_layers) == (2, 1, whole.num_layers)
    with pytest.raises(ValueError, match="2 KV heads do not split over --tp-size 4"):
        model_spec(config, 4)
