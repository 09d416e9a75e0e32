"""From the per-Engine results to what issue 15 asks: each policy against plain SGLang on
the same model and CUDA-graph setting, and a compact table."""

from __future__ import annotations

from typing import Any

from serve_plan import PLAIN


def _measures(engine: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {m["label"]: m for m in engine.get("measures", []) if m.get("kind") == kind and "error" not in m}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _tok_s(m: dict[str, Any]) -> float | None:
    return (m.get("client") or {}).get("tok_s")


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """[prompt index, first differing step] for each prompt whose tokens differ."""
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            out.append([i, next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))])
    return out


def compare_pair(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bx, ox = _measures(base, "exact"), _measures(other, "exact")
    for label in sorted(bx.keys() & ox.keys()):
        diff = first_mismatch(bx[label]["output_ids"], ox[label]["output_ids"])
        out[f"exact_{label}"] = {"identical": not diff, "mismatches": diff}
    bt, ot = _measures(base, "throughput"), _measures(other, "throughput")
    for label in sorted(bt.keys() & ot.keys()):
        b, o = bt[label], ot[label]
        out[f"throughput_{label}"] = {
            "tok_s": _tok_s(o), "plain_tok_s": _tok_s(b), "ratio": _ratio(_tok_s(o), _tok_s(b)),
            "ms_per_step": o["client"].get("ms_per_step"), "plain_ms_per_step": b["client"].get("ms_per_step"),
        }  # fmt: skip
    ba, oa = _measures(base, "admission").get("admission"), _measures(other, "admission").get("admission")
    if ba and oa:
        out["admission"] = {
            "max_running": oa["max_running"], "plain_max_running": ba["max_running"],
            "ratio": _ratio(oa["max_running"], ba["max_running"]),
            "tok_s_at_peak": _tok_s(oa), "plain_tok_s_at_peak": _tok_s(ba), "tok_s_ratio": _ratio(_tok_s(oa), _tok_s(ba)),
        }  # fmt: skip
    return out


def compare(engines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"<policy>-<model>-graph<on|off>": comparison with plain}`` for every pair that ran."""
    plain = {(e["model"], e["cuda_graph"]): e for e in engines.values() if e.get("policy") == PLAIN}
    out = {}
    for name, e in engines.items():
        base = plain.get((e.get("model"), e.get("cuda_graph")))
        if e.get("policy") != PLAIN and base is not None:
            out[name] = compare_pair(base, e)
    return out


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def measure_cell(m: dict[str, Any]) -> str:
    if "error" in m:
        return "ERROR " + m["error"].strip().splitlines()[-1][:70]
    head = f"n={m['requests']} P={','.join(map(str, m['prompt_lens']))} M={m['max_new']}"
    if m["kind"] == "exact":
        return f"{head}  first ids {m['output_ids'][0][:6]}"
    c, s = m.get("client") or {}, m.get("server") or {}
    tail = f"  retract={m['retractions']}" if m.get("retractions") else ""
    if m["kind"] == "throughput":
        return f"{head}  {_fmt(c.get('tok_s'))} tok/s ({_fmt(c.get('ms_per_step'), '.2f')} ms/step; log {_fmt(s.get('gen_tok_s'))}){tail}"
    return (f"{head}  running {m.get('max_running')} (client {m.get('client_max_overlap')})  "
            f"{_fmt(c.get('tok_s'))} tok/s at peak (log {_fmt(s.get('gen_tok_s'))}){tail}")  # fmt: skip


def table(doc: dict[str, Any]) -> str:
    rows = [f"{'engine':<28} {'start_s':>7} {'max_tokens':>10}  {'measure':<18} result"]
    for name, e in doc["engines"].items():
        info = e.get("info") or {}
        lead = f"{name:<28} {_fmt(e.get('startup_s'), '.0f'):>7} {info.get('max_total_num_tokens') or '-':>10}"
        if "error" in e and not e.get("measures"):
            rows.append(f"{lead}  {'(engine)':<18} ERROR {e['error'][:110]}")
        for m in e.get("measures", []):
            rows.append(f"{lead}  {m['kind'] + ' ' + m['label']:<18} {measure_cell(m)}")
            lead = " " * len(lead)
    for name, c in (doc.get("comparisons") or {}).items():
        parts = []
        for key, v in c.items():
            if key.startswith("exact_"):
                parts.append(f"{key}={'identical' if v['identical'] else 'DIFFER ' + str(v['mismatches'][:3])}")
            elif key.startswith("throughput_"):
                parts.append(f"{key} x{_fmt(v['ratio'], '.3f')}")
            else:
                parts.append(f"admission x{_fmt(v['ratio'], '.2f')} ({v['max_running']} vs {v['plain_max_running']}), "
                             f"tok/s at peak x{_fmt(v['tok_s_ratio'], '.2f')}")  # fmt: skip
        rows.append(f"vs plain: {name}: " + ("; ".join(parts) or "nothing comparable (see errors above)"))
    return "\n".join(rows)
