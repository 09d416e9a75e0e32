"""PolicyAttnBackend: wraps one of SGLang's attention backends and applies a policy.

- extend (prefill): the wrapped backend computes the layer's attention densely and saves
  the prompt's KV; then the request's policy observes the layer (queries, and the KV
  through the request's ``req_to_token`` row) and its actions are executed by the
  request's ``RequestKV``, layer by layer, as in the HF backend. After the last layer a
  request whose policy acted moves its KV to head-major pages and gives SGLang back the
  slots it no longer needs (``RequestKV.finalize``);
- decode: requests whose policy never acted are served by the wrapped backend as they
  are (a keep-everything policy is SGLang's own output, bit for bit). Head-major requests
  are served by the paged split-K kernel (``hcpolicy.kernels.paged_decode``) over their
  pages: the wrapped backend sees them as one-token sequences (its rows are replaced),
  their new token's K/V goes to their pages, and SGLang's slot for it becomes theirs.

CUDA graphs (decode): a captured step runs both kernels over every row of the batch, each
row keeping its own output (``GraphState``); the host work (planning the new token's rows,
the page tables) runs before each replay. The policies' decode observations cannot run
inside a graph: the step keeps its queries, and the observations run before the next
step, so their actions take effect one step later than in an eager step.

Chunked prefill: the policy runs on a prompt's last chunk, over the whole prompt's KV (the
earlier chunks stay in the request's own slots: the tree does not take them).
``seq_lens`` are never touched for positions: they stay logical. Not supported, each with
a clear error: extending a request after its policy ran, mixed-chunk batches,
speculative decoding, CUDA graphs for a policy with per-step views (Attend).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
import torch

from hcpolicy.kernels.paged_decode import paged_decode
from hcpolicy.observe import Observation, Phase
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from .head_pages import row_views, stack_tables
from .store import PolicyStore, TrackedRequest


@attrs.define
class PagedStep:
    """One decode step's head-major requests: batch index [B'] and ``tracked``; where each
    (layer, request, head)'s new K/V goes, ``writes [N, B', H]`` (rows of the layer's row
    views); the tables [N, B', H, M] and lengths [N, B', H] the kernel reads; ``loc``:
    SGLang's write slots with those requests' redirected to the padding slot 0."""

    index: torch.Tensor
    tracked: tuple[TrackedRequest, ...]
    writes: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor
    max_length: int
    loc: torch.Tensor


@attrs.define
class GraphState:
    """Static buffers of decode steps under SGLang's CUDA graphs (one set for every captured
    batch size, rows [0, bs) used): a captured step runs the paged kernel over every row,
    with length 0 for rows SGLang's own kernel serves, and keeps each row's output from the
    right kernel. ``queries`` keep every layer's queries for the policies' decode
    observations, which run on the host before the next step (one step late: see
    ``PolicyAttnBackend``)."""

    paged: torch.Tensor  # [max_bs] bool: the row is head-major
    writes: torch.Tensor  # [N, max_bs, H] int64: rows of the new token's K/V (trash rows of slot 0 otherwise)
    tables: torch.Tensor  # [N, max_bs, H, M] int32
    lengths: torch.Tensor  # [N, max_bs, H] int32
    queries: torch.Tensor  # [N, max_bs, H_q, D]
    max_length: int  # the kernel's static bound of a head's entries (SGLang's longest request)
    observed: list = attrs.field(factory=list)  # (batch index, tracked) whose queries the last replay kept

    @classmethod
    def allocate(cls, store: PolicyStore, max_bs: int, dtype: torch.dtype) -> "GraphState":
        spec, device = store.spec, store.device
        longest = store.req_to_token_pool.req_to_token.shape[1]  # SGLang's bound on a request's positions
        rows = store.page_size * spec.num_kv_heads
        width = -(-longest // rows) + 2  # pages of the longest head, + a partial page at each end
        table_bytes = spec.num_layers * max_bs * spec.num_kv_heads * width * 4
        if table_bytes > GRAPH_TABLE_BYTES:
            raise ValueError(
                f"hcpolicy: CUDA-graph page tables for {max_bs} requests of up to {longest} tokens would take "
                f"{table_bytes / 2**30:.1f} GiB at --page-size {store.page_size}; raise --page-size (16 is plenty) "
                "or lower --cuda-graph-max-bs"
            )
        shape = (spec.num_layers, max_bs, spec.num_kv_heads)
        trash = torch.arange(spec.num_kv_heads, device=device).expand(*shape).contiguous()  # slot 0's rows
        return cls(
            paged=torch.zeros(max_bs, dtype=torch.bool, device=device), writes=trash,
            tables=torch.zeros(*shape, width, dtype=torch.int32, device=device),
            lengths=torch.zeros(shape, dtype=torch.int32, device=device),
            queries=torch.zeros(spec.num_layers, max_bs, spec.num_query_heads, spec.head_dim, dtype=dtype,
                                device=device),  # fmt: skip
            max_length=longest,
        )  # fmt: skip

    def load(self, bs: int, step: "PagedStep | None") -> None:
        """This replay's rows: head-major ones from ``step``, the rest SGLang's."""
        self.paged[:bs] = False
        self.lengths[:, :bs] = 0
        self.writes[:, :bs] = torch.arange(self.writes.shape[2], device=self.writes.device)
        if step is None:
            return
        width = min(step.tables.shape[3], self.tables.shape[3])
        if step.tables.shape[3] > width and bool((step.tables[..., width:] != 0).any()):
            raise RuntimeError("hcpolicy: a head outgrew the CUDA-graph page tables")
        self.paged[step.index] = True
        self.writes[:, step.index] = step.writes
        self.tables[:, step.index, :, :width] = step.tables[..., :width]
        self.lengths[:, step.index] = step.lengths


GRAPH_TABLE_BYTES = 1 << 30  # the most device memory CUDA-graph page tables may take
GRAPH_TYPICAL_ENTRIES = 16384  # a head's entries the captured kernel's chunking is sized for


class PolicyAttnBackend(AttentionBackend):
    """An SGLang ``AttentionBackend`` that applies ``store``'s policy to every request."""

    def __init__(self, inner: AttentionBackend, store: PolicyStore) -> None:
        super().__init__()
        self.inner = inner
        self.store = store
        # SGLang reads the pools off the active backend (forward_context.get_token_to_kv_pool)
        self.token_to_kv_pool = inner.token_to_kv_pool
        self.req_to_token_pool = inner.req_to_token_pool
        self._batch: list[tuple[int, int, int, int]] = []  # (row, seq_len, prefix_len, extend_len)
        self._paged: PagedStep | None = None
        self._graph: GraphState | None = None  # CUDA graphs: ``init_cuda_graph_state``
        self._capturing = False  # a step being recorded into a graph (``forward_decode`` is static then)

    # -- per-batch metadata -------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch: Any) -> None:
        mode = forward_batch.forward_mode
        self._capturing = False  # an eager step (a batch no captured graph serves)
        if self._graph is not None:
            self._observe_replayed()
        self._batch = _batch_rows(forward_batch)
        self._paged = None
        if mode.is_decode():
            self._prepare_decode(forward_batch)
            with self._short_rows(forward_batch):
                self.inner.init_forward_metadata(forward_batch)
            return
        self.inner.init_forward_metadata(forward_batch)
        if mode == ForwardMode.EXTEND:
            # a prompt's whole length: a chunk short of it is not the last (chunked prefill)
            whole = _host_list(None, forward_batch.orig_seq_lens) if forward_batch.orig_seq_lens is not None else None
            for i, (row, seq_len, prefix_len, _) in enumerate(self._batch):
                if self.store.get(row) is not None:
                    raise NotImplementedError(
                        f"hcpolicy: the request in row {row} is extended after its policy ran "
                        "(a prompt extended after its last chunk is not supported)"
                    )
                if whole is not None and seq_len < whole[i] and self.store.compresses:
                    self.store.chunk(row, protected=prefix_len)  # the policy runs on the last chunk
                    continue
                self.store.start(row, length=seq_len, protected=prefix_len)
        elif not mode.is_idle():
            raise NotImplementedError(
                f"hcpolicy: forward mode {mode.name} is not supported (no mixed chunks, no speculative decoding)"
            )

    def _prepare_decode(self, forward_batch: Any) -> None:
        """Grow every tracked request by its new token and plan the head-major ones' step."""
        paged = []
        for i, (row, seq_len, _, _) in enumerate(self._batch):
            tracked = self.store.get(row)
            if tracked is not None:
                tracked.kv.grow(seq_len)
                if tracked.kv.head_major:
                    paged.append((i, tracked))
        self._paged = self._plan_step(forward_batch, paged) if paged else None

    def _plan_step(self, forward_batch: Any, paged: list[tuple[int, TrackedRequest]]) -> PagedStep:
        """Host planning of a decode step for head-major requests (one host read: their slots)."""
        device = forward_batch.out_cache_loc.device
        index = torch.tensor([i for i, _ in paged], device=device)
        slots = forward_batch.out_cache_loc[index].tolist()
        rows = torch.tensor([t.row for _, t in paged], device=device)
        seq = [self._batch[i][1] for i, _ in paged]
        # the new position's slot leaves the row: the request's pages hold its K/V
        self.req_to_token_pool.req_to_token[rows, torch.tensor(seq, device=device) - 1] = 0
        writes = np.stack([t.kv.decode_step(s, slot) for (_, t), s, slot in zip(paged, seq, slots)], axis=1)
        tracked = tuple(t for _, t in paged)
        tables, lengths, longest = stack_tables([t.kv.pages for t in tracked])
        loc = forward_batch.out_cache_loc.clone()
        loc[index] = 0
        return PagedStep(
            index=index, tracked=tracked, writes=torch.from_numpy(writes).to(device), tables=tables,
            lengths=lengths, max_length=longest, loc=loc,
        )  # fmt: skip

    @contextlib.contextmanager
    def _short_rows(self, forward_batch: Any) -> Iterator[None]:
        """While the wrapped backend plans or runs a decode step, head-major requests look
        like one-token sequences to it (it reads 1 slot for them, not their whole row; their
        output rows are replaced). Positions were computed from the real lengths already."""
        step = self._paged
        if step is None:
            yield
            return
        saved = forward_batch.seq_lens, forward_batch.seq_lens_cpu, forward_batch.seq_lens_sum
        seq_lens = forward_batch.seq_lens.clone()
        seq_lens[step.index] = 1
        forward_batch.seq_lens = seq_lens
        if forward_batch.seq_lens_cpu is not None:
            host = forward_batch.seq_lens_cpu.clone()
            host[step.index.cpu()] = 1
            forward_batch.seq_lens_cpu = host
            forward_batch.seq_lens_sum = int(host.sum())
        try:
            yield
        finally:
            forward_batch.seq_lens, forward_batch.seq_lens_cpu, forward_batch.seq_lens_sum = saved

    # -- CUDA graphs (decode) ---------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        if self.store.needs_views:
            raise NotImplementedError(
                f"hcpolicy: {self.store.policy_name} attends through per-step views (Attend), which CUDA graphs "
                "cannot replay; launch with --disable-cuda-graph"
            )
        self.inner.init_cuda_graph_state(max_bs, max_num_tokens)
        self._graph = GraphState.allocate(self.store, max_bs, self.store.dtype)

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Before a captured decode step is recorded (``in_capture``) or replayed: the host
        work of ``init_forward_metadata`` for the replayed batch (the policies' decode
        observations of the last replay first, then the new token's planning), written into
        the static buffers the recorded step reads."""
        graph = self._graph
        if graph is None or not forward_batch.forward_mode.is_decode():
            raise NotImplementedError(f"hcpolicy: CUDA graphs of {forward_batch.forward_mode.name} steps")
        bs = forward_batch.batch_size
        if in_capture:
            self._batch, self._paged, self._capturing = [], None, True
            graph.load(bs, None)
            self.inner.init_forward_metadata_out_graph(forward_batch, in_capture=True)
            return
        self._capturing = False
        self._observe_replayed()
        real = bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        self._batch = _batch_rows(forward_batch)[:real]
        self._prepare_decode(forward_batch)
        graph.load(bs, self._paged)
        graph.observed = [(i, t) for i, (row, *_) in enumerate(self._batch)
                          if (t := self.store.get(row)) is not None and t.needs.decode_observations]  # fmt: skip
        with self._short_rows(forward_batch):
            self.inner.init_forward_metadata_out_graph(forward_batch, in_capture=False)

    def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
        self.inner.init_forward_metadata_in_graph(forward_batch)

    def _observe_replayed(self) -> None:
        """The decode observations of the last replayed step, from the queries it kept. Their
        actions take effect from this step on (eager steps: from the observed layer's own
        attention); a token-major request that acted moves to pages now."""
        graph = self._graph
        observed, graph.observed = graph.observed, []
        for i, tracked in observed:
            if self.store.get(tracked.row) is not tracked:
                continue  # finished or replaced since
            for layer in range(self.store.spec.num_layers):
                _decode(tracked, layer, graph.queries[layer, i : i + 1])
            tracked.kv.finalize()

    # -- forward ------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        out = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [T, H_q, D]
        start = 0
        last = layer.layer_id == self.store.spec.num_layers - 1
        for row, seq_len, prefix_len, extend_len in self._batch:
            tracked = self.store.get(row)
            if tracked is not None:
                positions = torch.arange(prefix_len, seq_len, device=queries.device)  # [Q]
                _prefill(tracked, layer.layer_id, queries[start : start + extend_len], positions)
                if last:
                    tracked.kv.finalize()
            start += extend_len
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        if self._capturing:
            return self._forward_decode_static(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        tracked = [(i, self.store.get(row)) for i, (row, *_) in enumerate(self._batch)]
        tracked = [(i, t) for i, t in tracked if t is not None]
        observing = [(i, t) for i, t in tracked if t.needs.decode_observations]
        step = self._paged
        masked = [(i, t) for i, t in tracked if t.kv.touched and not t.kv.head_major]
        if step is None and not observing and not masked:
            return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        layer_id = layer.layer_id
        queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [B, H_q, D]
        if save_kv_cache and k is not None and v is not None:
            # observations read the new token's KV, so it is written before the policy runs
            loc = KVWriteLoc.for_batch(forward_batch) if step is None else KVWriteLoc(step.loc, physical=forward_batch.out_cache_loc_is_physical)
            self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)
            if step is not None:
                self._write_pages(layer_id, step, k, v)
        moved = 0
        for i, t in observing:
            before = t.kv.moves
            _decode(t, layer_id, queries[i : i + 1])
            moved += t.kv.moves - before
            if t.kv.touched and not t.kv.head_major and (i, t) not in masked:
                masked.append((i, t))  # first action while decoding: this step is masked, then pages
        with self._short_rows(forward_batch):
            out = self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=False, **kwargs)
        rows = out.view(-1, layer.tp_q_head_num, layer.v_head_dim)  # [B, H_q, D]
        if step is not None:
            if moved:  # the policy moved rows of head-major requests: their tables changed
                step.tables, step.lengths, step.max_length = stack_tables([t.kv.pages for t in step.tracked])
            self._attend_pages(layer, step, queries, rows)
        for i, t in masked:
            rows[i] = t.kv.attend(layer_id, queries[i : i + 1], layer.scaling)[0].to(rows.dtype)
            if layer_id == self.store.spec.num_layers - 1:
                t.kv.finalize()
        return out

    def _forward_decode_static(self, q, k, v, layer, forward_batch, save_kv_cache: bool, **kwargs):
        """A decode step as a CUDA graph records it: fixed shapes, no host reads, every row
        through both kernels, each row keeping its own (``GraphState``)."""
        graph, layer_id = self._graph, layer.layer_id
        bs = q.shape[0]
        queries = q.view(bs, layer.tp_q_head_num, layer.qk_head_dim)
        graph.queries[layer_id, :bs].copy_(queries)
        pages = graph.paged[:bs]
        k_rows, v_rows = row_views(self.token_to_kv_pool, layer_id)
        if save_kv_cache and k is not None and v is not None:
            loc = torch.where(pages, 0, forward_batch.out_cache_loc)  # head-major rows: their pages instead
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(loc, physical=forward_batch.out_cache_loc_is_physical), k, v
            )
            _scatter_rows(k_rows, v_rows, graph.writes[layer_id, :bs], k, v)
        out = self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=False, **kwargs)
        own = paged_decode(
            queries, k_rows, v_rows, graph.tables[layer_id, :bs], graph.lengths[layer_id, :bs],
            self.store.page_size * self.store.spec.num_kv_heads, layer.scaling, max_length=graph.max_length,
            kernel=self.store.kernel, work=bs * self.store.spec.num_kv_heads * GRAPH_TYPICAL_ENTRIES,
        )  # fmt: skip
        rows = out.view(bs, layer.tp_q_head_num, layer.v_head_dim)
        rows.copy_(torch.where(pages.view(-1, 1, 1), own.to(rows.dtype), rows))
        return out

    def _write_pages(self, layer: int, step: PagedStep, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new token's K/V of head-major requests into their pages (rows ``step.writes``)."""
        k_rows, v_rows = row_views(self.token_to_kv_pool, layer)
        dim = k_rows.shape[-1]
        k, v = (x.reshape(x.shape[0], -1, dim)[step.index] for x in (k, v))  # [B', H, D]
        _scatter_rows(k_rows, v_rows, step.writes[layer], k, v)

    def _attend_pages(self, layer: Any, step: PagedStep, queries: torch.Tensor, rows: torch.Tensor) -> None:
        """Head-major requests' attention by the paged kernel (a request with Attend views at
        this layer takes the gathered path instead)."""
        layer_id = layer.layer_id
        k_rows, v_rows = row_views(self.token_to_kv_pool, layer_id)
        out = paged_decode(
            queries[step.index], k_rows, v_rows, step.tables[layer_id], step.lengths[layer_id],
            step.tracked[0].kv.pages.rows_per_page, layer.scaling, max_length=step.max_length,
            kernel=self.store.kernel,
        )  # fmt: skip
        rows[step.index] = out.to(rows.dtype)
        for j, t in enumerate(step.tracked):
            if t.kv.has_views(layer_id):
                i = int(step.index[j])
                rows[i] = t.kv.attend(layer_id, queries[i : i + 1], layer.scaling)[0].to(rows.dtype)

    # -- everything else is the wrapped backend's ----------------------------------------------
    def support_triton(self) -> bool:
        return self.inner.support_triton()

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

    @property
    def needs_cpu_seq_lens(self) -> bool:  # class attributes of SGLang's backends, read off the active one
        return self.inner.needs_cpu_seq_lens

    @property
    def extend_dummy_seqs_capped_by_req_pool(self) -> bool:
        return self.inner.extend_dummy_seqs_capped_by_req_pool

    @property
    def forward_metadata(self) -> Any:
        return self.inner.forward_metadata

    @forward_metadata.setter
    def forward_metadata(self, value: Any) -> None:
        if "inner" in self.__dict__:  # AttentionBackend.__init__ runs before inner is set
            self.inner.forward_metadata = value

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes this class lacks (backend-specific state)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _prefill(tracked: TrackedRequest, layer: int, queries: torch.Tensor, positions: torch.Tensor) -> None:
    """Run the request's policy on one layer of its prompt. queries: [Q, H_q, D]."""
    window = tracked.needs.query_window
    if window is not None:
        queries, positions = queries[-window:], positions[-window:]
    obs = Observation(
        phase=Phase.PREFILL, layer=layer, queries=queries.transpose(0, 1)[None], query_positions=positions,
        cache=tracked.kv.view(layer), prompt_length=tracked.kv.prompt_length,
    )  # fmt: skip
    tracked.kv.apply(tracked.policy.prefill(obs))


def _decode(tracked: TrackedRequest, layer: int, query: torch.Tensor) -> None:
    """The policy's decode observation of one layer. query: [1, H_q, D] (the new token).

    A policy that acts every ``decode_period`` steps gets one observation per period with
    that many queries (``Requirements``): the KV view is built once a period, not every step."""
    heads = tracked.policy.observed_heads(layer)
    if heads is not None and len(heads) == 0:
        return
    kv = tracked.kv
    position = kv.length - 1
    step = position - kv.prompt_length
    period = tracked.needs.decode_period
    pending = tracked.pending.setdefault(layer, [])
    pending.append(query[0].clone() if period > 1 else query[0])  # [H_q, D] (graph buffers are reused)
    if (step + 1) % period and step >= 0:
        return
    queries = torch.stack(pending)  # [N, H_q, D]
    pending.clear()
    n = queries.shape[0]
    heads = None if heads is None else list(heads)
    obs = Observation(
        phase=Phase.DECODE, layer=layer, queries=queries.transpose(0, 1)[None],
        query_positions=torch.arange(position - n + 1, position + 1, device=query.device),
        cache=kv.view(layer, heads), prompt_length=kv.prompt_length, step=step - n + 1, heads=heads,
    )  # fmt: skip
    kv.apply(tracked.policy.decode(obs))


def _scatter_rows(k_rows: torch.Tensor, v_rows: torch.Tensor, dest: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> None:  # fmt: skip
    """The new token's K and V of each (request, head) into rows ``dest`` [B, H] of the
    layer's row views; k, v: [B, H * D] or [B, H, D]."""
    dim, dest = k_rows.shape[-1], dest.reshape(-1)
    k_rows.index_copy_(0, dest, k.reshape(-1, dim).to(k_rows.dtype))
    v_rows.index_copy_(0, dest, v.reshape(-1, dim).to(v_rows.dtype))


def _batch_rows(forward_batch: Any) -> list[tuple[int, int, int, int]]:
    """(row, seq_len, prefix_len, extend_len) per request, from host copies where SGLang has them."""
    rows = _host_list(getattr(forward_batch, "req_pool_indices_cpu", None), forward_batch.req_pool_indices)
    seq_lens = _host_list(getattr(forward_batch, "seq_lens_cpu", None), forward_batch.seq_lens)
    if forward_batch.forward_mode.is_extend():
        prefix = _host_list(forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens)
        extend = _host_list(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)
    else:
        prefix, extend = [s - 1 for s in seq_lens], [1] * len(seq_lens)
    return list(zip(rows, seq_lens, prefix, extend))


def _host_list(host: Any, device: torch.Tensor | None) -> list[int]:
    if host is not None:
        return [int(x) for x in (host.tolist() if isinstance(host, torch.Tensor) else host)]
    return [] if device is None else device.tolist()  # one host read per batch when no host copy exists
