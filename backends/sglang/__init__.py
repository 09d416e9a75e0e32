"""SGLang backend: an ``sglang.srt.plugins`` entry point that applies a policy per request.

    pip install hcpolicy[sglang]
    HCPOLICY_POLICY=snapkv HCPOLICY_COMPRESSION=0.5 python -m sglang.launch_server \\
        --model-path M --attention-backend hcpolicy_triton --radix-cache-backend hcpolicy \\
        --page-size 1 --disable-cuda-graph --chunked-prefill-size -1

How a policy's actions map onto SGLang (0.5.23):

- SGLang's KV is token-major: ``req_to_token[row, p]`` is the slot of position p, and a
  slot holds that token for every layer and KV head. Per-(layer, head) budgets are
  therefore *visibility* (a mask per layer and head over the request's positions,
  ``request_kv.RequestKV``); a slot goes back to the allocator once no layer and head
  sees its token, and its row entry becomes 0 (SGLang's padding slot): the token has
  left the request's index map;
- ``seq_lens`` stay logical, so positions and RoPE are right after any eviction;
- offload and recall copy (layer, head) rows through ``hcpolicy.runtime``; a recall of
  a token whose slot was freed takes a fresh slot;
- the radix tree never holds a compressed row: checkpoints stop at the row's intact
  prefix (before the first freed or replaced slot), and a policy frees only slots the
  tree does not own, so the uncompressed shared prefix keeps being shared (``radix.py``);
- the attention wrapper (``attention.py``) serves untouched requests with SGLang's own
  backend and compressed ones with per-head masked SDPA over their live slots.

Importing this package imports no sglang; ``plugin.register`` and the modules it loads do.
"""

from .backend import SGLangBackend
from .config import PolicyConfig

__all__ = ["PolicyConfig", "SGLangBackend"]
