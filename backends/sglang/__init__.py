"""SGLang backend: an ``sglang.srt.plugins`` entry point that applies a policy per request.

    pip install hcpolicy[sglang]
    HCPOLICY_POLICY=snapkv HCPOLICY_COMPRESSION=0.5 python -m sglang.launch_server \\
        --model-path M --attention-backend hcpolicy_triton --radix-cache-backend hcpolicy \\
        --disable-cuda-graph

How a policy's actions map onto SGLang (0.5.23):

- SGLang's KV is token-major: ``req_to_token[row, p]`` is the slot of position p, and a
  slot holds that token for every layer and KV head. While a prompt is computed, what a
  policy keeps per (layer, KV head) is visibility over the row (``request_kv.RequestKV``);
- after the prompt's last layer, a request whose policy acted moves to head-major pages
  (``head_pages.HeadPages``): each (layer, KV head) keeps exactly its rows, packed into
  pages of SGLang's own pool (an SGLang page of P slots is P x H_kv rows of one head in
  each layer), and every page no layer needs goes back to SGLang's allocator. The row's
  entries become 0 (SGLang's padding slot), so SGLang's scheduler admits against the
  memory the policy really freed. Decode attends through the paged split-K kernel
  (``hcpolicy.kernels.paged_decode``, the engine's kernel), and SGLang's slot for each new
  token becomes the request's page;
- ``seq_lens`` stay logical, so positions and RoPE are right after any eviction;
- offload and recall copy (layer, head) rows through ``hcpolicy.runtime``; a recall moves
  the head's rows into fresh pages;
- the radix tree never holds a compressed row: checkpoints stop at the tree's own part
  (``cache_protected_len``), whose slots a policy never frees or overwrites (``radix.py``);
- requests the policy leaves untouched keep SGLang's own path and kernels.

Importing this package imports no sglang; ``plugin.register`` and the modules it loads do.
"""

from .backend import SGLangBackend
from .config import PolicyConfig

__all__ = ["PolicyConfig", "SGLangBackend"]
