"""Recall in the HF backend: the recalled rows are the offloaded bytes, in both landing modes
(every row from the host, or resident rows moved on the device), batched over sequences
and heads, with generated tokens left in place; invalid recalls fail before any write."""

import pytest
import torch

from hcpolicy.actions import ActionError, Offload, Recall, Select, Selection
from hcpolicy.backends.hf import HFBackend
from hcpolicy.backends.hf.compat import cache_kwarg
from hcpolicy.drift import EveryN
from hcpolicy.policy.heterocache import HeteroCachePolicy

from test_hf_exactness import prompt, synthetic_profile

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]  # fmt: skip


def selection(rows: list[list[list[int]]], device: str) -> Selection:
    """[B][H'] ascending position lists (same length per head across the batch) -> Selection."""
    width = max(len(r) for b in rows for r in b)
    indices = [[r + [0] * (width - len(r)) for r in b] for b in rows]
    lengths = [[len(r) for r in b] for b in rows]
    return Selection(indices=torch.tensor(indices, device=device), lengths=torch.tensor(lengths, device=device))


def offloaded_layer(llama, device: str, reuse: bool, keep: list[list[list[int]]]):
    """Layer 1 of a batch-2 prefill with heads 0 and 1 offloaded, then cut to ``keep``, and
    one generated token appended; returns (cache, layer, dense keys, dense values)."""
    model = llama.to(device)
    backend = HFBackend(model)
    cache = backend.new_cache(None, record_window=None, reuse_resident=reuse)
    with backend.attach():
        backend.forward(prompt(batch=2, length=40).to(device), cache)
    layer = cache.layers[1]
    dense_k, dense_v = layer.keys.clone(), layer.values.clone()
    layer.apply([Offload(layer=1, heads=(0, 1)), Select(layer=1, heads=(0, 1), selection=selection(keep, device))])
    new_k = torch.randn(2, 2, 1, 16, device=device)
    layer.update(new_k, torch.randn_like(new_k))
    return cache, layer, torch.cat([dense_k, new_k], 2), dense_v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reuse", [False, True])
def test_recall_lands_the_offloaded_rows(llama, device, reuse):
    keep = [[[1, 5, 9, 20], [0, 1, 2]], [[3, 4, 30, 39], [7, 8, 9]]]
    cache, layer, dense_k, dense_v = offloaded_layer(llama, device, reuse, keep)
    # seq 0 head 0 keeps two rows and fetches two, head 1 is unchanged; seq 1 changes both
    back = [[[1, 6, 20, 33], [0, 1, 2]], [[0, 4, 38, 39], [2, 8, 30]]]
    before = cache.runtime.counters().h2d_bytes
    layer.apply([Recall(layer=1, heads=(0, 1), selection=selection(back, device))])
    for b in range(2):
        for i, h in enumerate((0, 1)):
            view = layer.view([h])
            n = len(back[b][i])
            rows = layer.ragged.host_starts[b][h]
            stored = layer.ragged.kv[rows : rows + n + 1]  # [n + 1, 2, D]: the recalled rows, the new token
            assert layer.ragged.positions[rows : rows + n + 1].tolist() == back[b][i] + [40]
            assert torch.equal(stored[:n, 0], dense_k[b, h, back[b][i]])
            assert torch.equal(stored[:n, 1], dense_v[b, h, back[b][i]])
            assert torch.equal(stored[n, 0], dense_k[b, h, 40])  # the generated token stays
            assert view.lengths[b, 0].item() == n + 1
    moved = cache.runtime.counters().h2d_bytes - before
    # only changed heads move: all their rows (4 + 4 + 3), or only those they did not hold (2 + 2 + 2)
    assert moved == (6 if reuse else 11) * 2 * 16 * 4
    assert cache.recalls == 1 and cache.sequence_recalls == {0: 1, 1: 1}


@pytest.mark.parametrize("reuse", [False, True])
def test_an_unchanged_recall_moves_nothing(llama, reuse):
    keep = [[[1, 5], [0, 1]], [[3, 4], [7, 8]]]
    cache, layer, _, _ = offloaded_layer(llama, "cpu", reuse, keep)
    layer.apply([Recall(layer=1, heads=(0, 1), selection=selection(keep, "cpu"))])
    assert cache.runtime.counters().h2d_bytes == 0 and cache.recalls == 0


@pytest.mark.parametrize("reuse", [False, True])
def test_invalid_recalls_fail_before_any_write(llama, reuse):
    keep = [[[1, 5], [0, 1]], [[3, 4], [7, 8]]]
    cache, layer, _, _ = offloaded_layer(llama, "cpu", reuse, keep)
    positions = layer.ragged.positions.clone()
    with pytest.raises(ActionError, match="Recall of 3 rows where 2 offloaded rows are resident"):
        layer.apply([Recall(layer=1, heads=(0, 1), selection=selection(
            [[[1, 5, 6], [0, 1, 2]], [[3, 4, 5], [7, 8, 9]]], "cpu"))])  # fmt: skip
    with pytest.raises(ActionError, match="never offloaded"):
        layer.apply([Recall(layer=1, heads=(0, 1), selection=selection([[[1, 40], [0, 1]], [[3, 4], [7, 8]]], "cpu"))])
    assert torch.equal(layer.ragged.positions, positions) and cache.recalls == 0


@pytest.mark.parametrize("device", DEVICES)
def test_both_landing_modes_generate_the_same(llama, device):
    """HeteroCache recalling every other step: the same tokens and the same device KV bytes
    whether resident rows move on the device or come back from the host."""
    model = llama.to(device)
    ids = prompt(length=96).to(device)
    outs = []
    for reuse in (False, True):
        backend = HFBackend(model)
        policy = HeteroCachePolicy(profile=synthetic_profile(backend.spec), compression=0.7, trigger=EveryN(n=2))
        cache = backend.new_cache(policy, headroom=8, reuse_resident=reuse)
        with backend.attach():
            seq = model.generate(ids, **{cache_kwarg(model): cache}, max_new_tokens=8, do_sample=False)
        assert cache.recalls > 0
        outs.append((seq, [layer.ragged.kv.clone() for layer in cache.layers], cache.runtime.counters().h2d_bytes))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    assert outs[1][2] <= outs[0][2]
