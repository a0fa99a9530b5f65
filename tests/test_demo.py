"""`make demo` end to end: broker, three virtual boards provisioned through site.yml, the
recorder, and the HDF5 files and plots it leaves behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recorder.read import summarize


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_the_demo_records_every_board_and_plots_it(tmp_path: Path, broker: str) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vboard.demo",
            "--duration",
            "10",
            "--workdir",
            str(workdir),
            "--broker",
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = summarize([workdir / "data"])
    devices = {d.device: d for d in summary.devices}
    assert sorted(devices) == ["vb-01", "vb-02", "vb-03"]
    for device in devices.values():
        # 10 s at 60x is 600 simulated seconds: most of it is recorded, every second once
        assert device.samples > 300
        assert device.duplicates == 0 and device.missing == 0
    for name in devices:
        assert (workdir / "plots" / f"{name}.png").stat().st_size > 10_000
    assert "Task was destroyed" not in result.stderr
