"""``TransferRuntime.reading_rows``: host blocks lent to a caller's own kernel."""

import pytest
import torch

from hcpolicy.runtime import TransferRuntime

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_lent_rows_are_the_offloaded_bytes(device: str) -> None:
    rt = TransferRuntime(device)
    gen = torch.Generator().manual_seed(0)
    blocks = {key: torch.randn(n, 2, 8, generator=gen).to(torch.bfloat16).to(device)
              for key, n in (("a", 5), ("b", 9), ("c", 3))}  # fmt: skip
    for key, src in blocks.items():
        rt.offload(key, src)
    keys = ["c", "a", "b", "a"]  # any order, repeats allowed
    with rt.reading_rows(keys) as view:
        words = [view.flat[view.starts[i] : view.starts[i] + view.rows[i] * view.row_words] for i in range(len(keys))]
        got = [w.clone() for w in words]  # read on the recall stream, inside the block
    rt.wait(view.transfer)
    assert view.rows == (3, 5, 9, 5)
    for key, w in zip(keys, got):
        want = blocks[key].contiguous().view(-1).view(torch.uint8).view(view.word)
        assert torch.equal(w.to(device), want)


def test_reading_rows_errors() -> None:
    rt = TransferRuntime("cpu")
    rt.offload("a", torch.zeros(4, 2, 8))
    rt.offload("wide", torch.zeros(4, 2, 16))
    with pytest.raises(KeyError, match="never offloaded"):
        with rt.reading_rows(["a", "nope"]):
            pass
    with pytest.raises(ValueError, match="one row size"):
        with rt.reading_rows(["a", "wide"]):
            pass
    with pytest.raises(ValueError, match="at least one key"):
        with rt.reading_rows([]):
            pass


def test_count_h2d_adds_to_the_counters() -> None:
    rt = TransferRuntime("cpu")
    rt.count_h2d(1234)
    assert rt.counters().h2d_bytes == 1234
