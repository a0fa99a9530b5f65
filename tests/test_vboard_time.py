"""The virtual board's simulated time does not depend on how busy or fast the host is
(vboard/README.md, "Simulated time"): what the chip spends costs simulated time (its code, from
the interpreter thread's CPU time x the calibrated factor; the buses' bit times; conversions),
what is only the simulation's (host round trips, the host or the hypervisor preempting the
interpreter) costs none.

So two CPU-bound processes beside a fleet on this two-core machine leave every second's sample
on time, all but a few: with the clock as it was (the host's wall clock x speed, every round
trip charged x speed) the SHT20 board's polled reads spilled past their second for most
seconds. What is left is the host filesystem's kernel time, charged as the firmware's
(vboard/README.md, "Known differences"): in 14 runs here at most one late sample a board."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware import protocol
from tests.fw_board import (
    FIRMWARE_HEAP,
    Watcher,
    add_board,
    board_config,
    build_firmware,
    mismatches,
    truth_by_second,
)
from vboard.broker import Mosquitto
from vboard.fleet import Fleet
from vboard.spec import BoardSpec, LanSpec

SSID, PASSWORD = "lab-wifi", "lab-password-1"
SPEED = 60
SECONDS = 600  # simulated: ten real seconds at 60x
LATE_ALLOWED = 3  # per board (see the top)


@pytest.fixture
def two_cpu_hogs() -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_two_cpu_hogs_beside_the_fleet_leave_the_samples_on_time(
    tmp_path: Path, mosquitto: Mosquitto, two_cpu_hogs: None
) -> None:
    build = build_firmware(tmp_path / "firmware")
    lan = LanSpec(access_points=[{"ssid": SSID, "password": PASSWORD}])
    with Fleet(tmp_path / "fleet", speed=SPEED, lan=lan) as fleet:
        watcher = Watcher(mosquitto.port, clock=fleet.clock.now, client_id="time-witness").start()
        try:
            boards = {}
            for name, ambient, tc in (("busy-30", "SHT30", "MAX6675"), ("busy-20", "SHT20", "MAX31855")):
                spec = BoardSpec(
                    name=name, rtc_set=True, heapsize=FIRMWARE_HEAP, ambient=ambient, thermocouple=tc
                )
                sensors = {"thermocouple": tc, "ambient": ambient}
                cfg = board_config(name, mosquitto.port, SSID, PASSWORD, sensors=sensors)
                boards[name] = add_board(fleet, spec, build, cfg)
            watcher.wait_for(lambda w: all(w.samples_of(n) for n in boards), 120, "samples of both boards")
            firsts = {name: watcher.samples_of(name)[0][protocol.I_TIME] for name in boards}
            watcher.wait_for(
                lambda w: all(
                    w.samples_of(n) and w.samples_of(n)[-1][protocol.I_TIME] >= firsts[n] + SECONDS
                    for n in boards
                ),
                SECONDS / SPEED * 6 + 120,
                f"{SECONDS} s of samples from each board",
            )
            for name, board in boards.items():
                samples = sorted(set(watcher.samples_of(name)), key=lambda s: s[protocol.I_SEQ])
                times = [s[protocol.I_TIME] for s in samples]
                assert times == list(range(times[0], times[0] + len(times))), f"{name}: a second is missing"
                late = [s for s in samples if s[protocol.I_FLAGS] & protocol.FLAG_LATE]
                assert len(late) <= LATE_ALLOWED, f"{name}: {len(late)} of {len(samples)} samples late"
                flagged = [s for s in samples if s[protocol.I_FLAGS] and s not in late]
                assert not flagged, f"{name}: {flagged[:3]}"
                assert all(s[protocol.I_FLAGS] == protocol.FLAG_LATE for s in late), f"{name}: {late[:3]}"
                assert not mismatches(samples, truth_by_second(board)), name
                assert board.irq_lost == 0, name
        finally:
            watcher.stop()
