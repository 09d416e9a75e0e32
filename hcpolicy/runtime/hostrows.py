"""HostRows: several keys' host blocks lent to a caller's own gather kernel.

The runtime's recall paths copy rows into ``out`` tensors. A backend whose destination is
scattered (a paged pool, say) or that mixes host rows with rows it already holds would
need a scratch copy and a second pass; instead it can read the host blocks itself inside
``TransferRuntime.reading_rows``: the blocks of one row size as one flat array of words
(on CUDA a zero-copy view of the pinned range, so its loads cross PCIe), with the word
offset of each key's row 0. The runtime keeps ordering and lifetime: the reads start after
the blocks' offloads, run on its recall stream, and an evicted block stays alive until
they are done.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from hcpolicy.runtime.transfer import Transfer


@attrs.define(eq=False)
class HostRows:
    """flat: [words] of ``word`` (bit copies: an integer dtype); row r of key i is
    ``flat[starts[i] + r * row_words : ... + row_words]``, r < rows[i]. ``transfer``: set
    when the ``reading_rows`` block exits (the event the readers' results wait for)."""

    flat: torch.Tensor
    starts: tuple[int, ...]
    rows: tuple[int, ...]
    row_words: int
    word: torch.dtype
    transfer: Optional[Transfer] = None
