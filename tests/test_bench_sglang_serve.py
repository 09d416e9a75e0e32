"""benchmarks/sglang/serve.py's pure parts: the plan, SGLang log parsing, the client-side
windows and the comparison with plain SGLang (no sglang, no Engine)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "sglang"))

from serve import parse_args, plan_from_args  # noqa: E402
from serve_logs import decode_stats  # noqa: E402
from serve_measure import Trace, all_decoding, peak_overlap  # noqa: E402
from serve_report import compare  # noqa: E402


def test_plan_gives_plain_and_plugin_engines_the_same_settings():
    runs = plan_from_args(parse_args(["--policies", "heterocache,plain,full", "--batches", "1"])).engine_runs()
    assert [r.name for r in runs] == [  # plain first, then the order asked for
        "plain-tiny-graphoff", "plain-llama8b-graphoff", "heterocache-llama8b-graphoff", "full-tiny-graphoff",
        "full-llama8b-graphoff",
    ]  # fmt: skip
    plain, hetero = runs[1].engine_kwargs("m"), runs[2].engine_kwargs("m")
    assert plain["attention_backend"] == "triton" and "radix_cache_backend" not in plain
    assert hetero["attention_backend"] == "hcpolicy_triton" and hetero["radix_cache_backend"] == "hcpolicy"
    assert plain["mem_fraction_static"] == hetero["mem_fraction_static"]
    assert runs[1].env(None)["SGLANG_PLUGINS"] == "none"
    assert runs[2].env("p.json")["HCPOLICY_PROFILE"] == "p.json"
    assert [m.kind for m in runs[2].measures] == ["throughput", "admission"]  # no exactness for lossy policies


def test_plan_refuses_prompts_longer_than_the_model():
    with pytest.raises(ValueError, match="exceed"):
        plan_from_args(parse_args(["--model", "tiny", "--runs", "admission"])).engine_runs()


LOG = """\
[2026-12-07 22:27:36.100] Prefill batch, #new-seq: 1, #new-token: 512, #cached-token: 0, token usage: 0.25, #running-req: 0, #queue-req: 2, #pending-token: 0, cuda graph: False, input throughput (token/s): 1.00
[2026-12-07 22:27:36.354] Decode batch, #running-req: 2, #token: 126, token usage: 0.06, cuda graph: False, gen throughput (token/s): 53.76, #queue-req: 1
[2026-12-07 22:27:36.460] Decode batch, #running-req: 3, #token: 517, token usage: 0.25, cuda graph: False, gen throughput (token/s): 37.51, #queue-req: 0
[2026-12-07 22:27:36.493] Decode batch, #running-req: 3, #token: 521, token usage: 0.26, cuda graph: False, gen throughput (token/s): 122.56, #queue-req: 0
[2026-12-07 22:27:36.525] Decode batch, #running-req: 3, #token: 525, token usage: 0.27, cuda graph: False, gen throughput (token/s): 124.00, #queue-req: 0
"""


def test_decode_stats_reads_sglangs_batch_and_drops_the_first_line_of_a_stretch():
    s = decode_stats(LOG)
    assert (s["max_running"], s["lines"], s["prefill_batches"]) == (3, 4, 1)
    assert s["gen_tok_s"] == pytest.approx(123.28)  # median of 122.56 and 124.00; 37.51 held a prefill
    assert decode_stats(LOG, running=2)["gen_tok_s"] is None


def _trace(start: float, n: int) -> Trace:
    return Trace(times=[start + k for k in range(n)], counts=list(range(1, n + 1)), output_ids=[], retractions=0)


def test_client_windows():
    a, b = _trace(0.0, 10), _trace(4.0, 10)  # b decodes over [4, 13], a over [0, 9]
    both = all_decoding([a, b])
    assert both["window_s"] == 5.0 and both["window_tokens"] == 10 and both["tok_s"] == 2.0
    peak, rate = peak_overlap([a, b, _trace(20.0, 3)])
    assert peak == 2 and rate["window_s"] == 5.0


def test_compare_reports_the_first_differing_step():
    def engine(policy, ids):
        return {"policy": policy, "model": "tiny", "cuda_graph": False,
                "measures": [{"kind": "exact", "label": "tiny", "output_ids": ids}]}  # fmt: skip

    out = compare({"p": engine("plain", [[1, 2, 3], [4, 5]]), "f": engine("full", [[1, 2, 3], [4, 6]])})
    assert out["f"]["exact_tiny"] == {"identical": False, "mismatches": [[1, 1]]}
