"""The triton zero-copy path, run on the CPU: its host logic (windows, word choice,
request tables, index uploads) against host memory, with the kernel replaced by a torch
replay of what it does (``reference_gather_rows``) or by the real kernel under Triton's
interpreter. Shared by ``test_runtime_gather_cpu`` and the interpreter subprocess."""

from __future__ import annotations

import ctypes
import sys
import types

import torch

from hcpolicy.runtime import hostops
from hcpolicy.runtime.counters import Tally
from hcpolicy.runtime.paths import ZeroCopyPath
from hcpolicy.runtime.plan import RecallRequest
from hcpolicy.runtime.store import HostBlock
from hcpolicy.runtime.window import Window, WindowCache


def _raw(ptr: int, words: int, dtype: torch.dtype) -> torch.Tensor:
    """[words] of ``dtype`` at address ``ptr``, past the end of any tensor (as the kernel)."""
    nbytes = words * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=dtype)


def reference_gather_rows(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor, table: torch.Tensor | None,
                          row_words: int, ctas: int, warps: int, tile_words: int) -> None:
    """What ``_triton_gather.gather_rows`` does, in torch, on CPU addresses."""
    n = rows.numel()
    i = torch.arange(n)
    if table is None:
        s, d = rows * row_words, i * row_words
    else:
        firsts, src_base, dst_base = table.view(3, -1)
        req = torch.searchsorted(firsts, i, right=True) - 1  # [N] each row's request
        s = src_base[req] + rows * row_words
        d = dst_base[req] + (i - firsts[req]) * row_words
    cols = torch.arange(row_words)
    src_raw = _raw(src.data_ptr(), int(s.max()) + row_words, src.dtype)
    dst_raw = _raw(dst.data_ptr(), int(d.max()) + row_words, dst.dtype)
    dst_raw[(d[:, None] + cols).flatten()] = src_raw[(s[:, None] + cols).flatten()]


class HostIndices:
    """IndexRing stand-in: its host side (``hostops.concat``) without the DMA."""

    def upload(self, parts: list[torch.Tensor], device: torch.device, tally: Tally) -> torch.Tensor:
        return hostops.concat(parts)


def run_triton_path_on_cpu(gather_rows, seed: int, ctas: int = 3, warps: int = 4, tile_words: int = 64) -> None:
    """Random blocks (several row sizes, odd spacing) and requests (pages and single rows,
    outs carved from one pool at odd offsets, or separate), through ``ZeroCopyPath``'s triton
    branch with ``gather_rows`` as its kernel; checks every byte and that pool gaps stay."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=gen))

    arena = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen)
    blocks, at = [], 0
    for k in range(randint(1, 7)):
        rowbytes = [1, 6, 8, 12, 30, 512][randint(0, 6)]
        rows = randint(1, 40)
        at += randint(0, 100)
        blocks.append(HostBlock(k, arena[at : at + rows * rowbytes], torch.uint8, (rowbytes,), rows, seq=k))
        at += rows * rowbytes
    pool = torch.zeros(1 << 14, dtype=torch.uint8)
    reqs, used = [], randint(0, 3)
    for _ in range(randint(1, 9)):
        b = blocks[randint(0, len(blocks))]
        if randint(0, 2):  # pages of 4 rows
            firsts = torch.randint(0, max(1, b.rows - 3), (randint(1, 5),), generator=gen)
            rows = (firsts[:, None] + torch.arange(4)).flatten().clamp_(max=b.rows - 1)
        else:
            rows = torch.randint(0, b.rows, (randint(1, 12),), generator=gen)
        nbytes = rows.numel() * b.rowbytes
        if randint(0, 3):
            out = pool[used : used + nbytes].view(rows.numel(), b.rowbytes)
            used += nbytes + randint(0, 5)
        else:
            out = torch.empty(rows.numel(), b.rowbytes, dtype=torch.uint8)
        reqs.append(RecallRequest(b, rows, out))
    written = torch.zeros_like(pool, dtype=torch.bool)
    for r in reqs:
        if r.out.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr():
            start = r.out.data_ptr() - pool.data_ptr()
            written[start : start + r.nbytes] = True

    module = types.ModuleType("hcpolicy.runtime._triton_gather")
    module.gather_rows = gather_rows  # type: ignore[attr-defined]
    saved_module, saved_flat = sys.modules.get(module.__name__), Window.device_flat
    sys.modules[module.__name__] = module
    Window.device_flat = lambda self, device: self.host_flat()  # type: ignore[method-assign]
    try:
        windows = WindowCache()
        path = ZeroCopyPath(torch.device("cpu"), Tally(), "triton", ctas, warps, tile_words, windows, HostIndices())
        path.issue(reqs)
        path.issue(reqs)  # again through the cached windows
    finally:
        Window.device_flat = saved_flat  # type: ignore[method-assign]
        if saved_module is None:
            del sys.modules[module.__name__]
        else:
            sys.modules[module.__name__] = saved_module
    for r in reqs:
        assert torch.equal(r.out, r.block.typed()[r.rows]), (r.block.rowbytes, r.rows)
    assert not bool(pool[~written].any()), "the gather wrote outside the outs"
    c = path.tally.snapshot()
    sizes = {r.block.rowbytes for r in reqs}
    assert c.gathers == 2 * len(sizes) and c.h2d_bytes == 2 * sum(r.nbytes for r in reqs)
