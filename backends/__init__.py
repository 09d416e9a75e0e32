"""Backend adapters, importable as ``hcpolicy.backends.<name>``.

Each backend consumes the actions a policy emits and feeds it observations. Heavy
dependencies (transformers, sglang) are imported only inside their own backend.
"""
