"""Evaluation records and a resumable store: ``results.json`` (the truth) and ``results.csv``.

One ``Record`` per cell: a (task, policy, compression, context length, protocol, model,
seed, samples) combination. The store rewrites both files atomically after every cell, so
an interrupted run loses at most the cell in flight, and a rerun skips finished cells.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from hcpolicy._validate import fraction, integer, unit_interval

JSON_NAME, CSV_NAME = "results.json", "results.csv"


def _name(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _compression(value: Any) -> float:
    # rounded so 0.1 + 0.2 and 0.3 name the same cell, in memory and after a JSON round trip
    return round(float(value), 6)


@attrs.frozen
class Cell:
    """What identifies one evaluated combination; ``compression`` is the requested budget."""

    task: str = attrs.field(validator=_name)
    policy: str = attrs.field(validator=_name)
    compression: float = attrs.field(converter=_compression, validator=fraction)
    context_length: int = attrs.field(validator=integer(1))
    protocol: str = attrs.field(validator=_name)
    model: str = attrs.field(validator=_name)
    seed: int = attrs.field(validator=integer(0))
    samples: int = attrs.field(validator=integer(1))


@attrs.frozen(kw_only=True)
class Record:
    """The outcome of one cell.

    compression: the requested budget in (0, 1] (1.0 for full KV); the measured device
    share is ``kv_bytes_device / kv_bytes_full`` (``device_fraction``). score: mean over the
    samples, in [0, 1]. Byte and recall counts are totals over the cell's samples.
    ``sample_scores`` (optional) are the per-sample scores; ``extra`` holds anything else
    the runner wants kept (timings, policy settings), JSON-able.
    """

    task: str = attrs.field(validator=_name)
    policy: str = attrs.field(validator=_name)
    compression: float = attrs.field(converter=_compression, validator=fraction)
    context_length: int = attrs.field(validator=integer(1))
    samples: int = attrs.field(validator=integer(1))
    score: float = attrs.field(converter=float, validator=unit_interval)
    kv_bytes_device: int = attrs.field(validator=integer(0))
    kv_bytes_full: int = attrs.field(validator=integer(0))
    host_bytes: int = attrs.field(default=0, validator=integer(0))
    recalls: int = attrs.field(default=0, validator=integer(0))
    protocol: str = attrs.field(validator=_name)
    model: str = attrs.field(validator=_name)
    seed: int = attrs.field(default=0, validator=integer(0))
    sample_scores: tuple[float, ...] = attrs.field(default=(), converter=lambda v: tuple(float(x) for x in v))
    extra: dict[str, Any] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        if self.sample_scores and len(self.sample_scores) != self.samples:
            raise ValueError(f"sample_scores has {len(self.sample_scores)} entries for {self.samples} samples")

    @property
    def cell(self) -> Cell:
        return Cell(
            self.task, self.policy, self.compression, self.context_length, self.protocol, self.model, self.seed,
            self.samples,
        )  # fmt: skip

    @property
    def device_fraction(self) -> float | None:
        """Measured share of the full KV cache held on the device; None when unknown."""
        return self.kv_bytes_device / self.kv_bytes_full if self.kv_bytes_full else None

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["sample_scores"] = list(self.sample_scores)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = {a.name for a in attrs.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown record fields: {sorted(unknown)}")
        return cls(**data)


class ResultStore:
    """Records of one output directory, kept in ``results.json`` and mirrored in ``results.csv``.

    Loading an existing ``results.json`` resumes a run: ``has(cell)`` says what is done.
    ``add`` replaces the record of the same cell, if any, and rewrites both files.
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._records: dict[Cell, Record] = {}
        path = self.json_path
        if path.exists():
            data = json.loads(path.read_text())
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            for i, item in enumerate(data):
                try:
                    record = Record.from_dict(item)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{path}: record {i} is invalid: {exc}") from exc
                self._records[record.cell] = record

    @property
    def json_path(self) -> Path:
        return self.output_dir / JSON_NAME

    @property
    def csv_path(self) -> Path:
        return self.output_dir / CSV_NAME

    @property
    def records(self) -> list[Record]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def has(self, cell: Cell) -> bool:
        return cell in self._records

    def get(self, cell: Cell) -> Record | None:
        return self._records.get(cell)

    def add(self, record: Record) -> None:
        self._records[record.cell] = record
        self.save()

    def save(self) -> None:
        rows = [r.to_dict() for r in self._records.values()]
        _write_atomic(self.json_path, json.dumps(rows, indent=1) + "\n")
        _write_atomic(self.csv_path, _csv(rows))


def _csv(rows: Iterable[dict[str, Any]]) -> str:
    columns = [a.name for a in attrs.fields(Record)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns + ["device_fraction"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        full = row["kv_bytes_full"]
        flat = {**row, "device_fraction": row["kv_bytes_device"] / full if full else ""}
        flat["sample_scores"] = json.dumps(row["sample_scores"])
        flat["extra"] = json.dumps(row["extra"], sort_keys=True)
        writer.writerow(flat)
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``.

    A crash mid-write leaves the old file whole: readers see the old or the new content.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # mode 0666 less the umask, as open() gives (mkstemp's 0600 hid results from the group)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
