"""PolicyStore: the policy state of every running request, shared by the attention
wrapper (which runs policies and executes their actions) and the radix cache (which must
know which rows are compressed when it checkpoints and frees them).

Requests are keyed by their ``req_to_token`` row and that row's generation
(``ReqToTokenPool.req_generation``, bumped on every allocation), so a row reused by a
new request never meets the state of the request before it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from hcpolicy.actions import Attend
from hcpolicy.capabilities import Requirements
from hcpolicy.kernels.paged_decode import DecodeKernel, resolve_kernel
from hcpolicy.policy.base import Policy
from hcpolicy.runtime import TransferRuntime
from hcpolicy.spec import ModelSpec

from .request_kv import RequestKV

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class TrackedRequest:
    """One request: its policy (one instance per request: policies keep per-generation
    state) and the RequestKV executing that policy's actions."""

    row: int
    generation: int
    policy: Policy
    needs: Requirements
    kv: RequestKV
    pending: dict = attrs.field(factory=dict)  # layer -> decode queries [H_q, D] awaiting the policy's period


class PolicyStore:
    """Tracked requests by row, plus what it takes to start one.

    policy_factory: builds a fresh policy per request. pool / allocator / req_to_token_pool:
    SGLang's KV pool, token allocator (any page size) and request-to-token pool of this
    worker. kernel: the decode kernel of head-major requests ('auto': Triton on CUDA).
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        policy_factory: Callable[[], Policy],
        req_to_token_pool: Any,
        pool: Any,
        allocator: Any,
        runtime: TransferRuntime | None = None,
        kernel: DecodeKernel = "auto",
    ) -> None:
        key = pool.get_key_buffer(0)
        if key.ndim != 3 or key.shape[1] != spec.num_kv_heads or not key.is_contiguous():
            raise ValueError(
                f"hcpolicy needs SGLang's token-major KV layout [slots, {spec.num_kv_heads} heads, D] per layer; "
                f"this pool's key buffer is {tuple(key.shape)} (contiguous: {key.is_contiguous()})"
            )
        self.spec = spec
        self.policy_factory = policy_factory
        self.req_to_token_pool = req_to_token_pool
        self.pool = pool
        self.allocator = allocator
        self.page_size = int(getattr(allocator, "page_size", 1))
        self.device, self.dtype = key.device, key.dtype
        self.kernel = resolve_kernel(kernel, key.device)
        self.runtime = runtime or TransferRuntime(pool.device, check_device_rows=False)
        self.tree_bound = False  # set by the hcpolicy radix cache when it attaches
        self._requests: dict[int, TrackedRequest] = {}
        self.freed_since_admission = 0  # slots compression gave back since SGLang's admission last looked
        self._chunking: dict[int, tuple[int, int]] = {}  # row -> (generation, tree's part) mid chunked prefill

    @functools.cached_property
    def _probe(self) -> Policy:
        """One policy built to read what every request's policy declares (built on first need)."""
        return self.policy_factory()

    @property
    def compresses(self) -> bool:
        """Whether the policy acts at all (a keep-everything policy leaves SGLang's layout alone)."""
        return bool(self._probe.requirements().actions)

    @property
    def needs_views(self) -> bool:
        """Whether the policy attends through per-step views (Attend)."""
        return Attend in self._probe.requirements().actions

    @property
    def policy_name(self) -> str:
        return type(self._probe).__name__

    def generation(self, row: int) -> int:
        return int(self.req_to_token_pool.req_generation[row])

    def get(self, row: int) -> TrackedRequest | None:
        """The request holding ``row`` now (a stale entry of an earlier request is dropped)."""
        tracked = self._requests.get(row)
        if tracked is not None and tracked.generation != self.generation(row):
            self.release(row)
            return None
        return tracked

    def _note_freed(self, slots: int) -> None:
        self.freed_since_admission += slots

    def take_freed(self) -> int:
        """Slots compression gave back to SGLang since the last call (the scheduler's
        admission asks: it stops trying to admit once full until a request leaves)."""
        freed, self.freed_since_admission = self.freed_since_admission, 0
        return freed

    def chunk(self, row: int, *, protected: int) -> None:
        """The request in ``row`` computed a prompt chunk that is not its last: its policy
        waits for the last one; until then the tree takes none of its positions past
        ``protected`` (the part it owned when the prompt started)."""
        generation = self.generation(row)
        known = self._chunking.get(row)
        if known is None or known[0] != generation:
            self._chunking[row] = (generation, protected)

    def chunking(self, row: int) -> int | None:
        """The tree's part of a request mid chunked prefill (None: not chunking)."""
        known = self._chunking.get(row)
        if known is None or known[0] != self.generation(row):
            return None
        return known[1]

    def start(self, row: int, *, length: int, protected: int) -> TrackedRequest:
        """Track the request in ``row`` whose prompt of ``length`` tokens was just computed;
        [0, protected) came from the radix tree."""
        if not self.tree_bound:
            raise RuntimeError(
                "hcpolicy's attention backend needs hcpolicy's radix cache (launch with "
                "--radix-cache-backend hcpolicy): SGLang's own tree would cache compressed rows"
            )
        chunked = self.chunking(row)
        self.release(row)
        protected = protected if chunked is None else chunked
        policy = self.policy_factory()
        policy.reset(self.spec, 1)
        kv = RequestKV(
            key=(row, self.generation(row)), spec=self.spec, row=self.req_to_token_pool.req_to_token[row],
            length=length, protected=protected, pool=self.pool, allocator=self.allocator, runtime=self.runtime,
            page_size=self.page_size, on_freed=self._note_freed,
        )  # fmt: skip
        tracked = TrackedRequest(row, self.generation(row), policy, policy.requirements(), kv)
        self._requests[row] = tracked
        return tracked

    def release(self, row: int) -> None:
        """Forget ``row``'s request and drop its host copies (its slots are SGLang's to free)."""
        self._chunking.pop(row, None)
        tracked = self._requests.pop(row, None)
        if tracked is not None:
            kv = tracked.kv
            if kv.head_major:
                logger.info(
                    "hcpolicy: request in row %d released %d head-major pages (%d rows) for %d positions; "
                    "%d prompt slots had gone back at compression", row, kv.pages.num_pages, kv.device_tokens(),
                    kv.length, kv.freed_slots,
                )  # fmt: skip
            tracked.kv.release()

    def __iter__(self) -> Iterator[TrackedRequest]:
        return iter(list(self._requests.values()))

    def __len__(self) -> int:
        return len(self._requests)


def model_spec(model_config: Any, tp_size: int = 1) -> ModelSpec:
    """The attention geometry of an SGLang ``ModelConfig``, whole (``tp_size`` 1) or as one
    tensor-parallel rank sees it (its slice of the query and KV heads)."""
    hf = model_config.hf_config
    architectures = getattr(hf, "architectures", None) or ["unknown"]
    kv_heads = model_config.get_num_kv_heads(1)
    if tp_size > 1 and kv_heads % tp_size:
        raise ValueError(
            f"hcpolicy's SGLang backend splits KV heads over ranks: {kv_heads} KV heads do not split over "
            f"--tp-size {tp_size} (SGLang would replicate them); use a --tp-size dividing {kv_heads}"
        )
    return ModelSpec(
        architecture=architectures[0],
        num_layers=model_config.num_hidden_layers,
        num_query_heads=model_config.num_attention_heads // tp_size,
        num_kv_heads=kv_heads // tp_size,
        head_dim=model_config.head_dim,
        max_position=model_config.context_len,
    )
