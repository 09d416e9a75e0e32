"""Random programs of offload / recall / recall_many / evict, checked against a model.

Shared by the CPU property tests and the GPU tests: the same program must give the same
bytes on every device and recall mode.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from hcpolicy.runtime import TransferRuntime

KEYS = ("a", ("b", 1), 2)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64, torch.uint8)
ROW_SHAPES = ((2, 4), (3,), (2, 3, 5), ())


def random_tensor(length: int, row_shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[length, *row_shape] of random bytes (floats may hold NaNs: compare bytes)."""
    elems = length * int(torch.Size(row_shape).numel())
    nbytes = elems * torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(length, *row_shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


_rows = st.one_of(
    st.lists(st.integers(0, 10**6), max_size=12),  # scattered, repeats allowed
    st.tuples(st.integers(0, 10**6), st.integers(1, 20), st.integers(1, 4)).map(
        lambda t: ("pages", *t)
    ),  # a few runs of consecutive rows, like 16-token pages
)

# A key is a KEYS entry, or ("live", i): the i-th key present when the op runs (most
# recalls and evictions should hit a live key; the rest check the KeyError paths).
_key = st.one_of(st.sampled_from(KEYS), st.integers(0, 5).map(lambda i: ("live", i)))
_live_key = st.integers(0, 5).map(lambda i: ("live", i))
_op = st.one_of(
    st.tuples(st.just("offload"), st.sampled_from(KEYS), st.sampled_from(DTYPES), st.integers(1, 40),
              st.sampled_from(ROW_SHAPES), st.integers(0, 2**31)),
    st.tuples(st.just("recall"), _key, _rows),
    st.tuples(st.just("recall"), _live_key, _rows),
    st.tuples(st.just("recall_many"), st.lists(st.tuples(_key, _rows), min_size=1, max_size=4)),
    st.tuples(st.just("recall_many"), st.lists(st.tuples(_live_key, _rows), min_size=1, max_size=4)),
    st.tuples(st.just("evict"), _key),
)
programs = st.lists(_op, min_size=1, max_size=25)


def _materialise(spec: Any, length: int) -> torch.Tensor:
    if isinstance(spec, tuple):  # ("pages", start, page, count)
        _, start, page, count = spec
        firsts = [(start + 7919 * i) % length for i in range(count)]
        rows = [min(f + j, length - 1) for f in firsts for j in range(page)]
    else:
        rows = [r % length for r in spec]
    return torch.tensor(rows, dtype=torch.int64)


def run_program(rt: TransferRuntime, program: list[tuple], rows_on_device: bool = False) -> int:
    """Execute ``program``; check every recalled byte and every error. Returns #recalls."""
    model: dict[Any, torch.Tensor] = {}  # key -> CPU reference [L, *row]
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (out on device, expected CPU)
    dev = rt.device

    def request(key: Any, spec: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        ref = model[key]
        rows = _materialise(spec, ref.shape[0])
        out = torch.empty((rows.numel(), *ref.shape[1:]), dtype=ref.dtype, device=dev)
        pending.append((out, ref[rows]))
        return key, rows.to(dev) if rows_on_device else rows, out

    def resolve(key: Any) -> Any:
        if isinstance(key, tuple) and key[0] == "live":
            live = [k for k in KEYS if k in model]
            return live[key[1] % len(live)] if live else "never-offloaded"
        return key

    for op in program:
        kind, key = op[0], resolve(op[1])
        if kind == "offload":
            _, key, dtype, length, row_shape, seed = op
            src = random_tensor(length, row_shape, dtype, seed)
            if key in model:
                _expect(ValueError, rt.offload, key, src.to(dev))
                continue
            rt.offload(key, src.to(dev))  # the device copy is dropped at once: rt keeps it
            model[key] = src
        elif kind == "evict":
            if key in model:
                rt.evict(key)
                del model[key]
            else:
                _expect(KeyError, rt.evict, key)
        elif kind == "recall":
            if key not in model:
                _expect_key_error(rt, key)
                continue
            rt.recall(*request(key, op[2]))
        else:
            batch = [(resolve(k), spec) for k, spec in op[1]]
            if any(k not in model for k, _ in batch):
                _expect_key_error(rt, next(k for k, _ in batch if k not in model))
                continue
            rt.recall_many([request(k, spec) for k, spec in batch])
        assert len(rt) == len(model) and all(k in rt for k in model)
        assert rt.host_bytes() == sum(t.numel() * t.element_size() for t in model.values())

    rt.synchronize()
    for out, expected in pending:
        assert torch.equal(as_bytes(out), as_bytes(expected))
    return len(pending)


def _expect(exc: type[Exception], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except exc:
        return
    raise AssertionError(f"{fn.__name__}{args!r} did not raise {exc.__name__}")


def _expect_key_error(rt: TransferRuntime, key: Any) -> None:
    rows = torch.zeros(1, dtype=torch.int64)
    out = torch.empty(1, device=rt.device)
    try:
        rt.recall(key, rows, out)
    except KeyError as err:
        assert repr(key) in str(err)
        return
    raise AssertionError(f"recall of {key!r} did not raise KeyError")
