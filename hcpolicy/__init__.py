"""hcpolicy: dynamic, head-heterogeneous KV-cache compression (HeteroCache) for LLM inference.

The policy core decides (``hcpolicy.policy``), backends execute (``hcpolicy.backends``), and
one transfer runtime moves the bytes (``hcpolicy.runtime``). Importing this package has no
side effects: nothing is patched, nothing is loaded.
"""

__version__ = "0.1.0"
