"""The CLI as people run it (`python -m recorder ...`): info, export, plot, status, compact,
and the settings file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import tables

from recorder.config import ConfigError, load
from recorder.journal import JournalWriter, Record, encode
from recorder.read import summarize
from recorder.writer import Writer
from tests.test_recorder_helpers import Board, wait_for
from vboard.broker import Mosquitto

T0 = 1_740_009_600  # 2025-02-20 00:00:00 UTC


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "recorder", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},  # rich must not abbreviate what the tests look for
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two days of two boards (one with a gap and a reject) written by the real writer."""
    root = tmp_path_factory.mktemp("cli")
    settings = load(None, {"data_dir": str(root / "data")})
    journal = JournalWriter(settings.journal_path)
    journal.start(time.time())
    records = []
    for day in (0, 1):
        for device in ("lab-01", "lab-02"):
            for seq in range(day * 100, day * 100 + 100):
                if device == "lab-02" and 40 <= seq < 50:
                    continue  # ten samples the board never sent
                payload = f"[[1,{seq},{T0 + day * 86400 + seq},{2000 + seq},2100,4000,0]]".encode()
                rx = T0 + day * 86400 + seq + 0.5
                records.append(Record(rx, f"labfleet/{device}/data".encode(), payload, len(payload)))
    records.append(Record(T0 + 86400 + 300, b"labfleet/lab-01/data", b"[[1,2]]", 7))
    records.sort(key=lambda r: r.rx)
    position = journal.append(b"".join(encode(r) for r in records), time.time())
    writer = Writer(settings)
    writer.recover()
    writer.catch_up(position)
    writer.close()
    for proc in writer.compactions:
        proc.wait(60)
    yield root / "data"


def test_info_lists_files_devices_gaps_and_rejects(data_dir: Path) -> None:
    out = run("info", str(data_dir)).stdout
    assert "labfleet-20250220.h5" in out and "labfleet-20250221.h5" in out
    assert "closed" in out and "open" in out
    (lab02,) = [line for line in out.splitlines() if "lab-02" in line]
    assert " 190 " in lab02 and " 10 " in lab02  # samples, missing sequence numbers
    assert " 86410 " in lab02  # seconds without a sample: the night between the days, the gap
    assert "sample N: not an array of the N fields" in out
    devices = {d.device: d for d in summarize([data_dir]).devices}
    assert (devices["lab-01"].unsampled_s, devices["lab-02"].unsampled_s) == (86400, 86410)


def test_export_csv_and_parquet_for_a_device_and_time_range(data_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "lab01.csv"
    run(
        "export",
        str(data_dir),
        "--device",
        "lab-01",
        "--start",
        "2025-02-20T00:00:50",
        "--stop",
        str(T0 + 150),
        "-o",
        str(csv),
    )
    frame = pd.read_csv(csv)
    assert frame["seq"].tolist() == list(range(50, 100))  # day 2 starts at seq 100, t = T0 + 86400 + seq
    assert set(frame["device"]) == {"lab-01"} and frame["kT"].iloc[0] == pytest.approx(20.5)
    parquet = tmp_path / "all.parquet"
    run("export", str(data_dir), "-o", str(parquet))
    everything = pd.read_parquet(parquet)
    assert len(everything) == 400 - 10 and str(everything["time"].dt.tz) == "UTC"


def test_plot_writes_a_png(data_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "lab02.png"
    run("plot", str(data_dir), "--device", "lab-02", "-o", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    missing = run("plot", str(data_dir), "--device", "nobody", "-o", str(tmp_path / "x.png"), check=False)
    assert missing.returncode != 0 and "no samples" in missing.stderr


def test_compact_by_hand_compresses_an_open_file(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "labfleet-20250221.h5"
    copy.write_bytes((data_dir / "labfleet-20250221.h5").read_bytes())
    assert "compressed" in run("compact", str(copy)).stdout
    with tables.open_file(str(copy)) as h5:
        assert h5.root._v_attrs.state == "closed" and h5.root.samples.nrows == 200


def test_status_shows_the_fleet_from_retained_messages(mosquitto: Mosquitto) -> None:
    boards = [Board(mosquitto.port, name, boot=2) for name in ("lab-01", "lab-02")]
    for board in boards:
        board.announce()
        board.health(10)
    boards[0].data(range(3))
    wait_for(lambda: all(b.all_published() for b in boards), 10, "the broker")
    boards[1].client.disconnect()  # a clean disconnect: the retained status stays online
    boards[1].client.loop_stop()
    out = run("status", "--port", str(mosquitto.port), "--once", "--wait", "1.5").stdout
    (row1,) = [line for line in out.splitlines() if "lab-01" in line]
    assert "online" in row1 and "-60" in row1 and "test" in row1
    assert "lab-02" in out
    boards[0].close()


def test_settings_file_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "recorder.toml"
    good.write_text(
        '[broker]\nhost = "127.0.0.1"\nport = 1884\nprotocol = "3.1.1"\n'
        '[topics]\nprefix = "lab"\nlegacy = false\n'
        '[storage]\ndata_dir = "/srv/labfleet"\nrotation = "hourly"\nflush_s = 2\n'
    )
    settings = load(good, {"port": 1885, "shard": None})
    assert (settings.port, settings.protocol, settings.prefix, settings.rotation) == (
        1885,
        "3.1.1",
        "lab",
        "hourly",
    )
    assert settings.filters() == ["lab/+/status", "lab/+/info", "lab/+/data", "lab/+/health"]
    assert settings.batch_limit == 20
    for text, problem in (
        ("[broker]\nprot = 1\n", "unknown key"),
        ("[nope]\n", "unknown section"),
        ('[broker]\nport = "1883"\n', "port must be of type int"),
        ('[storage]\nrotation = "weekly"\n', "rotation must be"),
        ('[storage]\nshard = "../x"\n', "shard must match"),
    ):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            load(bad)
    failed = run("record", "--config", str(bad), check=False)
    assert failed.returncode != 0 and "shard must match" in failed.stderr
