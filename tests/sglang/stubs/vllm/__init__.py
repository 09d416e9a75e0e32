"""Import-only stand-in for vllm (see ``_custom_ops``)."""
