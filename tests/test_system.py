"""The whole system at its seams: the firmware on virtual boards (real MicroPython, simulated
chips) → a real mosquitto → the recorder as real processes → HDF5 files, with faults injected at
every seam. What ends up in the files is compared with the virtual boards' ground truth: every
DS3231 second of every board once, each value equal to what the chip model converted in that
second (to sensor resolution), nothing recorded twice.

Late samples: at N x speed every host round trip costs N x its real time in simulated time, so on
a busy host a sample's reads can spill past its second; the firmware then sends nulls with
FLAG_LATE instead of a value under the wrong second (tests/test_fw_app.py explains). They are
still samples of their second (nothing is lost); they are counted and bounded here.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware import protocol
from recorder.read import read_all, read_samples, summarize
from tests.fw_board import (
    FIRMWARE_HEAP,
    Watcher,
    add_board,
    board_config,
    build_firmware,
    console_text,
    mismatches,
    truth_by_second,
    wait_sim,
)
from tests.test_recorder_helpers import RecorderProcess, all_files_open, raw_sample_ids, wait_for
from vboard.board import Board
from vboard.broker import Mosquitto
from vboard.fleet import Fleet
from vboard.spec import BoardSpec, LanSpec

SSID, PASSWORD = "lab-wifi", "lab-password-1"
FLUSH_S = 10  # the firmware's default buffer.flush_s: the most a reset may lose (firmware/config.py)
LATE_ALLOWED, LATE_SHARE_MAX = 3, 0.02
Sample = tuple[Any, ...]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_firmware(tmp_path_factory.mktemp("firmware"))


@dataclass
class System:
    fleet: Fleet
    broker: Mosquitto
    recorder: RecorderProcess
    build: Path
    witness: Watcher  # an independent QoS 1 subscriber: tells which seam lost a missing sample
    boards: dict[str, Board] = field(default_factory=dict)

    def add(self, name: str) -> Board:
        spec = BoardSpec(name=name, rtc_set=True, heapsize=FIRMWARE_HEAP)
        cfg = board_config(name, self.broker.port, SSID, PASSWORD)
        self.boards[name] = add_board(self.fleet, spec, self.build, cfg)
        return self.boards[name]

    def recorded(self, device: str) -> list[Sample]:
        """The device's samples in the HDF5 files, as wire tuples (values in hundredths)."""
        frame = read_samples(self.recorder.data_dir, device)
        out = []
        for row in frame.itertuples(index=False):
            sample: list[Any] = [None] * len(protocol.SAMPLE_FIELDS)
            sample[protocol.I_BOOT] = int(row.boot)
            sample[protocol.I_SEQ] = int(row.seq)
            sample[protocol.I_TIME] = int(row.t)
            for name, index in (("kT", protocol.I_KT), ("aT", protocol.I_AT), ("aH", protocol.I_AH)):
                value = float(getattr(row, name))
                sample[index] = None if math.isnan(value) else protocol.to_hundredths(value)
            sample[protocol.I_FLAGS] = int(row.flags)
            out.append(tuple(sample))
        return sorted(out, key=lambda s: (s[protocol.I_BOOT], s[protocol.I_SEQ]))

    def last_second(self, device: str) -> int:
        samples = self.recorded(device)
        return samples[-1][protocol.I_TIME] if samples else 0

    def wait_recorded_until(self, second: float, timeout: float = 120) -> None:
        """Until every board's samples up to `second` (simulated) are in the files."""
        for name in self.boards:
            wait_for(partial(self.caught_up, name, second), timeout, f"{name}'s samples up to {second:.0f}")

    def caught_up(self, device: str, second: float) -> bool:
        return self.last_second(device) >= second


@pytest.fixture
def system(
    tmp_path: Path, mosquitto: Mosquitto, build: Path, request: pytest.FixtureRequest
) -> Iterator[System]:
    marker = request.node.get_closest_marker("speed")
    lan = LanSpec(access_points=[{"ssid": SSID, "password": PASSWORD}])
    recorder = RecorderProcess(tmp_path, mosquitto.port)
    with Fleet(tmp_path / "fleet", speed=marker.args[0] if marker else 20, lan=lan) as fleet:
        witness = Watcher(mosquitto.port, clock=fleet.clock.now, client_id="system-witness").start()
        try:
            yield System(fleet, mosquitto, recorder.start(), build, witness)
        finally:
            witness.stop()
            recorder.close()


def by_boot(samples: list[Sample]) -> dict[int, list[Sample]]:
    boots: dict[int, list[Sample]] = {}
    for s in samples:
        boots.setdefault(s[protocol.I_BOOT], []).append(s)
    return boots


def assert_complete_and_true(system: System, board: Board, samples: list[Sample]) -> int:
    """Inside every boot: sequence numbers 0, 1, 2, … and DS3231 seconds t0, t0+1, … with no
    gap; every value the chip's conversion of that second. Returns the number of late samples."""
    assert samples, f"{board.name}: nothing recorded"
    for boot, run in by_boot(samples).items():
        seqs = [s[protocol.I_SEQ] for s in run]
        missing = sorted(set(range(seqs[-1] + 1)) - set(seqs))
        delivered = {(s[protocol.I_BOOT], s[protocol.I_SEQ]) for s in system.witness.samples_of(board.name)}
        seen = [seq for seq in missing if (boot, seq) in delivered]
        assert not missing, (
            f"{board.name} boot {boot}: sequence numbers {missing[:10]} missing "
            f"({len(seen)} of them were delivered by the broker to an independent subscriber)"
        )
        times = [s[protocol.I_TIME] for s in run]
        assert times == list(range(times[0], times[0] + len(run))), (
            f"{board.name} boot {boot}: a second is missing"
        )
    late = [s for s in samples if s[protocol.I_FLAGS] & protocol.FLAG_LATE]
    assert len(late) <= LATE_ALLOWED + LATE_SHARE_MAX * len(samples), f"{board.name}: {len(late)} late"
    for s in late:
        assert s[protocol.I_FLAGS] == protocol.FLAG_LATE, s
    for s in samples:
        if s not in late:
            assert s[protocol.I_FLAGS] == 0, s
    wrong = mismatches(samples, truth_by_second(board))
    assert not wrong, f"{board.name}: {wrong[:5]}"
    return len(late)


def assert_recorded_once(data_dir: Path) -> None:
    ids = raw_sample_ids(data_dir)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} samples recorded twice"


@pytest.mark.speed(30)
def test_five_boards_through_broker_and_recorder_kills_and_board_resets(system: System) -> None:
    """Five boards publish while mosquitto is killed (-9) and restarted, the recorder is killed
    (-9) twelve times, and one board is hard-reset twice: nothing lost, nothing twice, every
    file opens; the reset board loses at most the flush window, and the files show it."""
    rng = random.Random(20261124)
    fleet = system.fleet
    boards = [system.add(f"sys-{i:02d}") for i in range(1, 6)]
    resetting = boards[-1]
    start = fleet.clock.now()
    system.wait_recorded_until(start + 20)

    system.broker.restart(hard=True)
    resets: list[float] = []
    kills = 0
    for round_ in range(12):
        time.sleep(rng.uniform(0.2, 1.5))
        system.recorder.kill9(rng.choice(["all", "all", "service", "writer"]))
        kills += 1
        if system.recorder.proc is not None:  # only its writer died: the service starts another
            continue
        if round_ in (3, 8):
            fleet.run(resetting.reset())
            assert resetting.reset_at is not None
            resets.append(resetting.reset_at)  # the board's clock: it may trail the fleet's
        if round_ == 6:
            system.broker.restart(hard=True)
        system.recorder.start(wait_subscribed=rng.random() < 0.5)
    end = fleet.clock.now()
    wait_sim(fleet, end + 5)
    system.wait_recorded_until(end)
    system.recorder.stop()

    assert all_files_open(system.recorder.data_dir) >= 1
    assert_recorded_once(system.recorder.data_dir)
    late = 0
    for board in boards:
        samples = system.recorded(board.name)
        late += assert_complete_and_true(system, board, samples)
        assert samples[0][protocol.I_SEQ] == 0 and samples[0][protocol.I_BOOT] == 1
    assert kills >= 10

    # The reset board: one boot per reset, each ending at most FLUSH_S seconds before its reset
    boots = by_boot(system.recorded(resetting.name))
    assert sorted(boots) == [1, 2, 3]
    lost = [
        math.floor(at) - boots[boot][-1][protocol.I_TIME] for boot, at in zip((1, 2), resets, strict=True)
    ]
    print(f"\n{kills} recorder kills, late samples {late}, lost at the resets: {lost} (flush_s {FLUSH_S})")
    assert all(0 <= n <= FLUSH_S for n in lost), lost
    # ... and the files say so: seconds without a sample, and the reset cause of each boot
    gaps = sum(boots[b + 1][0][protocol.I_TIME] - boots[b][-1][protocol.I_TIME] - 1 for b in (1, 2))
    summary = {d.device: d for d in summarize(system.recorder.data_dir).devices}
    assert summary[resetting.name].boots == 3
    assert summary[resetting.name].unsampled_s == gaps > 0
    info = read_all(system.recorder.data_dir, "info")
    causes = {
        b.name: list(info[info["device"] == b.name].drop_duplicates("boot")["reset"]) for b in boards[:-1]
    }
    steady = {b.name: (summary[b.name].boots, summary[b.name].unsampled_s) for b in boards[:-1]}
    assert all(s == (1, 0) for s in steady.values()), f"boots, unsampled seconds: {steady}; resets {causes}"
    mine = info[info["device"] == resetting.name].drop_duplicates("boot")
    assert list(zip(mine["boot"], mine["reset"], strict=True)) == [(1, "power"), (2, "hard"), (3, "hard")]


@pytest.mark.slow
@pytest.mark.speed(60)
def test_two_hours_without_wifi_and_a_connection_cut_again_and_again_lose_nothing(system: System) -> None:
    """One board's WiFi is gone for two simulated hours; another's broker connection is cut
    every couple of simulated minutes. Both end complete and true in the files."""
    fleet = system.fleet
    offline, cut = system.add("sys-wifi"), system.add("sys-cut")
    start = fleet.clock.now()
    system.wait_recorded_until(start + 10)
    down = fleet.clock.now()
    fleet.call(lambda: offline.station.drop_link(2 * 3600))
    cuts = 0
    while fleet.clock.now() < down + 2 * 3600:
        wait_sim(fleet, fleet.clock.now() + 150)
        cuts += fleet.call(cut.gateway.cut)
    back = down + 2 * 3600
    system.wait_recorded_until(back + 30, timeout=180)
    system.recorder.stop()

    assert_recorded_once(system.recorder.data_dir)
    for board in (offline, cut):
        samples = system.recorded(board.name)
        assert_complete_and_true(system, board, samples)
        console = console_text(board)[-3000:]
        assert list(by_boot(samples)) == [1], f"{board.name} rebooted; its console:\n{console}"
    outage = [s for s in system.recorded(offline.name) if down + 2 <= s[protocol.I_TIME] <= back - 2]
    assert len(outage) >= 2 * 3600 - 4
    health = read_all(system.recorder.data_dir, "health")
    reconnects = health[health["device"] == cut.name]["reconnects"]
    print(f"\n{cuts} connections cut; {int(np.nanmax(reconnects))} reconnects reported by {cut.name}")
    assert np.nanmax(reconnects) >= 10
    backlog = health[health["device"] == offline.name]["backlog"]
    assert np.nanmax(backlog) >= 3600  # the replay was reported while it ran
