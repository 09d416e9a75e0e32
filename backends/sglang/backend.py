"""SGLangBackend: the ``hc`` registry's entry for the SGLang plugin (imports no sglang)."""

from __future__ import annotations

from typing import Any, NoReturn

from hcpolicy.actions import Attend, Offload, Recall, Select
from hcpolicy.capabilities import Capabilities

LAUNCH = (
    "HCPOLICY_POLICY=snapkv HCPOLICY_COMPRESSION=0.5 python -m sglang.launch_server --model-path M "
    "--attention-backend hcpolicy_triton --radix-cache-backend hcpolicy --disable-cuda-graph"
)


class SGLangBackend:
    """SGLang serving: a plugin applies a policy per request (head-major pages in SGLang's pool, offload)."""

    name = "sglang"
    # per-head lengths are real: a compressed request's (layer, head) rows are packed into
    # pages of SGLang's pool, and the pages it no longer needs go back to SGLang
    capabilities = Capabilities(
        actions={Select, Offload, Recall, Attend}, per_head_lengths=True, max_batch_size=None, cuda_graphs=False
    )

    @classmethod
    def evaluator(cls, model: str | None) -> NoReturn:
        raise ValueError(f"the sglang backend runs inside an SGLang server, not `hc evaluate`: {LAUNCH}")

    @classmethod
    def profile(cls, model: str | None, config: Any, **kwargs: Any) -> NoReturn:
        raise ValueError("profile with `hc profile --backend hf`; the profile then serves SGLang via HCPOLICY_PROFILE")
