"""The device-side window monitor (``DeviceMonitor``): the engine scores HeteroCache's drift
windows from its decode step's taps and gives the same decisions, recalls and tokens as
the policy's own scoring; the tap holds exactly the logits a dense computation gives."""

import importlib.util
import math

import pytest
import torch

from engine_helpers import run_interpreted, small_engine, small_llama, synthetic_profile, token_ids as ids
from hcpolicy.backends.torch_engine import Engine, EngineConfig
from hcpolicy.drift import EveryN, WindowedOverlap
from hcpolicy.kernels.paged_decode import Tap, paged_decode
from hcpolicy.policy.heterocache import HeteroCachePolicy

pytest.importorskip("transformers")
NEW = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_llama(tmp_path_factory.mktemp("llama"))


def engine_of(model, **options) -> Engine:
    return small_engine(model, observe="deferred", **options)


@pytest.mark.parametrize("tau", [0.9, 0.97, 0.3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("faithful", [False, True])
def test_device_decisions_equal_the_policys(model, tau, batch, faithful):
    """Same recalls (count, rows), same trigger references and same tokens with the
    window scored on the device as with HeteroCache's decode_layers."""
    runs = []
    for device_decisions in (False, True):
        engine = engine_of(model, device_decisions=device_decisions)
        policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, faithful=faithful,
                                   trigger=WindowedOverlap(tau=tau, per_sequence=not faithful))  # fmt: skip
        out = engine.generate(ids(90, seed=7, batch=batch).tolist(), NEW, policy)
        assert (engine.monitor is not None) == device_decisions
        refs = policy.trigger.references(sorted(policy.trigger._reference))
        runs.append((out, engine.executor.recalls, engine.executor.recalled_rows, policy.recalls, refs, engine))
    (a, *ra, ref_a, _), (b, *rb, ref_b, engine) = runs
    assert engine.monitor.decisions == NEW // 5
    assert ra == rb
    if tau > 0.5:
        assert ra[0] > 0 and engine.monitor.fires > 0  # the comparison covered recalls
    else:
        assert ra[0] == 0
    assert torch.equal(torch.sort(ref_a).values, torch.sort(ref_b).values)
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.logits, b.logits, atol=1e-5)


def test_device_decisions_errors_and_fallback(model):
    def policy(engine, **kw):
        return HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6, **kw)

    engine = engine_of(model, device_decisions=True)
    with pytest.raises(ValueError, match="differ in length"):
        engine.generate([ids(90, 1)[0].tolist(), ids(70, 2)[0].tolist()], 4, policy(engine))
    with pytest.raises(ValueError, match="offers no WindowPlan"):
        engine.generate(ids(90, 1).tolist(), 4, policy(engine, trigger=EveryN(n=5)))
    inline = Engine(model, EngineConfig(max_seq_len=256, page_size=8, observe="inline", device_decisions=True))
    with pytest.raises(ValueError, match="inline"):
        inline.generate(ids(90, 1).tolist(), 4, policy(inline))
    per_step = engine_of(model, device_decisions=True, batch_observations=False)
    with pytest.raises(ValueError, match="observations come every 1 steps"):
        per_step.generate(ids(90, 1).tolist(), 4, policy(per_step))
    hooked = engine_of(model, device_decisions=True)
    hooked.query_hook = lambda layer, step, queries: queries
    with pytest.raises(ValueError, match="query_hook"):
        hooked.generate(ids(90, 1).tolist(), 4, policy(hooked))
    auto = engine_of(model)  # None: the policy scores where the engine cannot
    auto.generate([ids(90, 1)[0].tolist(), ids(70, 2)[0].tolist()], 4, policy(auto))
    assert auto.monitor is None
    auto.generate(ids(90, 1).tolist(), 4, policy(auto))
    assert auto.monitor is not None


@pytest.mark.parametrize("kernel", ["torch"])
def test_tap_holds_the_dense_logits(kernel):
    """The tap's logits are q.k * scale * log2 e of the tapped heads' first ``prompt``
    entries, at the ring slot; its tile sums give the softmax normaliser."""
    gen = torch.Generator().manual_seed(0)
    b, h_kv, g, d, page, n, prompt = 2, 3, 2, 16, 4, 40, 33
    pages = b * h_kv * (n // page)
    kv = torch.randn((pages + 2) * page, 2, d, generator=gen)
    table = torch.randperm(pages + 2, generator=gen)[:pages].view(b, h_kv, n // page)
    lengths = torch.full((b, h_kv), n)
    q = torch.randn(b, h_kv * g, d, generator=gen)
    logits = torch.full((3, 2, b, g, prompt), float("nan"))
    stats = torch.full((3, 2, b, g, -(-prompt // 8), 2), float("nan"))
    heads = torch.tensor([-1, 1, 0], dtype=torch.int32)
    tap = Tap(heads=heads, pairs=((1, 1), (0, 2)), logits=logits, stats=stats, slot=torch.tensor([2]), prompt=prompt,
              tile=8)  # fmt: skip
    paged_decode(q, kv[:, 0], kv[:, 1], table, lengths, page, 0.25, max_length=n, kernel=kernel, tap=tap)
    assert logits[:2].isnan().all()
    for p, h in ((1, 1), (0, 2)):
        rows = (table[:, h, :, None] * page + torch.arange(page)).flatten(1)[:, :prompt]  # [B, prompt]
        dense = torch.einsum("bgd,bld->bgl", q.view(b, h_kv, g, d)[:, h], kv[rows, 0]) * 0.25 * math.log2(math.e)
        torch.testing.assert_close(logits[2, p], dense)
        top = stats[2, p, ..., 0].amax(-1)
        total = (stats[2, p, ..., 1] * torch.exp2(stats[2, p, ..., 0] - top[..., None])).sum(-1)
        torch.testing.assert_close(total, torch.exp2(dense - top[..., None]).sum(-1))


INTERPRETER_SCRIPT = r"""
import json, torch
from engine_helpers import random_paged
from hcpolicy.kernels.ragged_decode import DecodeConfig
from hcpolicy.kernels.window_scores import window_scores_reference, softmax_sums
from hcpolicy.kernels._window_scores_triton import overlap_counts_triton, softmax_shift_triton, window_scores_triton
from hcpolicy.kernels._select_triton import kth_largest_triton
from hcpolicy.kernels._paged_decode_triton import paged_decode_triton
from hcpolicy.kernels.paged_decode import Tap, paged_decode_torch
gen = torch.Generator().manual_seed(0)
lengths, page, g, d, prompt = [[70, 50, 64], [70, 3, 66]], 8, 2, 16, 61
kv, table, lens, _, _ = random_paged(lengths, d, page, torch.float32, gen)
q = torch.randn(2, 3 * g, d, generator=gen)
taps = []
for _ in range(2):
    logits = torch.full((2, 2, 2, g, prompt), float("nan"))
    stats = torch.full((2, 2, 2, g, -(-prompt // 16), 2), float("nan"))
    taps.append(Tap(heads=torch.tensor([1, -1, 0], dtype=torch.int32), pairs=((1, 0), (0, 2)), logits=logits,
                    stats=stats, slot=torch.tensor([1]), prompt=prompt, tile=16))
cfg = DecodeConfig(block_n=16, min_chunk=32, programs_per_sm=1)
shift = lambda stats: (lambda top, total: top + torch.log2(total))(*softmax_sums(stats))  # log2 of the normaliser
out = paged_decode_triton(q, kv[:, 0], kv[:, 1], table, lens, page, d ** -0.5, 70, cfg, tap=taps[0])
ref = paged_decode_torch(q, kv[:, 0], kv[:, 1], table, lens, page, d ** -0.5, 70, tap=taps[1])
res = dict(out=float((out - ref).abs().max()), untouched=bool(taps[0].logits[0].isnan().all()),
           logits=float((taps[0].logits[1] - taps[1].logits[1]).abs().max()),
           stats=float((shift(taps[0].stats[1]) - shift(taps[1].stats[1])).abs().max()))
logits = torch.randn(5, 4, 300, generator=gen) * 4
tiles = torch.nn.functional.pad(logits, (0, 4), value=float("-inf")).unflatten(-1, (19, 16))
top = tiles.amax(-1)
stats = torch.stack([top, torch.exp2(tiles - top[..., None]).sum(-1)], -1)
for reduce, name in enumerate(("max", "mean", "sum")):
    want = window_scores_reference(logits, stats, name, 5)
    got = torch.empty(5, 300)
    m, s = softmax_sums(stats)
    window_scores_triton(logits, (m + torch.log2(s)).contiguous(), reduce, 5, got, block=128)
    res[name] = float(((got - want).abs() / want.abs()).max())
    window_scores_triton(logits, (m + torch.log2(s)).contiguous(), reduce, 5, got, block=128, two_pass=True)
    res[name + "_two_pass"] = float(((got - want).abs() / want.abs()).max())
hist = torch.zeros(5, 256, dtype=torch.int32)
got = torch.empty(5, 300)
window_scores_triton(logits, (m + torch.log2(s)).contiguous(), 0, 5, got, block=128, hist=hist)
tops = (got.view(torch.int32) & 0x7FFFFFFF) >> 24
res["hist_equal"] = bool(torch.equal(hist, torch.stack([torch.bincount(t, minlength=256) for t in tops]).int()))
fused = kth_largest_triton(got, 100, block=256, top_histogram=hist)
plain = kth_largest_triton(got, 100, block=256)
res["shift"] = float((softmax_shift_triton(stats) - (m + torch.log2(s))).abs().max())
res["select_equal"] = bool(torch.equal(fused.values, plain.values) and torch.equal(fused.ties, plain.ties))
scores = torch.randint(0, 50, (6, 700), generator=gen).float()
thresholds = torch.tensor([10.0, 25, 0, 49, 30, 20])
masks = torch.rand(3, 700, generator=gen) < 0.4
got = overlap_counts_triton(scores, thresholds, masks, block=256).long()
member = masks.repeat(2, 1)
t = thresholds[:, None]
want = torch.stack([((scores > t) & member).sum(-1), ((scores == t) & member).sum(-1)], -1)
res["counts_equal"] = bool(torch.equal(got, want))
print("RESULTS " + json.dumps(res))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_triton_tap_and_window_scores_under_interpreter():
    """The Triton decode kernel's tap equals the torch path's (logits, and the softmax
    normaliser its tile sums give; only the ring slot written); the Triton window-scores
    and overlap-count kernels equal the torch ops."""
    res = run_interpreted(INTERPRETER_SCRIPT, timeout=300)
    assert res["out"] < 1e-5 and res["untouched"], res
    assert res["logits"] < 1e-5 and res["stats"] < 1e-5, res
    assert max(res[n + t] for n in ("max", "mean", "sum") for t in ("", "_two_pass")) < 1e-5, res
    assert res["counts_equal"], res
    # the select's first pass, fused into the scores kernel
    assert res["hist_equal"] and res["select_equal"] and res["shift"] < 1e-5, res
