"""Asynchronous KV transfer runtime shared by every backend.

A pinned host store keyed by the caller (e.g. ``(layer, kv_head)``), async device<->host
copies on dedicated CUDA streams ordered with events, coalesced recalls of scattered rows,
and a CPU implementation with the same API and results::

    rt = TransferRuntime("cuda")
    rt.offload((layer, head), kv)              # kv: [L, 2, D] on the GPU
    t = rt.recall((layer, head), rows, out)    # rows: [n] int64, out: [n, 2, D]
    rt.wait(t)                                 # the current stream waits, the host does not
"""

from hcpolicy.runtime.counters import TransferCounters
from hcpolicy.runtime.runtime import RECALL_MODES, GatherKernel, HostEntry, RecallMode, Request, TransferRuntime
from hcpolicy.runtime.streams import RECALL_PRIORITIES, RecallPriority
from hcpolicy.runtime.store import HostAlloc, HostAllocationError
from hcpolicy.runtime.transfer import Transfer

__all__ = [
    "RECALL_MODES",
    "RECALL_PRIORITIES",
    "GatherKernel",
    "HostAlloc",
    "HostAllocationError",
    "HostEntry",
    "RecallMode",
    "RecallPriority",
    "Request",
    "Transfer",
    "TransferCounters",
    "TransferRuntime",
]
