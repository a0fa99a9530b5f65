"""The `vboard` command line: fleets from scenario files, `vboard ctl`, clean shutdown, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vboard_support import mpremote
from vboard import control
from vboard.broker import free_port

VBOARD = str(Path(sys.executable).parent / "vboard")


def test_fleet_from_a_scenario_runs_until_sigterm_and_obeys_ctl(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    scenario = tmp_path / "scenario.yml"
    scenario.write_text(
        f"""
speed: 10
lan:
  access_points: [{{ssid: bench, password: bench-password}}]
boards:
  b1: {{console_port: {ports[0]}, thermocouple: MAX31855, ambient: SHT20, seed: 3}}
  b2: {{console_port: {ports[1]}, thermocouple: null}}
events:
  - {{at: 1, board: b2, action: unplug, chip: ambient}}
"""
    )
    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        [VBOARD, "fleet", str(scenario), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert f"socket://127.0.0.1:{ports[0]}" in lines[0]
        assert "2 board(s) at 10x" in lines[2]
        status = control.request(workdir / control.CONTROL_SOCKET, "status", {})
        assert [s["name"] for s in status] == ["b1", "b2"]
        out = mpremote(
            f"socket://127.0.0.1:{ports[1]}",
            "exec",
            "from machine import I2C, Pin; import time; time.sleep(2)\n"
            "print(I2C(scl=Pin(5), sda=Pin(4)).scan())",
        )
        assert out.strip() == "[104]"  # the scenario's event unplugged the SHT30 (0x44); the DS3231 remains
        result = subprocess.run(
            [VBOARD, "ctl", "ap_down", "ssid=nope", "--workdir", str(workdir)], capture_output=True, text=True
        )
        assert result.returncode == 1 and "no access point 'nope'" in result.stderr
        fleet_json = json.loads((workdir / "fleet.json").read_text())
        assert fleet_json["b1"]["port"] == ports[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "stopped" in rest
    assert not (workdir / control.CONTROL_SOCKET).exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("boards: {b1: {thermocouple: MAX9999}}", "thermocouple must be one of"),
        ("boards: {b1: {colour: red}}", "unknown key 'colour'"),
        ("speed: 10\nwarp: 9", "unknown key 'warp'"),
        ("events: [{at: 1, action: explode}]", "unknown action 'explode'"),
        ("boards: [1, 2", "not valid YAML"),
    ],
)
def test_bad_scenarios_are_refused_with_the_reason(tmp_path: Path, content: str, message: str) -> None:
    scenario = tmp_path / "bad.yml"
    scenario.write_text(content)
    start = time.monotonic()
    result = subprocess.run(
        [VBOARD, "fleet", str(scenario), "--workdir", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert time.monotonic() - start < 30


def test_help_documents_every_option_and_action() -> None:
    for command, expected in (
        (
            ["run", "--help"],
            ["--name", "--port", "--speed", "--scenario", "--flash-from", "--heapsize", "--firmware-variant"],
        ),
        (["fleet", "--help"], ["--limit", "--flash-from", "--workdir"]),
        (["ctl", "--help"], list(control.ACTIONS)),
    ):
        out = subprocess.run([VBOARD, *command], capture_output=True, text=True, check=True).stdout
        for word in expected:
            assert word in out, (command, word)
