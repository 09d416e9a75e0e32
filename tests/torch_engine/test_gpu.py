"""On CUDA: the Triton paged decode against float64 dense attention, CUDA-graph decode
against eager decode, HeteroCache recalls under graphs. Skipped without a CUDA device."""

import pytest
import torch

from engine_helpers import dense_decode_f64, random_paged, synthetic_profile
from hcpolicy.actions import Recall, Selection
from hcpolicy.backends.torch_engine import Engine, EngineConfig, ModelConfig, random_model
from hcpolicy.drift import EveryN, Never
from hcpolicy.kernels.paged_decode import paged_decode
from hcpolicy.kernels.ragged_decode import DecodeConfig
from hcpolicy.policy.heterocache import HeteroCachePolicy

pytestmark = pytest.mark.gpu
DECODE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group, dim, lengths, page", [
    (4, 128, [[5000, 0, 1, 64, 4097, 300, 17, 2048]], 64),  # one sequence, ragged heads
    (4, 128, [[1000] * 8, [3000] * 8, [1] * 8], 16),  # batch 3
    (7, 64, [[777, 12]], 1),  # row table (Attend views), odd group
])  # fmt: skip
def test_triton_paged_decode_matches_float64(dtype, group, dim, lengths, page):
    from hcpolicy.kernels._paged_decode_triton import paged_decode_triton

    gen = torch.Generator().manual_seed(0)
    kv, table, lens, keys, values = random_paged(lengths, dim, page, dtype, gen, device="cuda")
    q = torch.randn(len(lengths), len(lengths[0]) * group, dim, generator=gen).to(dtype).cuda()
    bound = max(max(r) for r in lengths)
    out = paged_decode_triton(q, kv[:, 0], kv[:, 1], table, lens, page, dim**-0.5, bound, DecodeConfig())
    ref = dense_decode_f64(q.cpu(), keys, values, dim**-0.5)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=DECODE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [1, 16])
def test_triton_separate_kv_int32_tables_match_float64(dtype, page):
    """SGLang's layout: K and V of a layer as two buffers [slots, H, D] read as rows
    [slots * H, D] (row stride D), int32 tables and lengths."""
    gen = torch.Generator().manual_seed(4)
    lengths, group, dim = [[3000, 0, 1, 517], [64, 2048, 0, 9]], 4, 128
    kv, table, lens, keys, values = random_paged(lengths, dim, page, dtype, gen, device="cuda")
    k_buffer = torch.zeros(-(-kv.shape[0] // 8), 8, dim, dtype=dtype, device="cuda")  # [slots, H, D]
    v_buffer = torch.zeros_like(k_buffer)
    k, v = k_buffer.view(-1, dim), v_buffer.view(-1, dim)  # rows [slots * H, D], row stride D
    k[: kv.shape[0]], v[: kv.shape[0]] = kv[:, 0], kv[:, 1]
    q = torch.randn(2, 4 * group, dim, generator=gen).to(dtype).cuda()
    out = paged_decode(q, k, v, table.int(), lens.int(), page, dim**-0.5, max_length=3000, kernel="triton")
    ref = dense_decode_f64(q.cpu(), keys, values, dim**-0.5)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=DECODE_TOL[dtype])


def test_triton_reads_rows_past_2_31_elements():
    """Pages whose rows start past element 2**31 of K and V (int32 page ids: the kernel's
    row offsets must be int64)."""
    gen = torch.Generator().manual_seed(6)
    lengths, page, dim = [[700, 90]], 16, 128
    kv, table, lens, keys, values = random_paged(lengths, dim, page, torch.bfloat16, gen)
    skip = 2**31 // (page * dim) + 1  # pages below the used ones: ~4.3 GB of bf16 in each of K and V
    k = torch.zeros(skip * page + kv.shape[0], dim, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    k[skip * page :], v[skip * page :] = kv[:, 0], kv[:, 1]
    q = torch.randn(1, 2 * 4, dim, generator=gen).to(torch.bfloat16).cuda()
    out = paged_decode(q, k, v, (table + skip).int().cuda(), lens.int().cuda(), page, dim**-0.5, max_length=700,
                       kernel="triton")  # fmt: skip
    ref = dense_decode_f64(q.cpu(), keys, values, dim**-0.5)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=DECODE_TOL[torch.bfloat16])


def small_engine(cuda_graphs: bool, batch: int = 2, **options) -> Engine:
    config = ModelConfig(family="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4,
                         num_heads=8, num_kv_heads=4, head_dim=32, max_position=4096)  # fmt: skip
    model = random_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    return Engine(model, EngineConfig(max_batch_size=batch, max_seq_len=2048, page_size=16, cuda_graphs=cuda_graphs,
                                      **options))  # fmt: skip


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


def run_recalls(landing: str, steps: int = 15, **options) -> tuple[Engine, torch.Tensor]:
    engine = small_engine(True, batch=1, recall_landing=landing, **options)
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=EveryN(n=3))
    engine.prefill_random([1500], policy, max_new_tokens=steps + 1)
    tok, logits = torch.tensor([3], device="cuda"), []
    for _ in range(steps):
        logits.append(engine.decode(tok))
        tok = logits[-1].argmax(-1)
    engine.executor.recaller.land_ready()
    engine.executor.recaller.land_all()  # async: the gathers' shares not sent yet go now
    return engine, torch.stack(logits)


def assert_satellites_match_host(engine: Engine) -> None:
    for layer in range(engine.mc.num_layers):
        for h in (1, 2):
            host = engine.runtime._store.get((engine.executor.cache_id, layer, 0, h)).typed()
            keys, values, positions = engine.kv.entries_view(layer, [h])
            n = engine.executor.resident[(layer, 0, h)]
            pos = positions[0, 0, :n].cpu()
            assert torch.equal(keys[0, 0, :n].cpu(), host[pos, 0]) and torch.equal(values[0, 0, :n].cpu(), host[pos, 1])


@pytest.mark.parametrize("landing", ["eager_step", "next_step", "async"])
def test_heterocache_recalls_under_graphs(landing):
    engine, logits = run_recalls(landing)
    assert engine.executor.recalls >= 4 and engine.graph_steps > 0
    assert (engine.eager_steps > 0) == (landing == "eager_step")  # next_step / async: every step replays
    assert not engine.executor.recaller.inflight
    assert torch.equal(engine.kv.lengths.cpu(), engine.kv.host_lengths)
    assert_satellites_match_host(engine)
    free = engine.kv.allocator.num_pages
    engine.release()
    assert engine.kv.allocator.free_pages == free


def test_next_step_replay_equals_eager_step():
    _, eager = run_recalls("eager_step")
    _, replay = run_recalls("next_step")
    assert torch.equal(eager.argmax(-1), replay.argmax(-1))
    torch.testing.assert_close(eager.float(), replay.float(), rtol=0, atol=1e-2)


def test_batched_observations_under_graphs_change_nothing():
    outs = []
    for batched in (False, True):
        engine, logits = run_recalls("next_step", batch_observations=batched)
        outs.append((logits, engine.executor.recalls, engine.executor.recalled_rows))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1:] == outs[1][1:]


def test_inline_observation_under_graphs_is_refused():
    with pytest.raises(ValueError, match="inline"):
        small_engine(True, observe="inline")


# -- fused kernels --------------------------------------------------------------------------------
# bf16: each kernel rounds where torch rounds, so results differ by reduction order and libm
# ulps only: within 2 bf16 ulps of the value (rtol 1.6e-2) plus 1e-2 absolute near zero.
FUSED_TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_ops_match_torch_reference(dtype):
    from hcpolicy.backends.torch_engine.fused import TORCH_OPS, TritonOps

    ops, tol = TritonOps(), FUSED_TOL[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    x, r, w = randn(3, 5, 4096), randn(3, 5, 4096), randn(4096)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), TORCH_OPS.rms_norm(x, w, 1e-5), **tol)
    (y, total), (y_ref, total_ref) = ops.add_rms_norm(x, r, w, 1e-5), TORCH_OPS.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(total, total_ref)  # one rounding of the same sum
    torch.testing.assert_close(y, y_ref, **tol)
    config = ModelConfig.preset("llama-3.1-8b")
    from hcpolicy.backends.torch_engine.rope import inverse_frequencies

    inv = inverse_frequencies(config).cuda()
    qkv = randn(2, 3, (32 + 2 * 8) * 128)
    positions = torch.tensor([[0, 1, 2], [229370, 229371, 229372]], device="cuda")
    got = ops.rope_qkv(qkv, ops.rope_setup(inv, positions, dtype), 32, 8, 128)
    ref = TORCH_OPS.rope_qkv(qkv, TORCH_OPS.rope_setup(inv, positions, dtype), 32, 8, 128)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **tol)
    gate_up = randn(3, 1, 2 * 14336)
    torch.testing.assert_close(ops.silu_mul(gate_up), TORCH_OPS.silu_mul(gate_up), **tol)


def test_fused_append_equals_torch_append():
    engines = [small_engine(False, fused_kernels=f) for f in (False, True)]
    for e in engines:
        e.prefill_random([300, 77], None, max_new_tokens=4)
    gen = torch.Generator(device="cuda").manual_seed(2)
    k = torch.randn(2, 4, 1, 32, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(2, 4, 1, 32, generator=gen, device="cuda").to(torch.bfloat16)
    for e in engines:
        e.kv.append(1, k, v, torch.tensor([300, 300], device="cuda"), fused=e.ops.fused)
    a, b = (e.kv for e in engines)
    assert torch.equal(a.kv, b.kv) and torch.equal(a.positions, b.positions) and torch.equal(a.lengths, b.lengths)


@pytest.mark.parametrize("graphs", [False, True])
def test_fused_step_matches_unfused(graphs):
    """Same inputs through the fused and the torch ops (teacher-forced tokens, so a single
    flipped argmax cannot make the runs diverge): logits within 2% of their scale."""
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 512, (1, 600), generator=gen)
    forced = torch.randint(0, 512, (12,), generator=gen)
    runs = []
    for fused in (False, True):
        engine = small_engine(graphs, batch=1, fused_kernels=fused)
        assert engine.ops.fused == fused
        out = [engine.prefill(prompt, None, max_new_tokens=13)]
        out += [engine.decode(t.view(1).cuda()) for t in forced]
        runs.append(torch.stack(out).float())
    scale = runs[0].abs().max()
    assert float((runs[0] - runs[1]).abs().max()) < 2e-2 * float(scale)


@pytest.mark.parametrize("tau", [0.9, 0.3])
def test_device_decisions_under_graphs_equal_the_policys(tau):
    """Under CUDA graphs (Triton tap, window-scores and select kernels, the decision
    captured as its own graph), HeteroCache decides and recalls as its own scoring does."""
    from hcpolicy.drift import WindowedOverlap

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (1500,), generator=gen).tolist() for _ in range(2)]
    runs = []
    for device_decisions in (False, True):
        engine = small_engine(True, device_decisions=device_decisions)
        policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6,
                                   trigger=WindowedOverlap(tau=tau))  # fmt: skip
        out = engine.generate(prompts, 21, policy)
        assert (engine.monitor is not None) == device_decisions and engine.eager_steps == 0
        runs.append((out.tokens, engine.executor.recalls, engine.executor.recalled_rows, policy.recalls))
    assert runs[0][1:] == runs[1][1:]
    assert (runs[0][1] > 0) == (tau > 0.5)
    assert torch.equal(runs[0][0], runs[1][0])


def test_async_device_decisions_under_graphs_recall_what_the_policy_decides():
    """Device decisions with async recalls under CUDA graphs: the acts run a share of the
    fired pivots per step after the decision and each share's recalls go out in the step
    after; every recall lands from the pinned facts, and the recalled entries are the host
    store's bytes; the same recalls as acting at once."""
    from hcpolicy.drift import WindowedOverlap

    prompt = torch.randint(0, 512, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    runs = {}
    for landing in ("next_step", "async"):
        engine = small_engine(True, recall_landing=landing)
        policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6,
                                   trigger=WindowedOverlap(tau=0.97))  # fmt: skip
        engine.prefill([prompt], policy, max_new_tokens=13)
        assert engine.monitor is not None
        tok, seen = torch.tensor([3], device="cuda"), []
        for _ in range(10):  # step 4 decides (4 pivots): async acts on one a step at 5..8, issues at 6..9
            tok = engine.decode(tok).argmax(-1)
            seen.append((engine.executor.recalls, engine.executor.recalled_rows + engine.executor.moved_rows))
        engine.executor.recaller.land_all()  # async: the gathers' shares not sent yet go now
        assert not engine.executor.recaller.inflight and engine.eager_steps == 0
        assert torch.equal(engine.kv.lengths.cpu(), engine.kv.host_lengths)
        assert_satellites_match_host(engine)
        runs[landing] = seen + [(engine.executor.recalls, engine.executor.recalled_rows + engine.executor.moved_rows)]
    now, later = runs["next_step"], runs["async"]
    assert now[4][0] == 4 and [x[0] for x in later[4:10]] == [0, 0, 1, 2, 3, 4]
    assert later[-1] == now[4]  # after the last landing: the same recalls and rows


def test_a_partial_landing_keeps_its_batch_pages_until_the_compute_stream_read_them():
    """Heads of a batch that land without the rest (one was replaced by a newer recall)
    gather the batch's fresh pages on the compute stream; the batch dies in that landing,
    and the side stream, which does not wait for the compute stream, must not get the
    block back before the gather ran. (Under random drift a side-stream allocation once
    took it first: the tables filled with its values and a tail copy indexed out of bounds.)"""
    engine = small_engine(True, batch=1, recall_landing="async", async_recall_step_bytes=None)  # gathers sent at once
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, trigger=Never())
    engine.prefill_random([1500], policy, max_new_tokens=8)
    exe, rec = engine.executor, engine.executor.recaller

    def recall(heads):
        picks = [exe.host_positions[(0, 0, h)][:40].cpu() for h in heads]
        return Recall(layer=0, heads=tuple(heads), selection=Selection(
            indices=torch.stack(picks)[None], lengths=torch.full((1, len(heads)), 40, dtype=torch.int64)))

    exe.apply([recall([1, 2])])  # batch A
    exe.apply([recall([1])])  # batch B replaces A's head 1
    nbytes = rec.inflight[(0, 0, 2)].batch.fresh.untyped_storage().nbytes()  # no reference kept: A may die
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the landing's compute-stream ops run ~0.1 s late
    assert rec.land_ready() == 2  # A's head 2 and B's head 1, gathered; A and B die here
    with torch.cuda.stream(rec.async_.side()):  # the side stream at once wants a block of A's size
        junk = torch.empty(nbytes // 8, dtype=torch.int64, device="cuda").fill_(-7)
    torch.cuda.synchronize()
    del junk
    assert torch.equal(engine.kv.page_table.cpu(), engine.kv.host_table)
    assert torch.equal(engine.kv.lengths.cpu(), engine.kv.host_lengths)
    assert not rec.inflight
