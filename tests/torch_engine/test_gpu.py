"""On CUDA: the Triton paged decode against float64 dense attention, CUDA-graph decode
against eager decode, HeteroCache recalls under graphs. Skipped without a CUDA device."""

import pytest
import torch

from engine_helpers import dense_decode_f64, random_paged, synthetic_profile
from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.drift import EveryN, Never
from hcpolicy.kernels.ragged_decode import DecodeConfig
from hcpolicy.policy.heterocache import HeteroCachePolicy

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group, dim, lengths, page", [
    (4, 128, [[5000, 0, 1, 64, 4097, 300, 17, 2048]], 64),  # one sequence, ragged heads
    (4, 128, [[1000] * 8, [3000] * 8, [1] * 8], 16),  # batch 3
    (7, 64, [[777, 12]], 1),  # row table (Attend views), odd group
])  # fmt: skip
def test_triton_paged_decode_matches_float64(dtype, group, dim, lengths, page):
    from hcpolicy.backends.torch_engine._paged_decode_triton import paged_decode_triton

    gen = torch.Generator().manual_seed(0)
    kv, table, lens, keys, values = random_paged(lengths, dim, page, dtype, gen, device="cuda")
    q = torch.randn(len(lengths), len(lengths[0]) * group, dim, generator=gen).to(dtype).cuda()
    bound = max(max(r) for r in lengths)
    out = paged_decode_triton(q, kv, table, lens, page, dim**-0.5, bound, DecodeConfig())
    ref = dense_decode_f64(q.cpu(), keys, values, dim**-0.5)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=tol)


def small_engine(cuda_graphs: bool, batch: int = 2) -> Engine:
    config = ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4,
                         num_heads=8, num_kv_heads=4, head_dim=32, max_position=4096)  # fmt: skip
    model = random_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    return Engine(model, EngineConfig(max_batch_size=batch, max_seq_len=2048, page_size=16, cuda_graphs=cuda_graphs))


@pytest.mark.parametrize("policy", ["none", "heterocache_never"])
def test_cuda_graph_decode_equals_eager(policy):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (700, 1200)]
    outs = []
    for graphs in (False, True):
        engine = small_engine(graphs)
        make = (lambda: None) if policy == "none" else (
            lambda: HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=Never()))
        outs.append(engine.generate(prompts, 24, make()))
        if graphs:
            assert engine.graph_steps == 23 and engine.eager_steps == 0
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    torch.testing.assert_close(outs[0].logits.float(), outs[1].logits.float(), rtol=0, atol=1e-2)


def test_heterocache_recalls_under_graphs():
    engine = small_engine(True, batch=1)
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=EveryN(n=3))
    engine.prefill_random([1500], policy, max_new_tokens=16)
    tok = torch.tensor([3], device="cuda")
    for _ in range(15):
        tok = engine.decode(tok).argmax(-1)
    torch.cuda.synchronize()
    assert engine.executor.recalls >= 4 and engine.graph_steps > 0 and engine.eager_steps > 0
    assert torch.equal(engine.kv.lengths.cpu(), engine.kv.host_lengths)
    layer, h = 1, 1
    host = engine.runtime._store.get((engine.executor.cache_id, layer, 0, h)).typed()
    keys, _, positions = engine.kv.entries_view(layer, [h])
    n = engine.executor.resident[(layer, 0, h)]
    assert torch.equal(keys[0, 0, :n].cpu(), host[positions[0, 0, :n].cpu(), 0])
