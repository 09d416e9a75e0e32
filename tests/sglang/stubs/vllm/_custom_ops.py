"""Stand-in for the one vllm op SGLang 0.5.23 imports on a plain-CPU torch.

``sglang.srt.layers.rotary_embedding.RotaryEmbedding.__init__`` imports
``vllm._custom_ops.rotary_embedding`` as its fallback kernel on any platform that is not
CUDA, HIP, SGLang's CPU engine (which needs sgl_kernel's CPU build), XPU, NPU, MUSA or
MPS; that kernel runs only in ``forward_cuda``. On this CPU the layer runs
``forward_native``, so the op is never called, and calling it fails loudly.
"""


def rotary_embedding(*args: object, **kwargs: object) -> None:
    raise RuntimeError("vllm is stubbed out in hcpolicy's sglang tests; rotary_embedding must not run on the CPU")
