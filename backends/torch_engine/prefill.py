"""Prefill: write the prompts' K/V into the paged cache and let the policy compress each layer.

``Prefill.run`` takes each prompt through the model in chunks of ``prefill_chunk`` tokens:
a chunk's K/V go to the pages first, then its queries attend causally over everything the
sequence holds so far, read back from the pages (SDPA). The queries of the policy's window
(``Requirements.query_window``: the prompt's last W tokens) are recorded on the way, and
the policy compresses each layer from them right after that layer's attention in the last
chunk of the batch's last sequence (every sequence then holds its prompt there), so its
copies to the host and its host work overlap the later layers' compute. Nothing in a
prefill waits for the device (no host sync, so the host runs ahead of the GPU): the
policy's Selects leave their validity checks on the device (``PagedExecutor.defer_checks``)
for ``Engine._finish_prefill`` to read once.
``Prefill.run_random`` fills the same pages with random K/V instead and compresses each
layer, with random queries, as soon as it is written, so peak memory stays near the
compressed size (benchmarks where prefill time is not the point).

One ``Prefill`` serves one call, on the batch ``Engine._begin`` has just set up; the
engine then readies decode (``Engine._finish_prefill``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hcpolicy.observe import Observation, Phase

if TYPE_CHECKING:
    from .engine import Engine


class Prefill:
    """The prefill of the ``lengths`` prompts an engine has begun (``Engine._begin``)."""

    def __init__(self, engine: Engine, lengths: list[int]) -> None:
        self.engine, self.lengths = engine, lengths
        self.kv, self.executor, self.mc = engine.kv, engine.executor, engine.mc
        self.device, self.dtype = engine.device, engine.dtype
        self.batch, self.prompt_length = engine.batch, engine.prompt_length
        window = engine._needs.query_window
        self.window = self.prompt_length if window is None else min(window, self.prompt_length)

    def run(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """Prefill the prompts (``seqs``: one [L_b] int64 tensor each, on the engine's device),
        then compress every layer. Returns the last prompt token's logits [B, V]."""
        mc, policy = self.mc, self.engine.policy
        self.executor.defer_checks()
        for layer in range(mc.num_layers):
            self._allocate_layer(layer)
        record = [torch.zeros(self.batch, mc.num_heads, self.window, mc.head_dim, dtype=self.dtype,
                              device=self.device) for _ in range(mc.num_layers)] if policy else None  # fmt: skip
        # the policy compresses each layer as soon as the last chunk of the last sequence has
        # passed it, while the later layers still run: its transfers and host work overlap them
        positions = self._window_positions() if policy is not None else None
        last = len(seqs) - 1
        return torch.stack([self._sequence(b, seq, record, positions if b == last else None)
                            for b, seq in enumerate(seqs)])  # fmt: skip

    def run_random(self, seed: int) -> None:
        """Random K/V for every prompt token and random queries [B, H_q, W, D] for the policy,
        one layer at a time: that layer is compressed before the next is written."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.executor.defer_checks()
        positions = self._window_positions()
        h_kv, d = self.mc.num_kv_heads, self.mc.head_dim
        starts = self.engine._starts_host
        for layer in range(self.mc.num_layers):
            self._allocate_layer(layer)
            for b, n in enumerate(self.lengths):
                k = torch.randn(h_kv, n, d, generator=gen, device=self.device, dtype=self.dtype)  # [H_kv, L_b, D]
                v = torch.randn(h_kv, n, d, generator=gen, device=self.device, dtype=self.dtype)
                own = torch.arange(n, device=self.device) + starts[b]
                self.kv.write(layer, b, 0, k, v, own)
                del k, v
            if self.engine.policy is not None:
                q = torch.randn(self.batch, self.mc.num_heads, self.window, d, generator=gen, device=self.device,
                                dtype=self.dtype)  # fmt: skip
                self._compress(layer, q, positions)

    # -- phases --------------------------------------------------------------------------------
    def _allocate_layer(self, layer: int) -> None:
        """Pages for every head of ``layer``: its prompt plus the tokens still to come, as
        one run of pages when the pool has one (heads then read as strided views)."""
        kv = self.kv
        per_head = kv.pages_for(max(self.lengths) + self.executor.reserve)
        pages = kv.allocator.allocate(self.batch * kv.num_kv_heads * per_head).view(self.batch, kv.num_kv_heads, -1)
        for b in range(self.batch):
            for h in range(kv.num_kv_heads):
                kv.set_pages(layer, b, h, pages[b, h])
        kv.push_tables(layer)

    def _sequence(self, b: int, tokens: torch.Tensor, record: list[torch.Tensor] | None,
                  compress: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Sequence ``b`` through the model chunk by chunk. Returns its last token's logits [V].
        compress: the window's positions, when each layer is to be compressed right after
        its attention in the last chunk (the batch's last sequence)."""
        engine = self.engine
        length, start = tokens.numel(), engine._starts_host[b]
        chunk = engine.config.prefill_chunk
        logits = None
        for s in range(0, length, chunk):
            e = min(length, s + chunk)
            own = torch.arange(s, e, device=self.device)  # RoPE positions of this chunk

            def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                # q: [1, H_q, Q, D]; k, v: [1, H_kv, Q, D]
                self.kv.write(layer, b, s, k[0], v[0], own + start)
                keys, values = self.kv.sequence_view(layer, b, e)  # [1, H_kv, e, D]
                if record is not None:
                    _record_window(record[layer], b, q, s, e, length)
                out = self._attention(q, keys, values, s)
                if compress is not None and e == length:
                    self._compress(layer, record[layer], compress)
                return out

            logits = engine.model(tokens[None, s:e], own[None], attend, last_only=True, ops=engine.ops)
        return logits[0, -1]

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int) -> torch.Tensor:
        """Causal attention of a chunk's queries (positions first..) over entries 0..e. -> [1, Q, H_q * D]."""
        b, h_q, q_len, d = q.shape
        scale = self.engine.scale
        if first == 0 and not q.is_cuda:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # CUDA's fused kernels (flash, memory-efficient) want H_q K/V heads, and a later
            # chunk's causal mask aligned bottom-right (causal_lower_right, never materialised)
            g = self.mc.group_size
            keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)
            mask = causal_lower_right(q_len, keys.shape[2])
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(b, q_len, h_q * d)

    def _window_positions(self) -> torch.Tensor:
        """Logical positions [W] of the window's queries: the prompt's last W tokens."""
        return torch.arange(self.prompt_length - self.window, self.prompt_length, device=self.device)

    def _compress(self, layer: int, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """The policy's prefill call for ``layer``: queries [B, H_q, W, D] at ``positions`` [W]."""
        engine = self.engine
        obs = Observation(
            phase=Phase.PREFILL, layer=layer, queries=queries, query_positions=positions,
            cache=self.kv.prefill_view(layer, engine._starts_host, engine.starts), prompt_length=self.prompt_length,
        )  # fmt: skip
        self.executor.apply(list(engine.policy.prefill(obs)))


def _record_window(record: torch.Tensor, b: int, q: torch.Tensor, s: int, e: int, length: int) -> None:
    """Copy the chunk's queries that fall in the policy's window (right-aligned) into record [B, H_q, W, D]."""
    window = record.shape[2]
    lo = max(s, length - window)
    if lo < e:
        record[b, :, lo - (length - window) : e - (length - window)] = q[0, :, lo - s : e - s]
