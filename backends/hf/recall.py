"""Recall in the HF backend: recalled rows land in the slots of the offloaded rows a head holds.

A head's device segment starts with the rows it keeps from its offloaded range (the
layer's ``host_resident`` of them, ascending by position), then the tokens generated
since. A Recall names a new set of the same size, so the new rows land in those same
slots: nothing is reallocated and no length changes.

Hot path: a fixed handful of device ops per Recall, whatever the number of heads, and one
host read (which heads changed, how many rows each needs from the host, whether the action
is valid). Sizes come from the host mirror of the resident counts; the layout facts
(slots, offloaded positions, masks) are built once per layout and cached (``RecallPlan``).
The host-to-device gather runs on the transfer runtime's copy stream; the compute stream
waits for it with an event, the host never does. With ``reuse_resident`` (the cache's
default) the rows a head already holds move on the device and only the others cross PCIe
(into a landing buffer, scattered into place after the copy); either way the same bytes
land in the same slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
import torch.nn.functional as F

from hcpolicy.actions import ActionError, Recall

if TYPE_CHECKING:
    from .cache import HeadwiseLayer
    from .storage import RaggedKV

_BIG = torch.iinfo(torch.int64).max


@attrs.frozen(eq=False)
class RecallPlan:
    """One layer's recall layout for ``heads``, fixed while offloads and lengths are."""

    counts: list[list[int]]  # [B][H'] resident offloaded rows (host)
    width: int  # max(1, max count): the padded width W
    host_pos: torch.Tensor  # [B, H', N] offloaded positions, ascending, padded with int64 max
    slots: torch.Tensor  # [B, H', W] storage row of each entry (clamped into the segment)
    valid: torch.Tensor  # [B, H', W] entry < count
    resident: torch.Tensor  # [B, H'] int64, the counts on the device
    entries: torch.Tensor  # [R] flat [B, H', W] index of every valid entry
    entry_slots: torch.Tensor  # [R] their storage rows


def plan_key(layer: "HeadwiseLayer", store: "RaggedKV", heads: tuple[int, ...]) -> tuple:
    pairs = [(b, h) for b in range(store.batch_size) for h in heads]
    return heads, tuple(store.host_starts[b][h] for b, h in pairs), tuple(layer.host_resident[p] for p in pairs)


def build_plan(layer: "HeadwiseLayer", store: "RaggedKV", heads: tuple[int, ...]) -> RecallPlan:
    """The cached layout facts (one host read, for the valid entries' index)."""
    batch = store.batch_size
    device = store.positions.device
    counts = [[layer.host_resident[(b, h)] for h in heads] for b in range(batch)]
    width = max(1, max(map(max, counts)))
    host_pos = _stack_padded([[layer.host_positions[(b, h)] for h in heads] for b in range(batch)])
    for b in range(batch):  # keep one copy of the offloaded positions: views of the stack
        for i, h in enumerate(heads):
            layer.host_positions[(b, h)] = host_pos[b, i, : layer.host_positions[(b, h)].shape[0]]
    starts = torch.tensor([[store.host_starts[b][h] for h in heads] for b in range(batch)], device=device)
    resident = torch.tensor(counts, dtype=torch.int64, device=device)  # [B, H']
    k = torch.arange(width, device=device)
    valid = k < resident.unsqueeze(-1)  # [B, H', W]
    slots = starts.unsqueeze(-1) + torch.minimum(k, (resident - 1).clamp(min=0).unsqueeze(-1))  # [B, H', W]
    entries = valid.flatten().nonzero().flatten()  # [R]; a host read, once per layout
    return RecallPlan(counts, width, host_pos, slots, valid, resident, entries, slots.flatten()[entries])


def recall(layer: "HeadwiseLayer", action: Recall) -> None:
    """Execute ``action`` on ``layer`` (see the module docstring)."""
    store = layer._make_ragged()
    heads = tuple(action.heads)
    for b in range(store.batch_size):
        for h in heads:
            if (b, h) not in layer.host_positions:
                raise ActionError(f"layer {layer.index} head {h}: Recall without an earlier Offload")
    key = plan_key(layer, store, heads)
    plan = layer.recall_plans.get(heads)
    if plan is None or plan[0] != key:
        plan = layer.recall_plans[heads] = (key, build_plan(layer, store, heads))
    plan = plan[1]
    sel = action.selection
    if sel.indices.shape[2] < max(map(max, plan.counts)):
        _raise_lengths(layer, heads, plan, sel.lengths.tolist())  # cold path: the read is fine
        raise ActionError(f"layer {layer.index}: Recall lengths exceed its selection's width")
    device = store.positions.device
    want = sel.indices[..., : plan.width]
    if want.shape[2] < plan.width:
        # a plan is at least one entry wide; a selection only as wide as its lengths, so
        # width 0 where no head holds an offloaded row (budgets of 0 tokens): pad it
        want = F.pad(want, (0, plan.width - want.shape[2]))
    want = want.to(device).contiguous()  # [B, H', W]
    rows = torch.searchsorted(plan.host_pos, want).clamp_(max=plan.host_pos.shape[2] - 1)  # [B, H', W]
    now = store.positions[plan.slots]  # [B, H', W] what the slots hold
    differ = (torch.stack((now, plan.host_pos.gather(2, rows))) != want) & plan.valid  # [2, B, H', W]
    reuse = layer.owner.reuse_resident
    facts = [differ.any(-1).flatten(), (sel.lengths.to(device) != plan.resident).flatten()]
    if reuse:
        at, need = _resident_hits(now, want, plan)  # [B, H', W] each
        facts.append(need.sum(-1).flatten())  # rows each head needs from the host
    flags = torch.cat([f.to(torch.int64) for f in facts]).tolist()  # the one host read
    n = len(heads) * store.batch_size
    changed, missing, wrong = flags[:n], flags[n : 2 * n], flags[2 * n : 3 * n]
    if any(wrong):
        _raise_lengths(layer, heads, plan, sel.lengths.tolist())
    if any(missing):
        raise ActionError(f"layer {layer.index}: Recall names positions that were never offloaded")
    if not any(changed):
        return
    flat_want = want.reshape(-1)[plan.entries]  # [R]
    if reuse:
        _land_with_reuse(layer, store, heads, plan, changed, flags[3 * n :], rows, at, need)
    else:
        _land_from_host(layer, store, heads, plan, changed, rows)
    store.positions[plan.entry_slots] = flat_want  # unchanged heads get the positions they hold
    owner = layer.owner
    owner.recalls += 1
    for b in {j // len(heads) for j, c in enumerate(changed) if c}:
        owner.sequence_recalls[b] = owner.sequence_recalls.get(b, 0) + 1


def _land_from_host(layer: "HeadwiseLayer", store: "RaggedKV", heads: tuple[int, ...], plan: RecallPlan,
                    changed: list[int], rows: torch.Tensor) -> None:
    """Every row of a changed head comes from the host, straight into its slot."""
    requests = []
    for j, (b, i, h) in enumerate(_pairs(store.batch_size, heads)):
        if changed[j]:
            start, count = store.host_starts[b][h], plan.counts[b][i]
            key = (layer.owner.cache_id, layer.index, b, h)
            requests.append((key, rows[b, i, :count], store.kv[start : start + count]))  # [n], [n, 2, D]
    runtime = layer.owner.runtime
    runtime.wait(runtime.recall_many(requests))


def _resident_hits(now: torch.Tensor, want: torch.Tensor, plan: RecallPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each wanted position sits among the resident rows (entry [B, H', W]), and
    which valid entries are not resident (need the host)."""
    held = now.masked_fill(~plan.valid, _BIG)  # [B, H', W] ascending per head
    at = torch.searchsorted(held, want).clamp_(max=plan.width - 1)  # [B, H', W]
    return at, (held.gather(2, at) != want) & plan.valid


def _land_with_reuse(layer: "HeadwiseLayer", store: "RaggedKV", heads: tuple[int, ...], plan: RecallPlan,
                     changed: list[int], misses: list[int], rows: torch.Tensor, at: torch.Tensor,
                     need: torch.Tensor) -> None:
    """Rows a head already holds move on the device; only the others cross PCIe, into a
    landing buffer that is scattered into place once the copy stream is done."""
    starts = plan.slots[..., :1]  # [B, H', 1] first slot of each segment
    source = (starts + at).reshape(-1)[plan.entries]  # [R] storage row now holding the wanted position
    store.kv[plan.entry_slots] = store.kv[source]  # a gathered copy first, so overlaps are safe
    total = sum(misses)
    if total == 0:
        return
    # entries needing the host first, in (sequence, head, entry) order: a one-byte sort key
    order = torch.argsort((~need).reshape(-1).to(torch.uint8), stable=True)[:total]  # [M]
    host_rows = rows.reshape(-1)[order]  # [M]
    landing = store.kv.new_empty((total, *store.kv.shape[1:]))  # [M, 2, D]
    requests, at_row = [], 0
    for j, (b, i, h) in enumerate(_pairs(store.batch_size, heads)):
        m = misses[j]
        if m and changed[j]:
            requests.append(((layer.owner.cache_id, layer.index, b, h), host_rows[at_row : at_row + m],
                             landing[at_row : at_row + m]))
        at_row += m
    runtime = layer.owner.runtime
    runtime.wait(runtime.recall_many(requests))
    store.kv[plan.slots.reshape(-1)[order]] = landing


def _pairs(batch: int, heads: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(b, i, h) in the flat [B, H'] order of the flags."""
    return [(b, i, h) for b in range(batch) for i, h in enumerate(heads)]


def _raise_lengths(layer: "HeadwiseLayer", heads: tuple[int, ...], plan: RecallPlan, lengths: list[list[int]]) -> None:
    for b, row in enumerate(lengths):
        for i, h in enumerate(heads):
            if row[i] != plan.counts[b][i]:
                raise ActionError(
                    f"layer {layer.index} head {h}: Recall of {row[i]} rows where {plan.counts[b][i]} offloaded "
                    "rows are resident; the hf backend recalls into the same slots"
                )


def _stack_padded(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """[B][H'] ascending 1-D position tensors -> [B, H', N] (shorter ones padded with int64
    max, so searchsorted over a row never lands in the padding for a real position)."""
    width = max(t.shape[0] for row in rows for t in row)
    flat = [t for row in rows for t in row]
    if all(t.shape[0] == width for t in flat):
        return torch.stack(flat).reshape(len(rows), len(rows[0]), width)
    return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0]), value=_BIG) for t in flat]).reshape(
        len(rows), len(rows[0]), width
    )
