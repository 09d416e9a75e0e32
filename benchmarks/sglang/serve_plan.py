"""What ``serve.py`` runs: model shapes, one ``EngineRun`` per fresh ``sglang.Engine``, and
the keyword arguments and environment each Engine gets.

Pure data and arithmetic: nothing here imports sglang or torch, so ``--dry-run`` works
anywhere. One ``EngineRun`` is one Engine (one model, one policy, one CUDA-graph setting);
the measurements that share those run in it one after another (weights do not change the
speed of a random model, so the exactness check and the timings share one start-up).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLAIN = "plain"  # SGLang as shipped: no plugin loaded at all
MEASURES = ("exact", "throughput", "admission")

# Llama-3.1-8B's shape (random weights; SGLang's load_format="dummy" writes none to disk).
LLAMA8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}  # fmt: skip
# Small enough to start fast, large enough for SGLang's Triton kernels (head_dim 64, GQA 2).
TINY = {
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048, "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
}  # fmt: skip
MODELS = {"tiny": TINY, "llama8b": LLAMA8B}


def llama_config(shape: dict[str, Any]) -> dict[str, Any]:
    """A complete Llama ``config.json`` for ``shape`` (no tokenizer, no weights)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False, **shape,
    }  # fmt: skip


def write_model_dir(model: str, root: Path) -> Path:
    """``root/model/config.json``: all SGLang needs to build a dummy-weight model."""
    path = root / model
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(llama_config(MODELS[model]), indent=1) + "\n")
    return path


@dataclass(frozen=True)
class Settings:
    """The CLI's choices that every Engine shares (so plain and plugin runs compare)."""

    mem_fraction_static: float = 0.85
    page_size: int = 1
    chunked_prefill_size: int | None = None  # None: SGLang's default for the GPU
    context_length: int | None = None  # None: the model's max_position_embeddings
    max_running_requests: int | None = None  # None: SGLang sizes it
    max_total_tokens: int | None = None  # None: from mem_fraction_static (the CPU needs a cap)
    attention: str = "triton"  # SGLang's backend; the plugin wraps it as hcpolicy_<attention>
    device: str = "cuda"
    decode_log_interval: int = 10
    compression: float = 0.5
    seed: int = 0
    cuda_graph_max_bs: int | None = None
    extra_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Measure:
    """One measurement inside an Engine; ``kind`` is one of ``MEASURES``."""

    kind: str
    prompt_lens: tuple[int, ...]  # one request per entry
    max_new: int
    label: str = ""


@dataclass(frozen=True)
class EngineRun:
    name: str
    model: str
    policy: str  # 'plain' or an hcpolicy policy name
    cuda_graph: bool
    measures: tuple[Measure, ...]
    reinit_weights: bool  # unit-scale random weights (exactness needs attention to matter)
    settings: Settings = field(default_factory=Settings)

    def engine_kwargs(self, model_path: str) -> dict[str, Any]:
        """The ``sglang.Engine(**kwargs)`` of this run."""
        s = self.settings
        kw: dict[str, Any] = {
            "model_path": model_path, "load_format": "dummy", "skip_tokenizer_init": True, "dtype": "bfloat16",
            "device": s.device, "attention_backend": s.attention, "sampling_backend": "pytorch",
            "grammar_backend": "none", "bf16_gemm_backend": "torch", "disable_flashinfer_autotune": True,
            "disable_cuda_graph": not self.cuda_graph, "page_size": s.page_size,
            "mem_fraction_static": s.mem_fraction_static, "random_seed": s.seed, "log_level": "info",
            "decode_log_interval": s.decode_log_interval,
        }  # fmt: skip
        if self.policy != PLAIN:
            kw["attention_backend"] = "hcpolicy_" + s.attention
            kw["radix_cache_backend"] = "hcpolicy"
        if self.reinit_weights:
            kw["custom_weight_loader"] = ["serve_weights.reinit"]
        optional = {
            "chunked_prefill_size": s.chunked_prefill_size, "context_length": s.context_length,
            "max_running_requests": s.max_running_requests, "max_total_tokens": s.max_total_tokens,
            "cuda_graph_max_bs_decode": s.cuda_graph_max_bs if self.cuda_graph else None,
        }  # fmt: skip
        kw.update({k: v for k, v in optional.items() if v is not None})
        return kw

    def env(self, profile: str | None) -> dict[str, str]:
        """Environment for the Engine's process (the scheduler inherits it). Plain runs
        load no ``sglang.srt.plugins`` entry point at all (SGLANG_PLUGINS whitelists none)."""
        env = {"SGLANG_LOG_MS": "1", **dict(self.settings.extra_env)}
        if self.policy == PLAIN:
            env["SGLANG_PLUGINS"] = "none"
        else:
            env["SGLANG_PLUGINS"] = "hcpolicy"
            env["HCPOLICY_POLICY"] = self.policy
            env["HCPOLICY_COMPRESSION"] = str(self.settings.compression)
            if profile is not None:
                env["HCPOLICY_PROFILE"] = profile
        return env

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineRun":
        d = json.loads(text)
        s = d.pop("settings")
        s["extra_env"] = tuple(tuple(kv) for kv in s["extra_env"])
        measures = tuple(Measure(**{**m, "prompt_lens": tuple(m["prompt_lens"])}) for m in d.pop("measures"))
        return cls(**d, measures=measures, settings=Settings(**s))


@dataclass(frozen=True)
class Plan:
    """What the CLI asked for; ``engine_runs`` expands it."""

    runs: tuple[str, ...]
    policies: tuple[str, ...]
    cuda_graphs: tuple[bool, ...]
    exact_models: tuple[str, ...] = ("tiny", "llama8b")
    model: str = "llama8b"  # for throughput and admission
    exact_prompts: tuple[int, ...] = (16, 100, 333, 1000)
    exact_steps: int = 32
    exact_large_prompts: tuple[int, ...] = (128, 2048)
    exact_large_steps: int = 16
    throughput_context: int = 32768
    batches: tuple[int, ...] = (1, 8)
    max_new: int = 128
    context: int = 32768
    admission_requests: int = 48
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        bad = [r for r in self.runs if r not in MEASURES]
        if bad or not self.runs:
            raise ValueError(f"--runs takes {', '.join(MEASURES)}; got {', '.join(self.runs) or 'nothing'}")
        if not self.policies:
            raise ValueError("--policies is empty")
        for m in (*self.exact_models, self.model):
            if m not in MODELS:
                raise ValueError(f"unknown model {m!r}; choices: {', '.join(MODELS)}")
        if self.max_new < 2 or min(self.batches, default=1) < 1 or self.admission_requests < 1:
            raise ValueError("--max-new must be >= 2, batch sizes and --admission-requests >= 1")

    def _check_fits(self, model: str, measures: list[Measure]) -> None:
        limit = self.settings.context_length or MODELS[model]["max_position_embeddings"]
        for m in measures:
            if max(m.prompt_lens) + m.max_new > limit:
                raise ValueError(f"{m.kind} {m.label}: {max(m.prompt_lens)} prompt + {m.max_new} new tokens "
                                 f"exceed the {model} model's context of {limit} tokens")  # fmt: skip

    def engine_runs(self) -> list[EngineRun]:
        """One Engine per (cuda graph, policy, model); plain first so the others compare to it."""
        policies = sorted(self.policies, key=lambda p: p != PLAIN)
        out = []
        for graph in self.cuda_graphs:
            for policy in policies:
                by_model: dict[str, list[Measure]] = {}
                if "exact" in self.runs and policy in (PLAIN, "full"):  # lossy policies differ by design
                    for model in self.exact_models:
                        big = model != "tiny"
                        by_model.setdefault(model, []).append(Measure(
                            "exact", self.exact_large_prompts if big else self.exact_prompts,
                            self.exact_large_steps if big else self.exact_steps, label=model))  # fmt: skip
                if "throughput" in self.runs:
                    for b in self.batches:
                        by_model.setdefault(self.model, []).append(
                            Measure("throughput", (self.throughput_context,) * b, self.max_new, label=f"b{b}"))
                if "admission" in self.runs:
                    by_model.setdefault(self.model, []).append(Measure(
                        "admission", (self.context,) * self.admission_requests, self.max_new, label="admission"))
                for model, measures in by_model.items():
                    self._check_fits(model, measures)
                    tag = f"{policy}-{model}-graph{'on' if graph else 'off'}"
                    exact = any(m.kind == "exact" for m in measures)
                    out.append(EngineRun(tag, model, policy, graph, tuple(measures), exact, self.settings))
        return out
