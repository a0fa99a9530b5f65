"""HDF5 data files: create, append, make durable, recover after a crash, compress when closed.

Crash safety rests on three rules:
- A file appears under its final name only once complete (created as a hidden temporary, fsynced,
  renamed), so a crash during creation leaves no half-made data file.
- Tables are uncompressed while written. After each flush the file is fsynced and then the marker
  (`marker.json` in the state directory, replaced atomically) records every table's row count and
  the journal position the file holds everything up to. On start the open file is cut back to
  the marker's row counts and the journal replays from the marker's position: rows written after
  the last marker (the flush that a crash interrupted) are written once again, never twice.
- A closed file is compressed into a hidden copy, indexed, fsynced and renamed over the original.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tables

from firmware import protocol
from recorder import layout
from recorder.decode import Row
from recorder.files import file_lock, fsync_dir, fsync_path

log = logging.getLogger("recorder.store")

RECORDER_VERSION = "0.1.0"
STATE_OPEN = "open"
STATE_CLOSED = "closed"
COMPRESSION = tables.Filters(complevel=5, complib="zlib", shuffle=True, fletcher32=True)
# Rows expected per table and period: sizes the HDF5 chunks (PyTables picks the chunk shape).
EXPECTED_ROWS = {"daily": 20_000_000, "hourly": 1_000_000}
READ_CHUNK = 1_000_000


@dataclass
class Marker:
    """The durable point: the file named here holds exactly `nrows` rows per table, which are
    everything received up to `journal` (segment, offset)."""

    file: str
    period: int
    nrows: dict[str, int]
    journal: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "period": self.period, "nrows": self.nrows, "journal": list(self.journal)}

    @classmethod
    def from_json(cls, value: Any) -> Marker:
        seg, off = value["journal"]
        return cls(str(value["file"]), int(value["period"]), dict(value["nrows"]), (int(seg), int(off)))


def create_data_file(path: Path, *, period: int, rotation: str, shard: str) -> None:
    tmp = path.with_name("." + path.name + ".creating")
    tmp.unlink(missing_ok=True)
    with tables.open_file(str(tmp), "w", title="labfleet recorder data") as h5:
        attrs = h5.root._v_attrs
        attrs.layout_version = layout.LAYOUT_VERSION
        attrs.protocol_version = protocol.PROTOCOL_VERSION
        attrs.recorder_version = RECORDER_VERSION
        attrs.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        attrs.shard = shard
        attrs.rotation = rotation
        attrs.period_start = float(period)
        attrs.period_end = float(period + layout.period_length(rotation))
        attrs.state = STATE_OPEN
        attrs.time_unit = layout.UTC_SECONDS
        expected = EXPECTED_ROWS[rotation]
        for spec in layout.TABLES.values():
            table = h5.create_table(
                "/",
                spec.name,
                description=spec.dtype,
                title=spec.title,
                expectedrows=expected if spec.name == "samples" else expected // 100,
            )
            for column, unit in spec.units.items():
                table.attrs["unit_" + column] = unit
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class DataFile:
    """One open (uncompressed, being appended) data file."""

    def __init__(self, path: Path, period: int) -> None:
        self.path = path
        self.period = period
        self.h5 = tables.open_file(str(path), "a")
        self.tables: dict[str, tables.Table] = {}
        for name, spec in layout.TABLES.items():
            node = self.h5.get_node("/", name)
            if not isinstance(node, tables.Table) or node.dtype != spec.dtype:
                self.h5.close()
                raise ValueError(f"{path}: /{name} is not a table of the layout")
            self.tables[name] = node

    def append(self, rows: dict[str, list[Row]]) -> int:
        count = 0
        for name, batch in rows.items():
            if batch:
                self.tables[name].append(np.array(batch, dtype=layout.TABLES[name].dtype))
                count += len(batch)
        return count

    def nrows(self) -> dict[str, int]:
        return {name: int(table.nrows) for name, table in self.tables.items()}

    def truncate(self, nrows: dict[str, int]) -> dict[str, int]:
        """Cut the tables back to a marker's row counts; returns rows removed per table."""
        removed = {}
        for name, table in self.tables.items():
            keep = int(nrows.get(name, 0))
            if table.nrows > keep:
                removed[name] = int(table.nrows - keep)
                table.truncate(keep)
            elif table.nrows < keep:
                log.error(
                    "%s: /%s has %d rows but the marker recorded %d durable ones: rows were lost "
                    "after an fsync (disk or filesystem fault?)",
                    self.path,
                    name,
                    table.nrows,
                    keep,
                )
        self.h5.flush()
        return removed

    def flush(self) -> None:
        """Durable: HDF5 flush (into the OS) then fsync (onto the disk), verified. PyTables does
        not report a failed write during a flush (measured: with writes failing beyond a size
        limit, flush() returned and left a file HDF5 then refused to open), so the file's size
        is checked against the end of file its superblock now records."""
        self.h5.flush()
        fsync_path(self.path)
        size, expected = self.path.stat().st_size, stored_eof(self.path)
        if size < expected:
            raise OSError(
                errno.EIO, f"{self.path}: HDF5 data did not reach the disk ({size} < {expected} bytes)"
            )

    def size(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if self.h5.isopen:
            self.h5.close()


def open_or_create(path: Path, *, period: int, rotation: str, shard: str) -> DataFile:
    if not path.exists():
        create_data_file(path, period=period, rotation=rotation, shard=shard)
        return DataFile(path, period)
    try:
        return DataFile(path, period)
    except (tables.HDF5ExtError, OSError, ValueError, KeyError, tables.NoSuchNodeError) as exc:
        aside = path.with_name(path.name + f".corrupt-{int(time.time())}")
        log.error("cannot open %s (%s): moved aside to %s, starting a new file", path, exc, aside)
        os.replace(path, aside)
        create_data_file(path, period=period, rotation=rotation, shard=shard)
        return DataFile(path, period)


# Where the superblock keeps the end-of-file address, by superblock version (HDF5 file format
# specification, "Superblock"): versions 0 and 1 have more fields before it than 2 and 3.
_EOF_OFFSET = {0: 40, 1: 44, 2: 28, 3: 28}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def stored_eof(path: Path) -> int:
    """The end-of-file address recorded in an HDF5 file's superblock (at offset 0)."""
    with path.open("rb") as f:
        head = f.read(64)
    if head[:8] != _HDF5_SIGNATURE or head[8] not in _EOF_OFFSET:
        raise OSError(errno.EIO, f"{path}: not an HDF5 file with a known superblock version")
    offset_size = head[13] if head[8] < 2 else head[9]
    if offset_size != 8:
        raise OSError(errno.EIO, f"{path}: unexpected HDF5 offset size {offset_size}")
    return int.from_bytes(head[_EOF_OFFSET[head[8]] : _EOF_OFFSET[head[8]] + 8], "little")


def file_state(path: Path) -> str | None:
    try:
        with tables.open_file(str(path), "r") as h5:
            return str(h5.root._v_attrs.state)
    except Exception:  # unreadable or not ours: nothing to do with it here
        return None


def compact(path: Path) -> bool:
    """Compress a closed data file in place (zlib + shuffle, readable by any HDF5 tool) and index
    samples by device and time for fast range reads. Safe to run twice or to interrupt."""
    lock = path.with_name("." + path.name + ".lock")
    try:
        with file_lock(lock, wait_s=0):
            tmp = path.with_name("." + path.name + ".compacting")
            tmp.unlink(missing_ok=True)
            with tables.open_file(str(path), "r") as src:
                if str(src.root._v_attrs.state) == STATE_CLOSED:
                    lock.unlink(missing_ok=True)
                    return False
                counts = {name: int(src.get_node("/", name).nrows) for name in layout.TABLES}
                with tables.open_file(str(tmp), "w", title=src.title) as dst:
                    src.root._v_attrs._f_copy(dst.root)
                    for name in layout.TABLES:
                        src.get_node("/", name).copy(dst.root, name, filters=COMPRESSION)
            with tables.open_file(str(tmp), "a") as dst:
                samples = dst.root.samples
                samples.cols.device.create_csindex()
                samples.cols.t.create_csindex()
                attrs = dst.root._v_attrs
                attrs.state = STATE_CLOSED
                attrs.compressed = "zlib level 5, shuffle, fletcher32"
                if samples.nrows:
                    times = samples.col("t")
                    attrs.t_min = float(times.min())
                    attrs.t_max = float(times.max())
            fsync_path(tmp)
            _verify_copy(tmp, counts)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            lock.unlink(missing_ok=True)
    except TimeoutError:
        return False  # another process is compacting it
    return True


def _verify_copy(path: Path, counts: dict[str, int]) -> None:
    """The compressed copy replaces the only other copy of the data: it must be complete and
    readable (every chunk read back through its fletcher32 checksum) before it does."""
    size, expected = path.stat().st_size, stored_eof(path)
    if size < expected:
        raise OSError(errno.EIO, f"{path}: incomplete ({size} < {expected} bytes)")
    with tables.open_file(str(path), "r") as h5:
        for name, count in counts.items():
            table = h5.get_node("/", name)
            if table.nrows != count:
                raise OSError(errno.EIO, f"{path}: /{name} has {table.nrows} rows instead of {count}")
            for start in range(0, count, READ_CHUNK):
                table.read(start, min(start + READ_CHUNK, count))


def durable_identities(h5: tables.File) -> Iterator[tuple[Any, Any, Any]]:
    """(device, boot, seq) column chunks of a data file's samples."""
    samples = h5.root.samples
    for start in range(0, samples.nrows, READ_CHUNK):
        chunk = samples.read(start, min(start + READ_CHUNK, samples.nrows))
        yield chunk["device"], chunk["boot"], chunk["seq"]


def last_rows(h5: tables.File, name: str, fields: tuple[str, ...]) -> dict[bytes, tuple[Any, ...]]:
    """The last row of each device in a table, as tuples of `fields`."""
    found: dict[bytes, tuple[Any, ...]] = {}
    table = h5.get_node("/", name)
    for start in range(0, table.nrows, READ_CHUNK):
        chunk = table.read(start, min(start + READ_CHUNK, table.nrows))
        for row in chunk:
            found[bytes(row["device"])] = tuple(row[f].item() for f in fields)
    return found
