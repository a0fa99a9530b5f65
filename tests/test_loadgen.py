"""bench/loadgen.py, the fleet-load generator: on the wire it must look like the firmware (one
connection per board, last will, online/info/health, one data message a second), or the fleet
benchmark measures something else. Checked with a real mosquitto and the real recorder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from firmware import protocol
from recorder.read import read_all, summarize
from tests.fw_board import Watcher
from tests.test_recorder_helpers import RecorderProcess, wait_for
from vboard.broker import Mosquitto

LOADGEN = Path(__file__).resolve().parent.parent / "bench" / "loadgen.py"


def loadgen(port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(LOADGEN), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def recorded(data_dir: Path) -> int:
    return sum(d.samples for d in summarize(data_dir).devices)


def test_simulated_boards_publish_what_the_firmware_publishes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    recorder = RecorderProcess(tmp_path, mosquitto.port).start()
    watcher = Watcher(mosquitto.port, client_id="loadgen-watcher").start()
    try:
        proc = loadgen(mosquitto.port, "--boards", "30", "--seconds", "4", "--processes", "2")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        assert report == {
            "boards": 30,
            "connected": 30,
            "lost_connections": 0,
            "sent": 120,
            "acked": 120,
            "seconds": 4,
        }
        wait_for(lambda: recorded(recorder.data_dir) >= 120, 30, "120 samples")
    finally:
        watcher.stop()
        recorder.stop()
    summary = summarize(recorder.data_dir)
    assert sorted(d.device for d in summary.devices) == [f"lg-{i:05d}" for i in range(30)]
    assert all(d.samples == 4 and d.missing == 0 and d.duplicates == 0 for d in summary.devices)
    assert summary.rejects == []  # every payload is one the recorder takes as a board's
    info = read_all(recorder.data_dir, "info")
    assert len(info) == 30 and set(info["fw"]) == {"loadgen"}
    health = watcher.json_of(protocol.HEALTH)
    assert health and all(set(h) == set(protocol.HEALTH_KEYS) for h in health)
    statuses = [m.payload for m in watcher.of_kind(protocol.STATUS)]
    assert statuses.count(protocol.ONLINE) == 30
    assert protocol.OFFLINE not in statuses  # a clean disconnect at the end sends no last will


def test_a_killed_generator_leaves_its_boards_offline(mosquitto: Mosquitto) -> None:
    watcher = Watcher(mosquitto.port, client_id="loadgen-lwt").start()
    try:
        proc = loadgen(mosquitto.port, "--boards", "5", "--seconds", "60")
        wait_for(lambda: len(watcher.samples) >= 5, 30, "the first samples")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(0.5)
        wait_for(
            lambda: [m.payload for m in watcher.of_kind(protocol.STATUS)].count(protocol.OFFLINE) == 5,
            30,
            "every board's last will",
        )
    finally:
        watcher.stop()
