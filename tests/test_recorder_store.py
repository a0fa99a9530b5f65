"""Journal, HDF5 writer and readers in-process: real files, real PyTables, real h5dump."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tables

from firmware import protocol
from recorder import journal, layout
from recorder.config import Settings
from recorder.journal import JournalWriter, Record
from recorder.read import read_samples, read_table, summarize
from recorder.store import STATE_CLOSED, compact
from recorder.writer import Writer

DAY = 86400.0
T0 = 1_740_009_600.0  # 2025-02-20 00:00:00 UTC


def settings_for(tmp_path: Path, **extra: object) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), **extra).validate()  # type: ignore[arg-type]


def sample_record(device: str, seq: int, rx: float, boot: int = 1) -> Record:
    payload = json.dumps([[boot, seq, int(T0) + seq, 2000 + seq, 2100, 4000, 0]]).encode()
    return Record(rx, protocol.topic("labfleet", device, "data").encode(), payload, len(payload))


def commit(jw: JournalWriter, records: list[Record]) -> tuple[int, int]:
    return jw.append(b"".join(journal.encode(r) for r in records), time.time())


def samples_in(data_dir: Path) -> pd.DataFrame:
    return read_samples(data_dir)


def test_journal_round_trip_and_torn_tail(tmp_path: Path) -> None:
    jw = JournalWriter(tmp_path / "j")
    jw.start(time.time())
    records = [Record(1.5, b"t/%d" % i, b"x" * i, i, i % 2 == 0, i % 3 == 0, i % 2) for i in range(50)]
    seg, end = commit(jw, records)
    path = journal.segment_path(tmp_path / "j", seg)
    with path.open("ab") as f:  # a crash in the middle of the next write
        f.write(journal.encode(records[0])[:-3])
    read = list(journal.read_segment(path))
    assert [r for r, _ in read] == records
    assert read[-1][1] == end
    # Up to a position, from a position.
    middle = read[24][1]
    assert [r for r, _ in journal.read_segment(path, 0, middle)] == records[:25]
    assert [r for r, _ in journal.read_segment(path, middle)] == records[25:]
    # A flipped bit ends the segment at the record before it.
    data = bytearray(path.read_bytes())
    data[middle + 12] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [r for r, _ in journal.read_segment(path)] == records[:25]
    # A new writer never appends to an old segment.
    jw.close()
    again = JournalWriter(tmp_path / "j")
    again.start(time.time())
    assert again.segment == seg + 1


def test_writer_applies_journal_and_replays_exactly_once_after_a_crash(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    jw = JournalWriter(s.journal_path)
    jw.start(time.time())
    first = commit(jw, [sample_record("a", i, T0 + 10 + i) for i in range(100)])
    w = Writer(s)
    w.recover()
    w.catch_up(first)
    w.flush()
    second = commit(jw, [sample_record("a", i, T0 + 200 + i) for i in range(100, 250)])
    w.catch_up(second)
    # The crash: rows reached the HDF5 file (and even the disk) but the marker was not written.
    w._append()
    assert w.file is not None
    w.file.flush()
    w.file.h5.close()
    assert len(samples_in(Path(s.data_dir))) == 250

    again = Writer(s)
    again.recover()  # cut back to the marker: 100 rows
    assert again.file is not None and again.file.nrows()["samples"] == 100
    again.catch_up(None)
    again.close()
    frame = samples_in(Path(s.data_dir))
    assert list(frame["seq"]) == list(range(250))
    with tables.open_file(str(Path(s.data_dir) / "labfleet-20250220.h5")) as h5:
        assert h5.root.samples.nrows == 250  # none twice in the file itself


def test_duplicates_after_restart_are_dropped_from_the_files(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    jw = JournalWriter(s.journal_path)
    jw.start(time.time())
    pos = commit(jw, [sample_record("a", i, time.time()) for i in range(30)])
    w = Writer(s)
    w.recover()
    w.catch_up(pos)
    w.close()
    # Broker redelivery after a restart: the same samples again, in a new segment.
    jw.start(time.time())
    pos = commit(jw, [sample_record("a", i, time.time()) for i in range(20, 40)])
    w = Writer(s)
    w.recover()
    w.catch_up(pos)
    w.close()
    frame = samples_in(Path(s.data_dir))
    assert list(frame["seq"]) == list(range(40))
    assert summarize(Path(s.data_dir)).devices[0].duplicates == 0


def test_legacy_time_base_survives_restart(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    jw = JournalWriter(s.journal_path)
    jw.start(time.time())
    init = b'{"ESP_init":{"DATA_topic":"data-esp-0badf00d","Time":"2017-12-11 08:24:07 GMT"}}'
    pos = commit(jw, [Record(time.time(), b"esp001log", init, len(init))])
    w = Writer(s)
    w.recover()
    w.catch_up(pos)
    w.close()
    assert not list(s.journal_path.glob("*.wal"))[:-1]  # applied segments are gone but the newest
    jw.start(time.time())
    data = b'[{"id":3,"kT":20.5,"aT":null,"aH":30}]'
    pos = commit(jw, [Record(time.time(), b"data-esp-0badf00d", data, len(data))])
    w = Writer(s)
    w.recover()
    w.catch_up(pos)
    w.close()
    frame = samples_in(Path(s.data_dir))
    assert frame["time"].tolist() == [pd.Timestamp("2017-12-11 08:24:10", tz="UTC")]


def test_rotation_compression_and_readers(tmp_path: Path) -> None:
    s = settings_for(tmp_path, rotation="daily")
    data_dir = Path(s.data_dir)
    jw = JournalWriter(s.journal_path)
    jw.start(time.time())
    day1 = [sample_record(d, i, T0 + 3600 + i) for d in ("a", "b") for i in range(0, 500)]
    day2 = [sample_record(d, i, T0 + DAY + 60 + i) for d in ("a", "b") for i in range(500, 800)]
    pos = commit(jw, sorted(day1 + day2, key=lambda r: r.rx))
    w = Writer(s)
    w.recover()
    w.catch_up(pos)
    w.close()
    for proc in w.compactions:
        assert proc.wait(60) == 0
    first, second = data_dir / "labfleet-20250220.h5", data_dir / "labfleet-20250221.h5"
    with tables.open_file(str(first)) as h5:
        assert h5.root._v_attrs.state == STATE_CLOSED
        samples = h5.root.samples
        assert samples.filters.complib == "zlib" and samples.filters.complevel == 5
        assert samples.cols.device.is_indexed and samples.cols.t.is_indexed
        assert samples.nrows == 1000 and samples.attrs.unit_kT == "degC"
    with tables.open_file(str(second)) as h5:
        assert h5.root._v_attrs.state == "open" and h5.root.samples.filters.complevel == 0
    assert not compact(first)  # once is enough

    # pandas, directly on a table
    direct = pd.read_hdf(first, "samples")
    assert len(direct) == 1000 and set(direct["device"]) == {"a", "b"}
    # the helper, across files, one device, a time range
    frame = read_samples(data_dir, device="b", start=T0 + 450, stop=T0 + 550)
    assert frame["seq"].tolist() == list(range(450, 550)) and set(frame["device"]) == {"b"}
    assert str(frame["time"].dt.tz) == "UTC"
    assert len(read_table(second, "samples")) == 600
    # h5dump, the HDF5 project's own tool
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump (apt hdf5-tools) is not installed")
    for path in (first, second):
        dump = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert 'DATASET "samples"' in dump.stdout


def test_a_file_is_readable_while_the_writer_has_it_open(tmp_path: Path) -> None:
    script = (
        "import os, sys, time, json\n"
        "os.environ['HDF5_USE_FILE_LOCKING'] = 'FALSE'\n"
        "from recorder.config import Settings\n"
        "from recorder.writer import Writer\n"
        "from recorder.journal import JournalWriter, Record, encode\n"
        "s = Settings.from_json(sys.argv[1])\n"
        "jw = JournalWriter(s.journal_path); jw.start(time.time())\n"
        "p = json.dumps([[1, 0, 1740000000, 1, 1, 1, 0]]).encode()\n"
        "pos = jw.append(encode(Record(time.time(), b'labfleet/a/data', p, len(p))), time.time())\n"
        "w = Writer(s); w.recover(); w.catch_up(pos); w.flush()\n"
        "print('flushed', flush=True); sys.stdin.read()\n"
    )
    s = settings_for(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, s.to_json()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = iter(proc.stdout.readline, "")
        assert "flushed" in (line.strip() for line in lines)  # after the writer's own report line
        assert len(read_samples(s.data_dir)) == 1
        if shutil.which("h5dump"):
            path = next(Path(s.data_dir).glob("*.h5"))
            assert (
                subprocess.run(["h5dump", "-H", str(path)], capture_output=True, timeout=60).returncode == 0
            )
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)


def test_a_flush_that_did_not_reach_the_disk_is_detected(tmp_path: Path) -> None:
    # PyTables' flush() does not report writes that failed: make them fail (a file-size limit, in
    # a child process) and check DataFile.flush() notices from the superblock's end of file.
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from recorder.store import DataFile, create_data_file\n"
        "path = Path(sys.argv[1])\n"
        "create_data_file(path, period=0, rotation='daily', shard='')\n"
        "f = DataFile(path, 0)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100_000, resource.RLIM_INFINITY))\n"
        "f.append({'samples': [(b'dev', 1, i, 1.0, 1.0, 1.0, 1.0, 1.0, 0) for i in range(20_000)]})\n"
        "try:\n"
        "    f.flush()\n"
        "except OSError as exc:\n"
        "    print('detected:', exc)\n"
        "else:\n"
        "    print('not detected')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.h5")], capture_output=True, text=True, timeout=60
    )
    assert "detected: " in done.stdout, done.stderr[-2000:]
    assert "did not reach the disk" in done.stdout


def test_hostile_names_never_become_nodes(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    jw = JournalWriter(s.journal_path)
    jw.start(time.time())
    hostile = ["../../etc", "a/b/c", "x" * 10_000, "\u202e\u0000nul", "/", "samples", ".."]
    records = [
        Record(time.time(), f"labfleet/{name}/data".encode(), b"[[1,0,1,1,1,1,0]]", 17) for name in hostile
    ]
    pos = commit(jw, records)
    w = Writer(s)
    w.recover()
    w.catch_up(pos)
    w.close()
    (path,) = Path(s.data_dir).glob("*.h5")
    with tables.open_file(str(path)) as h5:
        assert sorted(node._v_name for node in h5.root) == sorted(layout.TABLES)
        # "samples" is a fine device name: its row is data in /samples, not a node.
        assert h5.root.rejects.nrows == len(hostile) - 1
        assert h5.root.samples.col("device").tolist() == [b"samples"]
    assert sorted(p.name for p in Path(s.data_dir).iterdir()) == [".recorder", path.name]


def test_info_summary_counts_gaps(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    jw = JournalWriter(s.journal_path)
    jw.start(time.time())
    pos = commit(jw, [sample_record("gappy", i, time.time()) for i in (*range(10), *range(15, 20))])
    w = Writer(s)
    w.recover()
    w.catch_up(pos)
    w.close()
    summary = summarize(s.data_dir)
    (device,) = summary.devices
    assert (device.device, device.samples, device.missing, device.boots) == ("gappy", 15, 5, 1)
    assert np.isclose(device.last - device.first, 19)
