"""RaggedKV: one layer's KV with a real, different length per (sequence, KV head).

Rows of all (b, h) segments live in one flat buffer ``kv [S, 2, D]`` (K and V of a token
side by side, so a recalled row lands in one copy). Segment (b, h) occupies rows
``start[b, h] : start[b, h] + length[b, h]`` and has room up to ``capacity[b, h]``. Rows
of a segment are in ascending logical position. Lengths and capacities are mirrored on
the host (they change only through Select/Recall, read once per action, and appends,
which are known in advance), so appending never reads the device.
"""

from __future__ import annotations

import torch

from hcpolicy.actions import head_index
from hcpolicy.observe import LayerCache


class RaggedKV:
    """Flat per-head storage. Build with ``from_dense`` or ``from_rows``."""

    def __init__(
        self,
        kv: torch.Tensor,
        positions: torch.Tensor,
        lengths: list[list[int]],
        capacities: list[list[int]],
    ) -> None:
        # kv: [S, 2, D]; positions: [S] int64
        self.kv = kv
        self.positions = positions
        self.host_lengths = lengths
        self.host_capacities = capacities
        self.batch_size = len(lengths)
        self.num_heads = len(lengths[0])
        starts, at = [], 0
        for row in capacities:
            starts.append([])
            for cap in row:
                starts[-1].append(at)
                at += cap
        self.host_starts = starts
        device = kv.device
        self.starts = torch.tensor(starts, dtype=torch.int64, device=device)  # [B, H]
        self.lengths = torch.tensor(lengths, dtype=torch.int64, device=device)  # [B, H]
        self._head_index: dict[tuple[int, ...], torch.Tensor] = {}  # heads -> [H'] on the device

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_rows(
        cls, kv_rows: torch.Tensor, pos_rows: torch.Tensor, lengths: list[list[int]], headroom: int
    ) -> "RaggedKV":
        """Pack padded rows: kv_rows [B, H, K, 2, D], pos_rows [B, H, K]; segment (b, h) keeps
        its first lengths[b][h] rows and gets ``headroom`` spare rows for appends."""
        b, h, k = pos_rows.shape
        capacities = [[n + headroom for n in row] for row in lengths]
        total = sum(map(sum, capacities))
        kv = kv_rows.new_zeros((total, 2, kv_rows.shape[-1]))
        positions = torch.zeros(total, dtype=torch.int64, device=kv_rows.device)
        out = cls(kv, positions, lengths, capacities)
        src, dst = out._segment_index(k)  # rows of the padded input -> rows of the flat buffer
        kv[dst] = kv_rows.reshape(b * h * k, 2, -1)[src]
        positions[dst] = pos_rows.reshape(-1)[src]
        return out

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, headroom: int) -> "RaggedKV":
        """keys, values: [B, H, L, D], positions 0..L-1 in every head."""
        b, h, length, _ = keys.shape
        kv_rows = torch.stack([keys, values], dim=3)  # [B, H, L, 2, D]
        pos_rows = torch.arange(length, device=keys.device).expand(b, h, length)
        return cls.from_rows(kv_rows, pos_rows, [[length] * h for _ in range(b)], headroom)

    def _segment_index(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a padded [B, H, width] layout: (flat source index, destination row) of every
        valid row, i < length[b][h]."""
        i = torch.arange(width, device=self.kv.device)
        valid = i < self.lengths.unsqueeze(-1)  # [B, H, width]
        src = torch.nonzero(valid.reshape(-1)).flatten()
        dst = (self.starts.unsqueeze(-1) + i).reshape(-1)[src]
        return src, dst

    # -- reading ------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return max(max(row) for row in self.host_lengths)

    def kept_rows(self) -> int:
        return sum(map(sum, self.host_lengths))

    def nbytes(self) -> int:
        """Bytes allocated on the device for K and V (capacity, not only kept rows)."""
        return self.kv.numel() * self.kv.element_size()

    def padded(self, heads: list[int] | None = None) -> LayerCache:
        """A padded view: keys/values [B, H', L_max, D] (a gathered copy), positions, lengths."""
        if heads is not None and len(heads) == 1 and self.batch_size == 1:
            # one head of one sequence is a contiguous run of rows: a view, no copy
            start, n = self.host_starts[0][heads[0]], self.host_lengths[0][heads[0]]
            rows = self.kv[start : start + n]  # [n, 2, D]
            return LayerCache(
                keys=rows[None, None, :, 0], values=rows[None, None, :, 1],
                positions=self.positions[start : start + n][None, None],
                lengths=self.lengths[:, heads[0] : heads[0] + 1],
            )  # fmt: skip
        starts, lengths = self.starts, self.lengths
        if heads is not None:
            starts, lengths = self.take_heads(starts, heads), self.take_heads(lengths, heads)
        width = max(1, self.max_length)
        i = torch.arange(width, device=self.kv.device)
        # clamp keeps padding reads inside the segment; those rows are masked by lengths
        rows = starts.unsqueeze(-1) + torch.minimum(i, (lengths - 1).clamp(min=0).unsqueeze(-1))  # [B, H', W]
        kv = self.kv[rows]  # [B, H', W, 2, D]
        return LayerCache(keys=kv[..., 0, :], values=kv[..., 1, :], positions=self.positions[rows], lengths=lengths)

    def take_heads(self, t: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """t[:, heads] for a [B, H, ...] device tensor without a host sync (indexing by a list
        copies the list to the device and waits for the stream): a view for consecutive
        heads, else an index kept on the device (made once per storage and head set)."""
        return t[:, head_index(heads, t.device, self._head_index)]

    # -- writing ------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, first_position: int, headroom: int) -> "RaggedKV":
        """Add Q new tokens to every segment. keys, values: [B, H, Q, D]. Returns the storage
        to use from now on (self, or a regrown copy when a segment is full)."""
        q = keys.shape[2]
        full = any(n + q > c for lr, cr in zip(self.host_lengths, self.host_capacities) for n, c in zip(lr, cr))
        store = self.regrow(q + headroom) if full else self
        j = torch.arange(q, device=keys.device)
        dst = (store.starts + store.lengths).unsqueeze(-1) + j  # [B, H, Q]
        store.kv[dst.reshape(-1)] = torch.stack([keys, values], dim=3).reshape(-1, 2, keys.shape[-1])
        store.positions[dst.reshape(-1)] = first_position + j.repeat(store.batch_size * store.num_heads)
        store.lengths += q
        store.host_lengths = [[n + q for n in row] for row in store.host_lengths]
        return store

    def regrow(self, spare: int) -> "RaggedKV":
        """A copy whose segments have ``spare`` free rows each."""
        view = self._rows_view()
        return RaggedKV.from_rows(view[0], view[1], self.host_lengths, spare)

    def _rows_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, self.max_length)
        i = torch.arange(width, device=self.kv.device)
        rows = self.starts.unsqueeze(-1) + torch.minimum(i, (self.lengths - 1).clamp(min=0).unsqueeze(-1))
        return self.kv[rows], self.positions[rows]  # [B, H, W, 2, D], [B, H, W]

    def replace(self, heads: list[int], rows_kv: torch.Tensor, rows_pos: torch.Tensor, lengths: list[list[int]],
                headroom: int) -> "RaggedKV":
        """New storage where ``heads`` hold the given padded rows ([B, H', K, 2, D], [B, H', K],
        lengths [B][H']) and every other head keeps its rows."""
        kv_rows, pos_rows = self._rows_view()  # [B, H, W, 2, D]
        width = max(kv_rows.shape[2], rows_kv.shape[2])
        kv_rows = _pad(kv_rows, width)
        pos_rows = _pad(pos_rows, width)
        kv_rows[:, heads] = _pad(rows_kv, width)
        pos_rows[:, heads] = _pad(rows_pos, width)
        new_lengths = [list(row) for row in self.host_lengths]
        for b in range(self.batch_size):
            for i, h in enumerate(heads):
                new_lengths[b][h] = lengths[b][i]
        return RaggedKV.from_rows(kv_rows, pos_rows, new_lengths, headroom)


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad dim 2 of t to ``width`` with zeros (a new tensor either way)."""
    if t.shape[2] == width:
        return t.clone()
    shape = list(t.shape)
    shape[2] = width
    out = t.new_zeros(shape)
    out[:, :, : t.shape[2]] = t
    return out
