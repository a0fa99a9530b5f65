"""The HDF5 writer process: journal in, data files out.

Started by the service (recorder/service.py) with a pipe on stdin. Each line on it is
`SEGMENT OFFSET`, the journal position up to which records are durable; the writer replays records
up to there through `Ingest`, appends the rows in numpy batches, and every `flush_s` makes the file
durable, writes the marker and deletes the journal segments the marker no longer needs. On stdout
it reports one JSON line per durable flush (`applied`: the marker's journal position) which the
service uses to stop acknowledging when the writer falls behind.

End of stdin means the service is gone (stopped, or killed): the writer applies what it was told
is durable, flushes, and exits; a new service's writer waits for the lock meanwhile.

Crash-only: any error the writer cannot handle in place ends the process; the service restarts it
and the restart recovers from the marker and the journal like any start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tables

from recorder import journal, layout
from recorder.config import Settings
from recorder.decode import Ingest, Row
from recorder.dedupe import SampleIndex
from recorder.files import file_lock, read_json, write_json_atomic
from recorder.store import (
    STATE_OPEN,
    DataFile,
    Marker,
    durable_identities,
    file_state,
    last_rows,
    open_or_create,
)

log = logging.getLogger("recorder.writer")

APPEND_BATCH_MESSAGES = 20_000
# Room to leave for HDF5 beyond the rows themselves: it allocates whole chunks (about 0.5 MB for
# samples, 0.25 MB for each other table) and rewrites metadata.
HDF5_GROWTH_SLACK = 4_000_000
PRUNE_PERIOD_S = 600.0


class Writer:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.data_dir = Path(settings.data_dir)
        self.state_dir = settings.state_dir
        self.journal_dir = settings.journal_path
        self.marker_path = self.state_dir / "marker.json"
        self.legacy_path = self.state_dir / "legacy.json"
        self.ingest = Ingest(
            prefix=settings.prefix,
            legacy_log_topic=settings.legacy_log_topic if settings.legacy else None,
            max_payload=settings.max_payload,
        )
        self.file: DataFile | None = None
        self.cursor: tuple[int, int] = (0, 0)
        self.dirty = False
        self.max_rx = 0.0
        self.rows_since_flush = 0
        self.unappended = 0  # messages handled since the last append to the tables
        self.period_end = 0.0  # when the open file's period ends
        self.compactions: list[subprocess.Popen[bytes]] = []
        self.stats = Path(settings.stats_file) if settings.stats_file else None

    # --- start ------------------------------------------------------------------------------

    def recover(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.data_dir.glob(".*.creating"):
            leftover.unlink(missing_ok=True)
        stored = read_json(self.marker_path)
        if stored is not None:
            marker = Marker.from_json(stored)
            self.cursor = marker.journal
            self.file = self._open(marker.file, marker.period)
            self.period_end = marker.period + layout.period_length(self.s.rotation)
            removed = self.file.truncate(marker.nrows)
            if removed:
                log.info(
                    "cut %s back to the last durable flush (%s rows replay from the journal)",
                    self.file.path.name,
                    removed,
                )
        else:
            segments = journal.list_segments(self.journal_dir)
            self.cursor = (segments[0], 0) if segments else (0, 0)
        legacy = read_json(self.legacy_path)
        if isinstance(legacy, dict):
            self.ingest.legacy = {str(k): float(v) for k, v in legacy.items()}
        self._rebuild_state()
        self._compact_closed_files()

    def _open(self, name: str, period: int) -> DataFile:
        return open_or_create(
            self.data_dir / name, period=period, rotation=self.s.rotation, shard=self.s.shard
        )

    def _rebuild_state(self) -> None:
        """The dedupe index and the last status/info/health per device, from the recent files."""
        files = layout.shard_files(self.data_dir, self.s.base_name, self.s.shard)
        now = time.time()
        horizon = now - self.s.dedupe_hours * 3600 - layout.period_length(self.s.rotation)
        index = SampleIndex()
        for path in files:
            start = layout.period_of_file(path)
            if start is None or start < horizon:
                continue
            try:
                with self._opened(path) as h5:
                    for devices, boots, seqs in durable_identities(h5):
                        index.load(devices, boots.astype(np.int64), seqs.astype(np.int64), now)
                    for device, (online,) in last_rows(h5, "status", ("online",)).items():
                        self.ingest.last_status[device] = bool(online)
                    for device, (boot, t) in last_rows(h5, "info", ("boot", "t")).items():
                        self.ingest.last_info[device] = (int(boot), float(t))
                    for device, (boot, t) in last_rows(h5, "health", ("boot", "t")).items():
                        self.ingest.last_health[device] = (int(boot), float(t))
            except Exception as exc:  # a file we cannot read cannot hold duplicates we could drop
                log.error("cannot read %s to rebuild the duplicate index: %s", path, exc)
        self.ingest.index = index
        log.info("duplicate index: %d (device, boot) entries from %d files", len(index), len(files))

    @contextlib.contextmanager
    def _opened(self, path: Path) -> Iterator[tables.File]:
        """A data file for reading; the one this writer has open is used as it is."""
        if self.file is not None and path == self.file.path:
            yield self.file.h5
            return
        with tables.open_file(str(path), "r") as h5:
            yield h5

    def _compact_closed_files(self) -> None:
        current = self.file.path if self.file else None
        for path in layout.shard_files(self.data_dir, self.s.base_name, self.s.shard):
            if path != current and file_state(path) == STATE_OPEN:
                self._spawn_compaction(path)

    def _spawn_compaction(self, path: Path) -> None:
        log.info("compressing closed file %s", path.name)
        self.compactions.append(
            subprocess.Popen(
                [sys.executable, "-m", "recorder", "compact", str(path)],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    # --- replay -----------------------------------------------------------------------------

    def catch_up(self, target: tuple[int, int] | None) -> None:
        """Apply journal records from the cursor up to target (None: all that is readable)."""
        seg, off = self.cursor
        while True:
            final = target is not None and seg == target[0]
            path = journal.segment_path(self.journal_dir, seg)
            if path.exists():
                for record, end in journal.read_segment(path, off, target[1] if final and target else None):
                    self._apply(record)
                    self.cursor = (seg, end)
            if final:
                break
            later = [
                n
                for n in journal.list_segments(self.journal_dir)
                if n > seg and (target is None or n <= target[0])
            ]
            if not later:
                break
            # A segment before the newest is complete: its end (or its torn tail) is final.
            seg, off = later[0], 0
            self.cursor = (seg, 0)

    def _apply(self, record: journal.Record) -> None:
        rx = record.rx
        if rx >= self.period_end or self.file is None:
            period = layout.period_start(rx, self.s.rotation)
            if self.file is None or period > self.file.period:
                self._rotate(period)
        self.ingest.handle(record)
        self.dirty = True
        if rx > self.max_rx:
            self.max_rx = rx
        self.unappended += 1
        if self.unappended >= APPEND_BATCH_MESSAGES:
            self._append()

    def _append(self) -> None:
        assert self.file is not None
        self._ensure_room(self.ingest.rows)
        self.rows_since_flush += self.file.append(self.ingest.take_rows())
        self.unappended = 0

    def _ensure_room(self, rows: dict[str, list[Row]]) -> None:
        """HDF5 must never meet a full disk: PyTables does not report failed writes during a flush
        and the file is then damaged beyond opening (see DataFile.flush). So stop before: the
        service then stops acknowledging and the broker keeps the messages."""
        assert self.file is not None
        batch = sum(len(r) * layout.TABLES[name].dtype.itemsize for name, r in rows.items())
        need = 2 * batch + HDF5_GROWTH_SLACK
        fs = os.statvfs(self.data_dir)
        free = fs.f_bavail * fs.f_frsize
        if free < need + self.s.min_free_mb * 1e6:
            raise OSError(
                errno.ENOSPC, f"{self.data_dir}: {free / 1e6:.0f} MB free, keeping {self.s.min_free_mb} MB"
            )
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and self.file.size() + need > limit:
            raise OSError(errno.EFBIG, f"{self.file.path} would outgrow the file size limit ({limit} bytes)")

    def _rotate(self, period: int) -> None:
        old = self.file
        if old is not None:
            self.flush()
            old.close()
            self._spawn_compaction(old.path)
        name = layout.file_name(self.s.base_name, self.s.shard, self.s.rotation, period)
        self.file = self._open(name, period)
        self.period_end = period + layout.period_length(self.s.rotation)
        log.info("writing %s", name)
        self._write_marker()

    def rotate_if_due(self, now: float) -> None:
        """Close the file when its period has passed even if no message came to do it."""
        if self.file is not None and layout.period_start(now, self.s.rotation) > self.file.period:
            self._rotate(layout.period_start(now, self.s.rotation))

    # --- durability -------------------------------------------------------------------------

    def flush(self) -> None:
        if self.file is None:
            self.report()
            return
        if self.ingest.pending_rows():
            self._append()
        self.file.flush()
        if self.ingest.legacy_changed:
            write_json_atomic(self.legacy_path, self.ingest.legacy)
            self.ingest.legacy_changed = False
        self._write_marker()
        rows, self.rows_since_flush = self.rows_since_flush, 0
        if self.stats is not None and rows:
            with self.stats.open("a") as f:
                line = {"kind": "hdf5", "at": time.time(), "max_rx": self.max_rx, "rows": rows}
                f.write(json.dumps(line) + "\n")
        self.dirty = False
        self.report()

    def _write_marker(self) -> None:
        assert self.file is not None
        marker = Marker(self.file.path.name, self.file.period, self.file.nrows(), self.cursor)
        write_json_atomic(self.marker_path, marker.to_json())
        for number in journal.list_segments(self.journal_dir):
            if number < self.cursor[0]:
                journal.segment_path(self.journal_dir, number).unlink(missing_ok=True)

    def report(self) -> None:
        line = json.dumps({"applied": list(self.cursor), "file": self.file.path.name if self.file else None})
        with contextlib.suppress(BrokenPipeError, OSError):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def maintain(self, now: float) -> None:
        self.ingest.index.forget_before(now - self.s.dedupe_hours * 3600)
        self.compactions = [p for p in self.compactions if p.poll() is None]

    def close(self) -> None:
        if self.file is not None:
            self.flush()
            self.file.close()
            self.file = None


def _read_positions(fd: int, buffer: bytearray) -> tuple[tuple[int, int] | None, bool]:
    """The newest position announced on the pipe, and whether the pipe reached its end."""
    data = os.read(fd, 65536)
    if not data:
        return None, True
    buffer.extend(data)
    newest = None
    *lines, rest = bytes(buffer).split(b"\n")
    buffer[:] = rest
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            newest = (int(parts[0]), int(parts[1]))
    return newest, False


def _serve(settings: Settings, stopping: Callable[[], bool]) -> None:
    stdin = sys.stdin.fileno()
    writer = Writer(settings)
    writer.recover()
    # Everything already in the journal was durable before this writer started.
    writer.catch_up(None)
    writer.flush()
    target: tuple[int, int] | None = None
    buffer = bytearray()
    next_flush = time.monotonic() + settings.flush_s
    next_prune = time.monotonic() + PRUNE_PERIOD_S
    eof = False
    while not eof and not stopping():
        wait = max(0.0, next_flush - time.monotonic()) if writer.dirty else settings.flush_s
        readable, _, _ = select.select([stdin], [], [], wait)
        if readable:
            newest, eof = _read_positions(stdin, buffer)
            if newest is not None:
                target = newest
        if target is not None and target > writer.cursor:
            writer.catch_up(target)
        now = time.monotonic()
        if now >= next_flush:
            writer.rotate_if_due(time.time())
            if writer.dirty:
                writer.flush()
            else:
                writer.report()
            next_flush = now + settings.flush_s
        if now >= next_prune:
            writer.maintain(time.time())
            next_prune = now + PRUNE_PERIOD_S
    if target is not None:
        writer.catch_up(target)
    writer.close()


def run(settings: Settings) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file size limit is an error to report, not death
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the service, which then closes our stdin
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        with file_lock(settings.state_dir / "writer.lock", wait_s=120):
            _serve(settings, lambda: stopping)
    except OSError as exc:
        # Disk full, file size limit, I/O error: the service restarts us with backoff meanwhile
        # (and stops acknowledging when we fall behind). The marker still holds. Exit without
        # the usual clean-up, which would have PyTables flush the open file once more into the
        # very failure that stopped us: the file stays as of the last verified flush.
        log.error("HDF5 writer stopping: %s", exc)
        logging.shutdown()
        os._exit(1)
    return 0
