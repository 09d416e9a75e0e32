"""The ``sglang.srt.plugins`` entry point: what SGLang's ``load_plugins()`` runs.

``load_plugins()`` runs every function of that entry-point group once per process: in
``sglang.launch_server`` / ``sglang serve`` before the command line is parsed, and again
in the spawned scheduler process before its model runner is built. ``register`` adds:

- attention backends ``hcpolicy_<inner>`` for SGLang's MHA backends (``triton``,
  ``flashinfer``, ``fa3``, ``flex_attention``, ``torch_native``): each builds SGLang's own
  ``<inner>`` backend and wraps it in ``PolicyAttnBackend``; the names join the
  ``--attention-backend`` choices;
- the radix-cache backend ``hcpolicy`` (``--radix-cache-backend hcpolicy``): SGLang's
  default tree, made compression aware (``radix.py``);
- two hooks (SGLang's ``HookRegistry``): before the scheduler's admission (SGLang stops
  admitting once a batch is full until a request leaves, and compression frees room
  without any request leaving, so the hook reopens admission when it did), and after
  its count of the slots the next decode step needs (a compressed request may need more
  pages than the one slot it gets, so SGLang retracts before running out, not during).

Nothing else is patched, and the hooks do nothing for a server that selects neither. The policy
comes from ``HCPOLICY_*`` environment variables (``config.py``), read when the
attention backend is built, so a bad value stops the server with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PREFIX = "hcpolicy_"
# SGLang's admission of new requests (0.5.23): once it finds no room it stops trying until a
# running request leaves; compression frees room without any leaving, so it is told
ADMISSION = "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw"
# what SGLang's decode-memory check (and so its retraction) counts for the next step: a
# compressed request may need more pages than the one slot SGLang gives each request
DECODE_NEED = "sglang.srt.managers.schedule_batch.ScheduleBatch.new_tokens_required_next_decode"
_hooked = False
RADIX_BACKEND = "hcpolicy"
WRAPPED = ("triton", "flashinfer", "fa3", "flex_attention", "torch_native")


def register() -> None:
    """Register the attention wrappers and the radix cache with SGLang (idempotent)."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    from .radix import radix_cache_factory

    if get_radix_cache_factory(RADIX_BACKEND) is None:
        register_radix_cache_backend(RADIX_BACKEND, radix_cache_factory)
    for inner in WRAPPED:
        if inner in ATTENTION_BACKENDS:
            register_attention_backend(PREFIX + inner)(attention_factory(inner))
    add_attention_backend_choices([n for n in attention_backend_names() if n not in ATTENTION_BACKEND_CHOICES])
    global _hooked
    if not _hooked:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(ADMISSION, reopen_admission, HookType.BEFORE)
        HookRegistry.register(DECODE_NEED, add_page_needs, HookType.AFTER)
        _hooked = True


def add_page_needs(needed: int, batch: Any, selected_indices: list[int] | None = None, **_: Any) -> int:
    """After SGLang counts the slots a batch's next decode step takes: add the pages its
    compressed requests take beyond the slot each gets, so that SGLang retracts requests
    before a step would run out of pages, never during it."""
    store = _store_of(batch)
    if store is None:
        return needed
    requests = batch.reqs if selected_indices is None else [batch.reqs[i] for i in selected_indices]
    extra = 0
    for req in requests:
        tracked = store.get(req.kv.req_pool_idx) if req.kv.req_pool_idx is not None else None
        if tracked is not None and tracked.kv.head_major:
            extra += tracked.kv.pages.pages_needed_next() * store.page_size
    return needed + extra


def _store_of(owner: Any) -> Any:
    """The PolicyStore behind a scheduler's or a batch's tree cache (None: not hcpolicy's tree)."""
    return getattr(getattr(owner, "tree_cache", None), "store", None)


def reopen_admission(scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Before SGLang's scheduler looks for new requests to admit: if compression gave slots
    back since it last looked, a batch it marked full may have room again."""
    store = _store_of(scheduler)
    running = kwargs.get("running_batch", args[1] if len(args) > 1 else None)
    if store is not None and running is not None and store.take_freed():
        running.batch_is_full = False


def attention_backend_names() -> list[str]:
    """The ``--attention-backend`` names this plugin registers (after ``register``)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    return [name for name in ATTENTION_BACKENDS if name.startswith(PREFIX)]


def attention_factory(inner: str) -> Callable[[Any], Any]:
    """``fn(model_runner) -> PolicyAttnBackend`` around SGLang's backend ``inner``."""

    def build(runner: Any) -> Any:
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

        from .attention import PolicyAttnBackend
        from .config import PolicyConfig
        from .store import PolicyStore, model_spec

        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()  # attention's tensor parallelism: KV heads split over these ranks
        rank, ranks = int(parallel.attn_tp_rank), int(parallel.attn_tp_size)
        config = PolicyConfig.from_env()
        spec = model_spec(runner.model_config, ranks)  # this rank's heads
        profile = config.load_profile()
        if profile is not None:
            profile.check(model_spec(runner.model_config))  # profiles name the whole model's heads
            if ranks > 1:  # a pivot and its satellites must share a rank (else: which sizes fit)
                profile = profile.shard(rank, ranks)
        config.make_policy(profile)  # a policy that cannot be built stops the server here
        store = PolicyStore(
            spec=spec, policy_factory=lambda: config.make_policy(profile), req_to_token_pool=runner.req_to_token_pool,
            pool=runner.token_to_kv_pool, allocator=runner.token_to_kv_pool_allocator,
        )  # fmt: skip
        return PolicyAttnBackend(ATTENTION_BACKENDS[inner](runner), store)

    return build
