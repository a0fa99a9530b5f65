"""firmware/sampler.py's bookkeeping of seconds in the real MicroPython unix port, with the SQW
edges, the DS3231 and the sensors stood in for.

Stand-ins, because the virtual board cannot produce these on demand: an SQW interrupt the
ESP8266's scheduler dropped, a DS3231 read that ended in the next second, a main loop blocked for
several edges. The virtual-board tests (test_fw_app.py) cover the sampler against the real chip
models; here the point is that whatever the edge count and the DS3231 disagree about, every
second is sent exactly once and no value is sent under a second it was not measured in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from firmware import protocol
from tests.fw_run import checked, compile_firmware, run_script

HARNESS = """
import json, sys

class Pin:
    IN = 0
    PULL_UP = 1
    IRQ_RISING = 1
    level = 1
    def __init__(self, *args, **kwargs):
        pass
    def value(self):
        return Pin.level
    def irq(self, trigger=0, handler=None):
        pass

class FakeMachine:
    pass

machine = FakeMachine()
machine.Pin = Pin
sys.modules["machine"] = machine

import sampler, store
from drivers.errors import NotAnswering

class RTC:
    second = 1700000000  # what the DS3231 shows now
    def time(self):
        return RTC.second
    def datetime(self):
        s = RTC.second
        return (2023, 11, 14, s // 3600 % 24, s // 60 % 60, s % 60)

class TC:
    conversion_ms = 0
    def read(self):
        return RTC.second % 1000 * 100  # a value that says which second it was measured in

s = store.Store(200, 0, batch=200)
smp = sampler.Sampler(s, 1, RTC(), TC(), None, 2)

def edge(second, shows=None):
    # one SQW edge of DS3231 second `second`; the DS3231 shows `shows` while it is sampled
    RTC.second = second if shows is None else shows
    sampler._on_edge(None)

def run():
    smp.service()

def lost(second):
    # an edge the scheduler dropped: the DS3231 counted on, the sampler never heard of it
    RTC.second = second

def samples():
    out = []
    while s.pending():
        n = s.take(200)
        out.extend(json.loads(bytes(s.batch())))
        s.commit(n)
    return out
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_firmware(tmp_path_factory.mktemp("fwlib"))


def scenario(micropython_bin: str, lib: Path, cwd: Path, body: str) -> list[list[Any]]:
    out = checked(run_script(micropython_bin, lib, HARNESS + body + "\nprint(json.dumps(samples()))\n", cwd))
    return out[-1]  # type: ignore[no-any-return]


def seconds(samples: list[list[Any]]) -> list[int]:
    return [s[protocol.I_TIME] for s in samples]


def late(samples: list[list[Any]]) -> list[int]:
    return [s[protocol.I_TIME] for s in samples if s[protocol.I_FLAGS] & protocol.FLAG_LATE]


def assert_values_are_of_their_second(samples: list[list[Any]]) -> None:
    for s in samples:
        if s[protocol.I_KT] is not None:
            assert s[protocol.I_KT] == s[protocol.I_TIME] % 1000 * 100, s


T0 = 1_700_000_000


def test_one_sample_per_edge_from_the_anchor_on(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    got = scenario(
        micropython_bin,
        lib,
        tmp_path,
        "for k in range(5):\n    edge(T0 + k)\n    run()\n".replace("T0", str(T0)),
    )
    assert seconds(got) == [T0 + k for k in range(1, 5)]  # the anchor edge is not sampled
    assert [s[protocol.I_SEQ] for s in got] == list(range(4))
    assert late(got) == []
    assert_values_are_of_their_second(got)


def test_a_lost_edge_leaves_no_gap_and_no_wrong_value(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = f"""
for k in range(3):
    edge({T0} + k); run()
lost({T0} + 3)
for k in range(4, 12):
    edge({T0} + k); run()
"""
    got = scenario(micropython_bin, lib, tmp_path, body)
    assert seconds(got) == list(range(T0 + 1, T0 + 12))  # every second once, the lost one too
    assert late(got)  # the seconds the count was behind are nulls with FLAG_LATE
    assert all(s[protocol.I_KT] is None for s in got if s[protocol.I_FLAGS])
    assert_values_are_of_their_second(got)
    assert got[-1][protocol.I_KT] is not None  # and the count is right again


def test_an_anchor_read_that_ended_in_the_next_second_is_corrected(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = f"""
edge({T0}, shows={T0} + 1); run()     # the anchor: the DS3231 read already showed the next second
for k in range(1, 8):
    edge({T0} + k); run()
"""
    got = scenario(micropython_bin, lib, tmp_path, body)
    assert seconds(got) == list(range(T0 + 1, T0 + 8))
    assert late(got) == [T0 + 1]  # found out at the first sample, which gets no values
    assert_values_are_of_their_second(got)


def test_edges_missed_while_the_loop_was_blocked_get_late_nulls(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = f"""
edge({T0}); run()
edge({T0} + 1); run()
edge({T0} + 2); edge({T0} + 3); edge({T0} + 4); run()   # three edges before the loop came back
edge({T0} + 5); run()
"""
    got = scenario(micropython_bin, lib, tmp_path, body)
    assert seconds(got) == list(range(T0 + 1, T0 + 6))
    assert late(got) == [T0 + 2, T0 + 3]
    assert_values_are_of_their_second(got)


def test_a_clock_set_starts_a_new_sequence_of_seconds(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = f"""
import time
for k in range(3):
    edge({T0} + k); run()
time.sleep_ms(2)
smp.reanchor(time.ticks_ms())     # timesync set the DS3231 an hour back
time.sleep_ms(2)
for k in range(3):
    edge({T0} - 3600 + k); run()
"""
    got = scenario(micropython_bin, lib, tmp_path, body)
    assert seconds(got) == [T0 + 1, T0 + 2, T0 - 3600 + 1, T0 - 3600 + 2]
    assert late(got) == []
    assert_values_are_of_their_second(got)


def test_a_late_read_gives_nulls_not_the_next_seconds_value(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = f"""
edge({T0}); run()
edge({T0} + 1, shows={T0} + 2); run()   # this sample's reads ended in the next second
edge({T0} + 2); run()
edge({T0} + 3); run()
"""
    got = scenario(micropython_bin, lib, tmp_path, body)
    assert seconds(got) == list(range(T0 + 1, T0 + 4))
    assert late(got) == [T0 + 1]
    assert got[0][protocol.I_KT] is None
    assert_values_are_of_their_second(got)


def test_a_thermocouple_read_right_after_a_late_one_waits_for_a_fresh_conversion(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    """A converter read again before its conversion time answers with the previous conversion
    (CS low aborts the running one): the value would be the previous second's."""
    body = f"""
import time

class SlowTC:
    conversion_ms = 220
    last = None
    def read(self):
        now = time.ticks_ms()
        stale = SlowTC.last is not None and time.ticks_diff(now, SlowTC.last) < self.conversion_ms
        SlowTC.last = now
        return -100 if stale else RTC.second % 1000 * 100

smp.tc = SlowTC()
edge({T0}); run()
edge({T0} + 1); run()
edge({T0} + 2); run()   # the previous read was a moment ago (it came late)
edge({T0} + 3); run()
"""
    got = scenario(micropython_bin, lib, tmp_path, body)
    assert seconds(got) == list(range(T0 + 1, T0 + 4))
    assert late(got) == []
    assert all(s[protocol.I_KT] is not None for s in got)
    assert_values_are_of_their_second(got)


# The ESP8266 port's ticks: MICROPY_PY_TIME_TICKS_PERIOD is MP_SMALL_INT_POSITIVE_MASK + 1
# (py/mpconfig.h), 2**30 with the port's 31-bit small ints, and ticks_add raises OverflowError
# for a delta of 2**29 or more (extmod/modtime.c). The unix port's period is 2**62, so a stand-in
# `time` with the chip's period and a clock the script moves.
CHIP_TIME = """
class ChipTime:
    PERIOD = 1 << 30
    now_ms = 0

    @staticmethod
    def ticks_ms():
        return ChipTime.now_ms & (ChipTime.PERIOD - 1)

    @staticmethod
    def ticks_diff(a, b):
        half = ChipTime.PERIOD >> 1
        return ((a - b + half) & (ChipTime.PERIOD - 1)) - half

    @staticmethod
    def ticks_add(t, delta):
        if not -(ChipTime.PERIOD >> 1) < delta < ChipTime.PERIOD >> 1:
            raise OverflowError("ticks interval overflow")
        return (t + delta) & (ChipTime.PERIOD - 1)

    @staticmethod
    def sleep_ms(ms):
        ChipTime.now_ms += ms

sys.modules["time"] = ChipTime
"""

FORTNIGHT = """
DAY = 86400
days = 14
drops = {int(d * DAY) for d in (6.5, 8, 9.5, 11, 12, 13.5)}  # the DS3231 read disagrees: re-anchor
set_at = 7 * DAY  # timesync writes the DS3231 (the same second, a new phase)
expected = None
sent = dupes = gaps = valued = 0
for k in range(days * DAY):
    ChipTime.now_ms += 1000
    second = T0 + k
    if k == set_at:
        ChipTime.now_ms += 3
        smp.reanchor(ChipTime.ticks_ms())
        ChipTime.now_ms += 3
    edge(second, shows=second + 7 if k in drops else None)
    run()
    if k % 100 == 99 or k == days * DAY - 1:
        while s.pending():
            n = s.take(200)
            for row in json.loads(bytes(s.batch())):
                t = row[2]
                if expected is not None and t != expected:
                    if t < expected:
                        dupes += 1
                    else:
                        gaps += t - expected
                expected = t + 1
                sent += 1
                valued += row[3] is not None
            s.commit(n)
print(json.dumps({"sent": sent, "dupes": dupes, "gaps": gaps, "valued": valued, "last": expected - 1}))
"""


@pytest.mark.slow
def test_a_fortnight_of_chip_ticks_with_a_clock_set_and_anchors_dropped(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    """ticks_ms wraps at 2**30 ms (12.4 days) on the chip and ticks_diff means nothing beyond
    2**29 ms (6.2 days): an anchor dropped more than 6.2 days after the last one must still
    re-anchor at the next edge (it waited up to 6.2 days, no samples, before)."""
    harness = HARNESS.replace("import sampler, store", CHIP_TIME + "import sampler, store")
    body = FORTNIGHT.replace("T0", str(T0))
    out = checked(run_script(micropython_bin, lib, harness + body, tmp_path, heap="512K", timeout=600))[-1]
    seconds_run = 14 * 86400
    # every second once from the first anchor on, but for the edge that anchors after the set
    # (a clock set starts a new sequence of seconds, see test_a_clock_set_...)
    assert (out["dupes"], out["gaps"]) == (0, 1), out
    assert out["last"] == T0 + seconds_run - 1
    assert out["sent"] == seconds_run - 2
    # the drops and the set cost a second or two of values each, nothing more
    assert out["valued"] >= out["sent"] - 20, out
