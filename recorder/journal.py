"""The write-ahead journal: every received MQTT message, durable before it is acknowledged.

The MQTT side appends a batch of records with one write and one fdatasync, and only then sends the
PUBACKs of that batch. The HDF5 writer replays the records into the data files and deletes the
segments that the data files hold durably (see recorder/store.py for the marker that says so).

A segment is a file `<number>.wal` in the journal directory: an 8-byte magic, then records. A
record is `length:u32, crc32:u32, body`, the body `rx:f64, payload_len:u32, topic_len:u16,
flags:u8, qos:u8, topic, payload`. A record whose length or CRC does not check out ends the
segment: it is the torn tail of a write that never completed, so its batch was never acknowledged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from recorder.files import fsync_dir

MAGIC = b"LFJRNL1\n"
_HEADER = struct.Struct("<II")
_BODY_HEAD = struct.Struct("<dIHBB")
FLAG_RETAIN = 0x01
FLAG_DUP = 0x02
MAX_TOPIC_BYTES = 0xFFFF
# A bound on what a corrupt length field could make a reader allocate.
MAX_RECORD_BYTES = 64 * 1024 * 1024
SUFFIX = ".wal"


class Record(NamedTuple):
    rx: float
    topic: bytes
    payload: bytes  # at most the recorder's max_payload bytes: see payload_len
    payload_len: int  # the length the message had on the wire
    retain: bool = False
    dup: bool = False
    qos: int = 1


def encode_message(
    rx: float, topic: bytes, payload: bytes, payload_len: int, retain: bool, dup: bool, qos: int
) -> bytes:
    topic = topic[:MAX_TOPIC_BYTES]
    flags = (FLAG_RETAIN if retain else 0) | (FLAG_DUP if dup else 0)
    body = _BODY_HEAD.pack(rx, payload_len, len(topic), flags, qos) + topic + payload
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def encode(record: Record) -> bytes:
    return encode_message(*record)


def _decode_body(body: bytes) -> Record:
    rx, payload_len, topic_len, flags, qos = _BODY_HEAD.unpack_from(body)
    start = _BODY_HEAD.size
    topic = body[start : start + topic_len]
    payload = body[start + topic_len :]
    return Record(rx, topic, payload, payload_len, bool(flags & FLAG_RETAIN), bool(flags & FLAG_DUP), qos)


def segment_path(journal_dir: Path, number: int) -> Path:
    return journal_dir / f"{number:012d}{SUFFIX}"


def list_segments(journal_dir: Path) -> list[int]:
    numbers = []
    for path in journal_dir.glob(f"*{SUFFIX}"):
        stem = path.name[: -len(SUFFIX)]
        if stem.isdigit():
            numbers.append(int(stem))
    return sorted(numbers)


def read_segment(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[Record, int]]:
    """(record, offset just past it) for the valid records of a segment from `start` (0 = the
    first record) up to `stop` (None: up to the first torn or corrupt record or the end)."""
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            return
        offset = max(start, len(MAGIC))
        f.seek(offset)
        while stop is None or offset < stop:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            length, crc = _HEADER.unpack(header)
            if length < _BODY_HEAD.size or length > MAX_RECORD_BYTES:
                return
            body = f.read(length)
            if len(body) < length or zlib.crc32(body) != crc:
                return
            offset += _HEADER.size + length
            yield _decode_body(body), offset


class JournalError(OSError):
    pass


class JournalWriter:
    """Appends batches to the newest segment; a new process always starts a new segment, so a
    torn tail left by a crash is never followed by good records in the same file."""

    def __init__(self, journal_dir: Path) -> None:
        self.dir = journal_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = list_segments(self.dir)
        self.segment = existing[-1] if existing else 0
        self.fd: int | None = None
        self.offset = 0
        self.opened_at = 0.0

    def _open_next(self, now: float) -> None:
        self.close()
        self.segment += 1
        path = segment_path(self.dir, self.segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._write_all(fd, MAGIC)
            os.fdatasync(fd)
            fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.offset = len(MAGIC)
        self.opened_at = now

    def start(self, now: float) -> None:
        """Open a fresh segment (at start, and to roll)."""
        self._open_next(now)

    @staticmethod
    def _write_all(fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise JournalError(errno.EIO, "short write to the journal")
            view = view[written:]

    def append(self, data: bytes, now: float) -> tuple[int, int]:
        """Write and fdatasync `data`; (segment, offset past it). On an error the segment is cut
        back to the last durable record and the next append starts a new segment."""
        if self.fd is None:
            self._open_next(now)
        assert self.fd is not None
        try:
            self._write_all(self.fd, data)
            os.fdatasync(self.fd)
        except OSError:
            self._abandon_segment()
            raise
        self.offset += len(data)
        return self.segment, self.offset

    def _abandon_segment(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # a reader stops at the torn record anyway
            os.ftruncate(self.fd, self.offset)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None

    @property
    def position(self) -> tuple[int, int]:
        return self.segment, self.offset
