"""Radix caches that never hold a compressed row.

SGLang's tree maps token ids to slot indices, one per token, and a slot holds that
token for every layer and KV head. Once a request's policy acted, its row past the
tree's part (``cache_protected_len``) is 0: its KV lives in head-major pages that hold
other rows than the token's (``head_pages``). So the tree may take exactly the row's
*intact* prefix, ``RequestKV.intact_length()``: the whole row for an untouched request,
only the part the tree already owns for a compressed one. ``checkpoint`` is clamped there;
on release ``free_kv_row`` skips the entries that read 0 (and SGLang's padding page), and
the request's pages go back through the store. Prefix sharing keeps working for the
uncompressed prefix: a later request with the same prompt start matches it, and a policy
never frees or writes slots the tree owns (it copies the rows it keeps out of them).
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from .store import PolicyStore


class CompressionAware:
    """Mixin over an SGLang prefix cache; ``attach`` it to the store of the attention wrapper."""

    store: PolicyStore | None = None

    def attach(self, store: PolicyStore) -> None:
        """Serve ``store``'s requests (the attention wrapper refuses to compress until then)."""
        self.store = store
        store.tree_bound = True

    def checkpoint(self, req: Any, *, up_to: int, **kwargs: Any) -> None:
        tracked = self._tracked(req.kv.req_pool_idx)
        if tracked is not None:
            up_to = max(req.kv.cache_protected_len, min(up_to, tracked.kv.intact_length()))
        elif self._chunking(req.kv.req_pool_idx):  # its policy will compress the whole prompt
            up_to = req.kv.cache_protected_len
        super().checkpoint(req, up_to=up_to, **kwargs)
        if tracked is not None:
            tracked.kv.protect(req.kv.cache_protected_len)

    def free_kv_row(self, kv: Any, ranges: list[tuple[int, int]]) -> None:
        tracked = self._tracked(kv.req_pool_idx)
        if tracked is None:
            super().free_kv_row(kv, ranges)
            return
        row = self.req_to_token_pool.req_to_token[kv.req_pool_idx]
        page = self.token_to_kv_pool_allocator.page_size
        for start, end in ranges:
            slots = row[start:end].long()
            # page 0 is SGLang's padding page: entries a compressed request moved out read 0
            # (and, with pages above 1, a decode step's slot after such an entry lands in page 0)
            self.token_to_kv_pool_allocator.free(slots[slots // page != 0])

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        if self.store is not None:
            self.store.release(req.kv.req_pool_idx)

    def _chunking(self, row: int | None) -> bool:
        return self.store is not None and row is not None and self.store.chunking(row) is not None

    def _tracked(self, row: int | None) -> Any:
        if self.store is None or row is None:
            return None
        return self.store.get(row)


class PolicyRadixCache(CompressionAware, RadixCache):
    """SGLang's ``RadixCache`` (the plain tree) for policy-compressed requests."""


class PolicyUnifiedRadixCache(CompressionAware, UnifiedRadixCache):
    """SGLang's ``UnifiedRadixCache`` (its default tree since 0.5.23) for policy-compressed requests."""


def radix_cache_factory(ctx: Any) -> UnifiedRadixCache:
    """``--radix-cache-backend hcpolicy``: SGLang's default unified tree, made compression
    aware and attached to the policy store of the worker's attention backend."""
    from sglang.srt.mem_cache.registry import create_unified_radix_cache

    from .attention import PolicyAttnBackend

    backend = ctx.tp_worker.model_runner.attn_backend
    if not isinstance(backend, PolicyAttnBackend):
        raise ValueError(
            "--radix-cache-backend hcpolicy needs an hcpolicy attention backend for prefill and decode "
            f"(e.g. --attention-backend hcpolicy_triton), got {type(backend).__name__}"
        )
    cache = create_unified_radix_cache(ctx, cache_class=PolicyUnifiedRadixCache)
    cache.attach(backend.store)
    return cache
