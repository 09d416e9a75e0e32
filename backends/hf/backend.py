"""HFBackend: run a transformers causal LM with a policy-driven HeadwiseCache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from hcpolicy.actions import Attend, Offload, Recall, Select
from hcpolicy.capabilities import Capabilities, unmet
from hcpolicy.policy.base import Policy
from hcpolicy.spec import ModelSpec

from . import compat
from .attention import NAME, hcpolicy_attention
from .cache import HeadwiseCache

if TYPE_CHECKING:
    from hcpolicy.profile import HeadProfile
    from hcpolicy.profiler import ProfileConfig

    from .evaluate import HFEvaluator


class HFBackend:
    """Hugging Face transformers: per-head KV lengths, host offload and recall, generate()."""

    name = "hf"
    capabilities = Capabilities(
        actions={Select, Offload, Recall, Attend}, per_head_lengths=True, max_batch_size=None, cuda_graphs=False
    )

    def __init__(self, model: torch.nn.Module, *, headroom: int = 32) -> None:
        self.model = model
        self.spec: ModelSpec = compat.model_spec(model)
        self.headroom = headroom

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype_bytes(self) -> int:
        return next(self.model.parameters()).element_size()

    def check(self, policy: Policy | None) -> None:
        """Raise ValueError if this backend cannot serve ``policy``."""
        if policy is None:
            return
        reasons = unmet(self.capabilities, policy.requirements())
        if reasons:
            raise ValueError(f"the hf backend cannot serve {type(policy).__name__}: " + "; ".join(reasons))

    def check_input(self, input_ids: Any, attention_mask: torch.Tensor | None = None, *, cached: int = 0,
                    new_tokens: int | None = None) -> None:  # fmt: skip
        """Raise ValueError for input the model cannot run, before transformers or a policy
        fails on it deep inside: ``input_ids`` [B, L] after ``cached`` tokens, then
        ``new_tokens`` to generate. The padding check reads the mask once, at the prompt."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, tokens] tensor of token ids, got {shape}")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise ValueError(f"the input is empty (input_ids of shape {(batch, length)}): give each sequence a token")
        limit, total = self.spec.max_position, cached + length
        if limit is not None and total > limit:
            held = f"{cached} cached + {length} new tokens" if cached else f"the prompt of {length} tokens"
            raise ValueError(f"{held} exceed the model's context of {limit} tokens: shorten the prompt")
        if limit is not None and new_tokens is not None and total + new_tokens > limit:
            raise ValueError(f"the prompt ({total} tokens) + max_new_tokens ({new_tokens}) exceed the model's "
                             f"context of {limit} tokens: shorten the prompt or generate fewer tokens")  # fmt: skip
        if cached == 0 and isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            empty = (~attention_mask.bool().any(dim=-1)).nonzero().flatten().tolist()  # the one host read
            if empty:
                raise ValueError(f"sequences {empty} of the batch are all padding (no 1 in their attention_mask "
                                 "row): drop them or give each at least one token")  # fmt: skip

    @contextmanager
    def attach(self) -> Iterator["HFBackend"]:
        """Route the model's attention through hcpolicy for the duration of the block.

        Registers the ``"hcpolicy"`` attention function, switches the model to it, and on
        exit restores the model's previous implementation and unregisters the function if
        this block registered it.
        """
        registered_here = not compat.attention_registered(NAME)
        if registered_here:
            compat.register_attention(NAME, hcpolicy_attention)
        previous = compat.attn_implementation(self.model)
        try:
            compat.set_attn_implementation(self.model, NAME)
            yield self
        finally:
            compat.set_attn_implementation(self.model, previous)
            if registered_here:
                compat.unregister_attention(NAME)

    def new_cache(
        self, policy: Policy | None, *, record_window: int | None = 0, headroom: int | None = None,
        reuse_resident: bool = True,
    ) -> HeadwiseCache:
        """A cache for one generation; pass it to the model inside ``attach()``.

        headroom: spare rows per head for tokens appended after compression (the expected
        new tokens avoid any regrowth); default: the backend's. reuse_resident: see
        ``HeadwiseCache``."""
        self.check(policy)
        return HeadwiseCache(
            self.spec, policy, device=self.device, headroom=self.headroom if headroom is None else headroom,
            record_window=record_window, reuse_resident=reuse_resident,
        )  # fmt: skip

    def prefill(self, input_ids: torch.Tensor, policy: Policy | None, *, headroom: int | None = None,
                **kwargs: Any) -> HeadwiseCache:  # fmt: skip
        """A new cache holding ``input_ids`` [B, L], compressed by ``policy`` before anything
        follows them: a context compressed once, query-agnostic, that ``generate(cache=...)``
        then continues with questions. ``kwargs`` go to the forward (``attention_mask``)."""
        self.check_input(input_ids, kwargs.get("attention_mask"))
        cache = self.new_cache(policy, headroom=headroom)
        with torch.no_grad(), self.attach():
            self.forward(input_ids, cache, **kwargs)
        return cache

    def generate(
        self, input_ids: torch.Tensor, policy: Policy | None, *, cache: HeadwiseCache | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, HeadwiseCache]:
        """``model.generate`` with ``policy`` compressing the cache. Returns (sequences, cache).

        cache: continue this cache (from ``prefill`` or an earlier ``generate``) instead of a
        new one; ``input_ids`` then start with the tokens it holds, and its own policy keeps
        acting, so ``policy`` must be None or that same policy."""
        self.check_input(input_ids, kwargs.get("attention_mask"), new_tokens=kwargs.get("max_new_tokens"))
        if cache is None:
            cache = self.new_cache(policy, headroom=kwargs.get("max_new_tokens"))
        elif policy is not None and policy is not cache.policy:
            raise ValueError("generate(cache=...) continues that cache under its own policy: pass policy=None "
                             "or the policy the cache was made with")  # fmt: skip
        with self.attach():
            out = self.model.generate(input_ids, **{compat.cache_kwarg(self.model): cache}, **kwargs)
        return out, cache

    @staticmethod
    def model_name(model: str | None) -> str:
        """The ``model_name`` that ``evaluator(model)`` will report, known before loading."""
        from .loading import DEFAULT_MODEL

        return model or DEFAULT_MODEL

    @staticmethod
    def context_limit(model: str | None) -> int | None:
        """The most tokens ``model`` attends over, read from its config without loading it."""
        from .model_config import context_limit

        return context_limit(model)

    @classmethod
    def evaluator(cls, model: str | None) -> "HFEvaluator":
        """Load ``model`` (None: the embedded default) and wrap it for ``hc evaluate``."""
        from .evaluate import HFEvaluator
        from .loading import load

        loaded = load(model)
        return HFEvaluator(cls(loaded.model), loaded.tokenizer, loaded.name)

    @classmethod
    def profile(
        cls, model: str | None, config: "ProfileConfig", *, tokens: int, samples: int, seed: int = 0
    ) -> "HeadProfile":
        """Profile ``model`` on ``samples`` calibration documents of ``tokens`` tokens."""
        from hcpolicy.eval.calibration import calibration_texts

        from .loading import load
        from .profiling import calibration_ids, profile_model

        loaded = load(model)
        backend = cls(loaded.model)
        texts = calibration_texts(samples, tokens, lambda t: len(loaded.tokenizer(t)["input_ids"]), seed=seed)
        ids = calibration_ids(loaded.tokenizer, texts, tokens)
        settings = {"model": loaded.name, "calibration": f"{samples} generated documents, seed {seed}"}
        return profile_model(backend, ids, config, settings)

    def forward(self, input_ids: torch.Tensor, cache: HeadwiseCache, **kwargs: Any) -> Any:
        """One model forward over ``input_ids`` with ``cache`` (call inside ``attach()``)."""
        self.check_input(input_ids, kwargs.get("attention_mask"), cached=cache.get_seq_length())
        return self.model(input_ids, **{compat.cache_kwarg(self.model): cache}, use_cache=True, **kwargs)
