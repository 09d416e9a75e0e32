"""Async recalls (``recall_landing='async'``): Recall actions of many layers go out as one
batch with no host read, land later from pinned facts, and report bad actions when they
land; with a DeviceMonitor a decision is acted on over the next steps, a share of the
fired pivots each, and each share's recalls go out in the step after."""

import importlib.util

import numpy as np
import pytest
import torch

from engine_helpers import run_interpreted, small_engine, small_llama, synthetic_profile, token_ids as ids
from hcpolicy.actions import ActionError, Recall, Selection
from hcpolicy.drift import WindowedOverlap
from hcpolicy.policy.heterocache import HeteroCachePolicy

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_llama(tmp_path_factory.mktemp("llama"))


def prefilled(model, landing: str, length: int = 90, batch: int = 1, **options):
    """A prefilled engine; actions applied outside ``decode`` need ``async_recall_step_bytes=None``
    (whole gathers at once: a paced gather goes out after decode steps)."""
    engine = small_engine(model, observe="deferred", recall_landing=landing, **options)
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6,
                               trigger=WindowedOverlap(tau=0.9))  # fmt: skip
    engine.prefill(ids(length, seed=3, batch=batch), policy, max_new_tokens=10)
    return engine


def recalls_of_every_layer(engine, seed: int) -> list[Recall]:
    """Each layer's satellites (heads 1, 2) take a random ascending subset of the prompt."""
    gen = torch.Generator().manual_seed(seed)
    actions = []
    for layer in range(engine.mc.num_layers):
        b = engine.batch
        picks = [[torch.sort(torch.randperm(engine.prompt_length, generator=gen)[:30 + 5 * h]).values
                  for h in range(2)] for _ in range(b)]  # fmt: skip
        indices = torch.zeros(b, 2, 40, dtype=torch.int64)
        lengths = torch.zeros(b, 2, dtype=torch.int64)
        for i in range(b):
            for h in range(2):
                indices[i, h, : picks[i][h].numel()] = picks[i][h]
                lengths[i, h] = picks[i][h].numel()
        actions.append(Recall(layer=layer, heads=(1, 2), selection=Selection(indices=indices, lengths=lengths)))
    return actions


def device_kv(engine):
    return [engine.kv.entries_view(layer) for layer in range(engine.mc.num_layers)]


@pytest.mark.parametrize("batch", [1, 2])
def test_one_batch_lands_what_in_place_recalls_write(model, batch):
    """The same Recall actions, as one async batch over every layer or in place one by
    one: the same entries (keys, values, positions) and the same row counts."""
    runs = []
    for landing in ("next_step", "async"):
        engine = prefilled(model, landing, batch=batch, async_recall_step_bytes=None)
        tok = torch.full((batch,), 5)
        engine.decode(tok)  # a generated token sits behind the recalled entries
        h2d0 = engine.runtime.counters().h2d_bytes
        engine.executor.apply(recalls_of_every_layer(engine, seed=1))
        if landing == "async":
            rec = engine.executor.recaller
            assert len(rec.inflight) == engine.mc.num_layers * batch * 2 and rec.landed == 0
            assert rec.land_ready() == engine.mc.num_layers * batch * 2  # CPU copies are done when issued
            assert not rec.inflight and rec.landed == engine.mc.num_layers * batch * 2
        exe = engine.executor
        row_bytes = 2 * engine.mc.head_dim * engine.kv.kv.element_size()
        assert engine.runtime.counters().h2d_bytes - h2d0 == exe.recalled_rows * row_bytes
        runs.append((device_kv(engine), exe.recalled_rows + exe.moved_rows, dict(exe.resident),
                     engine.kv.host_lengths.clone()))  # fmt: skip
    (kv_a, rows_a, res_a, len_a), (kv_b, rows_b, res_b, len_b) = runs
    assert rows_a == rows_b and res_a == res_b and torch.equal(len_a, len_b)
    for a, b, lengths in zip(kv_a, kv_b, len_a):
        for i in range(lengths.shape[0]):
            for h in range(lengths.shape[1]):
                n = int(lengths[i, h])
                assert all(torch.equal(x[i, h, :n], y[i, h, :n]) for x, y in zip(a, b))


def test_a_recall_replaces_one_in_flight(model):
    """A second recall of heads still in flight replaces the first without waiting for it:
    the heads end with the second selection, as in place, and every page comes back."""
    runs = []
    for landing in ("next_step", "async"):
        engine = prefilled(model, landing, async_recall_step_bytes=None)
        engine.executor.apply(recalls_of_every_layer(engine, seed=1))
        engine.executor.apply(recalls_of_every_layer(engine, seed=2))
        if landing == "async":
            rec = engine.executor.recaller
            assert len(rec.async_._retired) == engine.mc.num_layers * 2  # the first batch, replaced
            rec.land_ready()
            assert not rec.async_._retired and not rec.inflight
        runs.append((device_kv(engine), engine.kv.host_lengths.clone()))
        engine.release()
        assert engine.kv.allocator.free_pages == engine.kv.allocator.num_pages  # nothing leaked
    (kv_a, len_a), (kv_b, len_b) = runs
    assert torch.equal(len_a, len_b)
    for a, b, lengths in zip(kv_a, kv_b, len_a):
        for h in range(lengths.shape[1]):
            n = int(lengths[0, h])
            assert all(torch.equal(x[0, h, :n], y[0, h, :n]) for x, y in zip(a, b))


def test_a_bad_recall_raises_when_it_lands(model):
    engine = prefilled(model, "async", async_recall_step_bytes=None)
    free = engine.kv.allocator.free_pages
    before = device_kv(engine)
    actions = recalls_of_every_layer(engine, seed=2)
    actions[1].selection.indices[0, 0, 0] = engine.prompt_length + 3  # never offloaded
    engine.executor.apply(actions)  # nothing read on the host: no error yet
    with pytest.raises(ActionError, match="never offloaded.*when its batch landed"):
        engine.executor.recaller.land_ready()
    assert not engine.executor.recaller.inflight and engine.kv.allocator.free_pages == free
    for (k0, v0, p0), (k1, v1, p1) in zip(before, device_kv(engine)):  # every head kept its selection
        assert torch.equal(k0, k1) and torch.equal(v0, v1) and torch.equal(p0, p1)


def test_an_in_place_recall_of_a_position_never_offloaded_raises(model):
    """As the async path refuses it when it lands, the in-place path refuses it at once: no
    entry takes the K/V of the nearest offloaded row, and every head keeps its selection."""
    engine = prefilled(model, "next_step", length=100)
    before = device_kv(engine)
    sel = Selection(indices=torch.tensor([[[3, 10, 150]]]), lengths=torch.tensor([[3]]))  # 150: past the prompt
    with pytest.raises(ActionError, match="never offloaded"):
        engine.executor.apply([Recall(layer=1, heads=(1,), selection=sel)])
    assert engine.executor.recalled_rows == 0
    for (k0, v0, p0), (k1, v1, p1) in zip(before, device_kv(engine)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1) and torch.equal(p0, p1)


def test_device_decisions_act_during_the_next_steps(model):
    """With a DeviceMonitor and async recalls the window decided after step s is acted on
    a share of the fired pivots per step from s + 1 on (spread over the steps before the
    next decision), each share's recalls going out in the step after: the same recalls as
    acting at once, issued later."""
    runs = {}
    for landing in ("next_step", "async"):
        engine = prefilled(model, landing)
        assert engine.monitor is not None
        tok, seen = torch.tensor([4]), []
        for _ in range(9):  # step 4 decides (2 pivots fire); async: one acted on at 5 and 6
            tok = engine.decode(tok).argmax(-1)
            exe = engine.executor
            seen.append((exe.recalls, exe.recalled_rows + exe.moved_rows, engine.monitor.pending))
        runs[landing] = seen
    now, later = runs["next_step"], runs["async"]
    assert now[4][0] == 2 and now[3][0] == 0  # both pivots fired after step 4: recalled at once
    assert [x[0] for x in later[4:8]] == [0, 0, 1, 2]  # issued during steps 6 and 7
    assert later[5][2] and not later[6][2]  # one pivot still to act on after step 5
    assert later[8][1] == now[4][1]  # everything landed by step 8: the same rows


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_recall_kernels_interpreted_equal_torch():
    script = r"""
import json, torch
from hcpolicy.backends.torch_engine._recall_triton import plan_rows_triton, recall_rows_triton
from hcpolicy.backends.torch_engine.recall_plan import plan_rows_torch
gen = torch.Generator().manual_seed(0)
page, pages, span, m = 4, 40, 60, 3

def case(bad):
    # three heads: each holds some positions on its own pages and offloaded others to the host
    positions = torch.full(((pages + 1) * page,), -7, dtype=torch.int64)
    perm = torch.randperm(pages, generator=gen)
    table = torch.zeros(m, 8, dtype=torch.int64)
    fresh = perm[24 : 24 + m * 5].view(m, 5)
    row_of = torch.full((m + 1, span + 1), -1, dtype=torch.int32)
    held, want, n = [], torch.zeros(m, 18, dtype=torch.int64), torch.tensor([18, 11, 0])
    for i in range(m):
        table[i, :6] = perm[6 * i : 6 * i + 6]
        offloaded = torch.randperm(span, generator=gen)[:30].sort().values  # the host has every position
        row_of[i + 1, offloaded] = torch.arange(30, dtype=torch.int32)
        mine = offloaded[torch.randperm(30, generator=gen)[:22]].sort().values  # some of them on the device too
        held.append(int(torch.randint(3, 22, (), generator=gen)))
        for e in range(held[-1]):
            positions[table[i, e // page] * page + e % page] = mine[e]
        pick = offloaded[torch.randperm(30, generator=gen)[: int(n[i])]].sort().values
        want[i, : pick.numel()] = pick
    if bad == "missing":
        want[1, 3] = span + 5
    if bad == "order":
        want[0, 4] = want[0, 2]
    cap = torch.tensor([18, 11 if bad != "room" else 9, 4])
    return want, n, torch.tensor(held), cap, torch.tensor([1, 2, 3]), row_of, table, fresh, positions

out = {}
for bad in ["none", "missing", "order", "room"]:
    args = case(bad)
    ref_pos, tri_pos = args[-1].clone(), args[-1].clone()
    ref = plan_rows_torch(*args[:-1], ref_pos, page, 22)
    tri = plan_rows_triton(*args[:-1], tri_pos, page, 22)
    take = ref["dst"] >= 0
    out[bad] = {
        "dst": torch.equal(ref["dst"], tri["dst"]), "pool_src": torch.equal(ref["pool_src"], tri["pool_src"]),
        "host_rows": torch.equal(ref["host_rows"][take], tri["host_rows"][take]),
        "positions": torch.equal(ref_pos[:-page], tri_pos[:-page]), "facts": tri["facts"].tolist(),
        "ref_facts": ref["facts"].tolist(), "held": int((ref["pool_src"] >= 0).sum()),
    }

row = 16
pool = torch.randint(-2**31, 2**31 - 1, (40 * row,), generator=gen, dtype=torch.int32)
host = torch.randint(-2**31, 2**31 - 1, (40 * row,), generator=gen, dtype=torch.int32)
dst = torch.cat([torch.arange(20, 35), torch.full((5,), -1)]).view(4, 5)  # rows 20.. written, 5 entries skipped
pool_src = torch.where(torch.arange(20) % 3 == 0, torch.arange(20) % 20, -1).view(4, 5)  # held rows: below 20
host_rows = torch.randint(0, 10, (4, 5), generator=gen)
starts = torch.tensor([0, 10, 20, 30]) * row  # head i's host rows start at row 10 i
want = pool.clone().view(-1, row)
for i in range(20):
    d, p, h = int(dst.flatten()[i]), int(pool_src.flatten()[i]), int(host_rows.flatten()[i]) + 10 * (i // 5)
    if d >= 0:
        want[d] = want[p] if p >= 0 else host.view(-1, row)[h]
recall_rows_triton(pool, host, dst.flatten(), pool_src.flatten(), host_rows.flatten(), starts, 5, row, ctas=3,
                   tile_words=64)
out["copy"] = bool(torch.equal(pool.view(-1, row), want))
print("RESULTS " + json.dumps(out))
"""
    res = run_interpreted(script, timeout=240)
    assert res.pop("copy")
    for bad, r in res.items():
        assert r["dst"] and r["pool_src"] and r["host_rows"] and r["positions"], bad
        assert r["facts"] == r["ref_facts"], bad
        assert r["facts"][-1] == (bad != "none"), bad
    assert res["none"]["held"] > 0 and sum(res["none"]["facts"][3:6]) > 0  # both kinds of row occur


def paced(model, step_rows: int | None, **options):
    """An async engine whose monitor never fires (tau 0), its gathers sent ``step_rows``
    entries per decode step (None: whole batches), one token decoded."""
    engine = small_engine(model, observe="deferred", recall_landing="async", async_recall_step_bytes=(
        None if step_rows is None else step_rows * 2 * model.config.head_dim * 4), **options)  # float32 rows  # fmt: skip
    policy = HeteroCachePolicy(profile=synthetic_profile(engine.spec), compression=0.6,
                               trigger=WindowedOverlap(tau=0.0))  # fmt: skip
    engine.prefill(ids(90, seed=3), policy, max_new_tokens=40)
    engine.decode(torch.tensor([5]))
    return engine


def recalled_entries(engine):
    """Each offloaded head's recalled entries (keys, values, positions), tails left out."""
    out = {}
    for (layer, b, h), n in engine.executor.resident.items():
        k, v, p = engine.kv.entries_view(layer, [h])
        out[(layer, b, h)] = (k[b, 0, :n], v[b, 0, :n], p[b, 0, :n])
    return out


def unpaced_reference(model, seed: int):
    """An engine that recalled ``recalls_of_every_layer(seed)`` as one whole batch, landed."""
    whole = paced(model, None)
    whole.executor.apply(recalls_of_every_layer(whole, seed=seed))
    assert whole.executor.recaller.land_ready() > 0 and not whole.executor.recaller.inflight
    return whole


def assert_same_recalled(reference, engine) -> None:
    a, b = recalled_entries(reference), recalled_entries(engine)
    assert a.keys() == b.keys()
    for key in a:
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key


def test_paced_gathers_send_a_share_per_step_and_none_in_decision_steps(model):
    """With ``async_recall_step_bytes`` a batch's gather goes out that many rows at a time,
    one share after each decode step is enqueued (to run under the next), none before a
    step that ends with a decision; it lands once all is sent and done, with the entries of
    an unpaced batch."""
    whole = unpaced_reference(model, seed=1)
    step_rows = 16
    engine = paced(model, step_rows)
    rec = engine.executor.recaller
    engine.executor.apply(recalls_of_every_layer(engine, seed=1))
    (batch,) = rec.async_._queue
    rows = int(batch.valid.sum())
    assert batch.sent == 0 and rows > 4 * step_rows and batch.total >= rows  # rows: the heads known lengths
    assert rec.land_ready() == 0 and len(rec.inflight) == 2 * engine.mc.num_layers
    tok, sends, quiet = torch.tensor([6]), 0, 0
    while batch.queued:
        before, decision = batch.sent, engine.observer.due(engine.step + 1)
        tok = engine.decode(tok).argmax(-1)
        assert (batch.sent == before) == decision, (engine.step, before, batch.sent)
        sends, quiet = sends + (not decision), quiet + decision
        assert sends + quiet < 40
    assert quiet >= 1 and sends == -(-rows // step_rows)
    assert rec.inflight  # the last share runs under the next step, which lands it
    engine.decode(tok)
    assert not rec.inflight and rec.landed == whole.executor.recaller.landed
    assert_same_recalled(whole, engine)


def test_a_replaced_batch_stops_sending(model):
    """A batch all of whose heads a newer recall replaced sends no more of its gather; its
    pages come back once what it sent is done, and the heads end with the newer selection."""
    whole = unpaced_reference(model, seed=2)
    engine = paced(model, 16)
    rec = engine.executor.recaller
    engine.executor.apply(recalls_of_every_layer(engine, seed=1))
    (first,) = rec.async_._queue
    engine.executor.apply(recalls_of_every_layer(engine, seed=2))  # replaces every head of the first
    tok = torch.tensor([6])
    for _ in range(30):
        tok = engine.decode(tok).argmax(-1)
        if not rec.inflight:
            break
    assert first.total == first.sent == 0  # replaced before any of it went out
    assert not rec.inflight and not rec.async_._retired and not rec.async_._queue
    assert_same_recalled(whole, engine)
    engine.release()
    assert engine.kv.allocator.free_pages == engine.kv.allocator.num_pages


def test_land_all_sends_what_is_queued_and_lands_it(model):
    whole = unpaced_reference(model, seed=1)
    engine = paced(model, 16)
    rec = engine.executor.recaller
    engine.executor.apply(recalls_of_every_layer(engine, seed=1))
    assert rec.async_._queue and rec.land_ready() == 0
    rec.land_all()
    assert not rec.inflight and not rec.async_._queue and rec.landed == whole.executor.recaller.landed
    assert_same_recalled(whole, engine)


def test_past_rows_counts_only_the_rows_each_head_moves():
    from hcpolicy.backends.torch_engine.async_recall import _past_rows

    valid, k = np.array([3, 0, 5, 2]), 6  # heads of 6 entries: rows at 0-2, 12-16, 18-19
    rows_at = [0, 1, 2, 12, 13, 14, 15, 16, 18, 19]
    for start in range(0, 25):
        for rows in range(1, 12):
            end, got = _past_rows(valid, k, start, rows)
            left = [e for e in rows_at if e >= start]
            assert got == min(rows, len(left))
            assert [e for e in rows_at if start <= e < end] == left[:got], (start, rows, end)


def test_a_batch_replaced_while_pages_run_short_is_not_sent_to_free_them(model):
    """When a new recall replaces every head of a queued batch and the in-flight bound says
    there is no room, the replaced batch's pages come back without its gather being sent."""
    probe = paced(model, 16)
    alloc = probe.kv.allocator
    free = alloc.free_pages
    probe.executor.apply(recalls_of_every_layer(probe, seed=1))
    batch = free - alloc.free_pages
    engine = paced(model, 16, num_pages=alloc.num_pages - free + batch + batch // 2)  # room for 1.5 batches
    rec = engine.executor.recaller
    engine.executor.apply(recalls_of_every_layer(engine, seed=1))
    (first,) = rec.async_._queue
    engine.executor.apply(recalls_of_every_layer(engine, seed=2))
    assert first.sent == first.total == 0  # nothing of it was sent to make room
    (second,) = rec.async_._queue
    assert second is not first and len(rec.inflight) == 2 * engine.mc.num_layers
    rec.async_.reap()
    assert not rec.async_._retired  # every page of the replaced batch is back
