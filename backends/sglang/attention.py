"""PolicyAttnBackend: wraps one of SGLang's attention backends and applies a policy.

- extend (prefill): the wrapped backend computes the layer's attention densely and saves
  the prompt's KV; then the request's policy observes the layer (queries, and the KV
  through the request's ``req_to_token`` row) and its actions are executed by the
  request's ``RequestKV``, layer by layer, as in the HF backend;
- decode: requests whose policy never acted are served by the wrapped backend as they
  are (a keep-everything policy is SGLang's own output, bit for bit). For the others
  the new token's KV is saved, the policy's decode observation runs, the wrapped backend
  runs with ``save_kv_cache=False`` for the batch, and those requests' rows of the output
  are replaced by attention over what each (layer, KV head) sees
  (``RequestKV.attend``: torch SDPA with per-head masks over the request's live slots).

``seq_lens`` are never touched: positions stay logical. Not supported, each with a
clear error: CUDA graphs, extending a request after its policy ran (chunked prefill,
retraction), mixed-chunk batches, speculative decoding. On GPU the compressed rows are computed by
torch SDPA here, not by the wrapped kernel (a kv_indices rewrite per kernel is future work).
"""

from __future__ import annotations

from typing import Any

import torch

from hcpolicy.observe import Observation, Phase
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from .store import PolicyStore, TrackedRequest


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

    # -- per-batch metadata -------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch: Any) -> None:
        self.inner.init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        self._batch = _batch_rows(forward_batch)
        if mode.is_decode():
            for row, seq_len, _, _ in self._batch:
                tracked = self.store.get(row)
                if tracked is not None:
                    tracked.kv.grow(seq_len)
        elif mode == ForwardMode.EXTEND:
            for row, seq_len, prefix_len, _ in self._batch:
                if self.store.get(row) is not None:
                    raise NotImplementedError(
                        f"hcpolicy: the request in row {row} is extended after its policy ran (chunked "
                        "prefill or a retraction); launch with --chunked-prefill-size -1"
                    )
                self.store.start(row, length=seq_len, protected=prefix_len)
        elif not mode.is_idle():
            raise NotImplementedError(
                f"hcpolicy: forward mode {mode.name} is not supported (no mixed chunks, no speculative decoding)"
            )

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        raise NotImplementedError("hcpolicy does not support CUDA graphs: launch with --disable-cuda-graph")

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        raise NotImplementedError("hcpolicy does not support CUDA graphs: launch with --disable-cuda-graph")

    # -- forward ------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        out = self.inner.forward_extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [T, H_q, D]
        start = 0
        for row, seq_len, prefix_len, extend_len in self._batch:
            tracked = self.store.get(row)
            if tracked is not None:
                positions = torch.arange(prefix_len, seq_len, device=queries.device)  # [Q]
                _prefill(tracked, layer.layer_id, queries[start : start + extend_len], positions)
            start += extend_len
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        tracked = [(i, self.store.get(row)) for i, (row, *_) in enumerate(self._batch)]
        tracked = [(i, t) for i, t in tracked if t is not None]
        observing = [(i, t) for i, t in tracked if t.needs.decode_observations]
        if not observing and not any(t.kv.touched for _, t in tracked):
            return self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if save_kv_cache and k is not None and v is not None:
            # observations read the new token's KV, so it is written before the policy runs
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
        queries = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)  # [B, H_q, D]
        for i, t in observing:
            _decode(t, layer.layer_id, queries[i : i + 1])
        out = self.inner.forward_decode(q, k, v, layer, forward_batch, save_kv_cache=False, **kwargs)
        rows = out.view(-1, layer.tp_q_head_num, layer.v_head_dim)  # [B, H_q, D]
        for i, t in tracked:
            if t.kv.touched:
                rows[i] = t.kv.attend(layer.layer_id, queries[i : i + 1], layer.scaling)[0].to(rows.dtype)
        return out

    # -- everything else is the wrapped backend's ----------------------------------------------
    def support_triton(self) -> bool:
        return self.inner.support_triton()

    def get_cuda_graph_seq_len_fill_value(self):
        return self.inner.get_cuda_graph_seq_len_fill_value()

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
    """The policy's decode observation of one layer. query: [1, H_q, D] (the new token)."""
    heads = tracked.policy.observed_heads(layer)
    if heads is not None and len(heads) == 0:
        return
    heads = None if heads is None else list(heads)
    kv = tracked.kv
    position = kv.length - 1
    obs = Observation(
        phase=Phase.DECODE, layer=layer, queries=query.transpose(0, 1)[None],
        query_positions=torch.tensor([position], device=query.device), cache=kv.view(layer, heads),
        prompt_length=kv.prompt_length, step=position - kv.prompt_length, heads=heads,
    )  # fmt: skip
    kv.apply(tracked.policy.decode(obs))


def _batch_rows(forward_batch: Any) -> list[tuple[int, int, int, int]]:
    """(row, seq_len, prefix_len, extend_len) per request, from host copies where SGLang has them."""
    rows = _host_list(forward_batch.req_pool_indices_cpu, forward_batch.req_pool_indices)
    seq_lens = _host_list(forward_batch.seq_lens_cpu, forward_batch.seq_lens)
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
