"""How HeteroCache's prefill_window default was chosen: last token (1) against the max over
the last 32 prompt queries, under the `aware` protocol, on held-out samples (seed 1; the
committed evaluation in examples/results/smollm2-2k uses seed 0), default model, 2K
tokens, 20 samples per task, batch 8, C = 0.5:

    python examples/prefill_window_probe.py examples/results/prefill_window_seed1

Writes results.json / results.csv there and prints each window's task points.
"""

import sys
from pathlib import Path

from hcpolicy.backends.hf.backend import HFBackend
from hcpolicy.eval.results import ResultStore
from hcpolicy.eval.runner import EvalPlan, run
from hcpolicy.eval.tasks import TASKS
from hcpolicy.policy.factory import default_profile_path
from hcpolicy.policy.heterocache import HeteroCachePolicy
from hcpolicy.profile import HeadProfile

WINDOWS = {"heterocache-w1": 1, "heterocache-w32": 32}


def main(out: Path) -> None:
    generator = HFBackend.evaluator(None)
    profile = HeadProfile.load(default_profile_path(generator.model_name), spec=generator.backend.spec)

    def factory(name: str, compression: float) -> HeteroCachePolicy:
        return HeteroCachePolicy(profile=profile, compression=compression, prefill_window=WINDOWS[name])

    plan = EvalPlan(policies=tuple(WINDOWS), compressions=(0.5,), tasks=tuple(TASKS.names()), protocols=("aware",),
                    context_length=2048, samples=20, seed=1, batch_size=8)  # fmt: skip
    store = ResultStore(out)
    run(plan, generator, factory, store)
    for name in WINDOWS:
        points = sum(100 * r.score for r in store.records if r.policy == name)
        print(f"{name}: {points:.2f} task points over {len(plan.tasks)} tasks")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "hc-prefill-window"))
