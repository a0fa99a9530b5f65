"""Simulated time, shared by a virtual board's host process and its MicroPython process.

A board's simulated clock is a linear function of the host's CLOCK_MONOTONIC:

    sim_us = sim_anchor_us + (real_us - real_anchor_us) * speed_milli // 1000

Both processes read the same kernel clock (CPython `time.monotonic_ns()`, MicroPython's unix
port `time.ticks_us()`: unix_mphal.c reads CLOCK_MONOTONIC, and on the 64-bit port the value is
a small int, where `time_ns()` makes a long one on every call), so with the same three numbers
they agree on simulated time to the
microsecond without exchanging messages. Everything on the board that measures or waits for
time derives from this one function: `time.time()`/`ticks_*`/`sleep*`, the DS3231 registers and
its SQW edges, sensor conversion times, NTP answers, socket and WDT timeouts. A speed change
re-anchors at "now" so simulated time never jumps.

Timeouts that guard against something being stuck (socket/connect timeouts, the watchdog)
are divided by the speed but never shorter than `REAL_TIMEOUT_FLOOR_S` of real time: the
host's scheduling jitter is real time, and a board at 60x must not see a 50 ms hiccup of a
shared CI machine as a 3-second network stall.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import time
from dataclasses import dataclass

REAL_TIMEOUT_FLOOR_S = 1.0
# 2000-01-01T00:00:00Z: the ESP8266 port's epoch, in Unix seconds.
ESP_EPOCH_OFFSET_S = 946_684_800


@dataclass(frozen=True)
class Anchors:
    real_us: int
    sim_us: int
    speed_milli: int

    def sim_at(self, real_us: int) -> int:
        return self.sim_us + (real_us - self.real_us) * self.speed_milli // 1000

    def real_at(self, sim_us: int) -> int:
        return self.real_us + (sim_us - self.sim_us) * 1000 // self.speed_milli


def real_now_us() -> int:
    return time.monotonic_ns() // 1000


class SimClock:
    """Thread-safe simulated clock. `start` is the simulated Unix time at creation."""

    def __init__(self, start: float | None = None, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        now = real_now_us()
        sim = time.time_ns() // 1000 if start is None else int(start * 1_000_000)  # Unix time
        self._lock = threading.Lock()
        self._anchors = Anchors(now, sim, round(speed * 1000))

    @property
    def anchors(self) -> Anchors:
        return self._anchors

    @property
    def speed(self) -> float:
        return self._anchors.speed_milli / 1000

    def set_speed(self, speed: float) -> Anchors:
        if speed <= 0:
            raise ValueError("speed must be positive")
        with self._lock:
            now = real_now_us()
            self._anchors = Anchors(now, self._anchors.sim_at(now), round(speed * 1000))
            return self._anchors

    def now_us(self) -> int:
        return self._anchors.sim_at(real_now_us())

    def now(self) -> float:
        """Simulated Unix time in seconds."""
        return self.now_us() / 1_000_000

    def real_delay(self, sim_seconds: float) -> float:
        """Real seconds until `sim_seconds` of simulated time have passed."""
        return max(0.0, sim_seconds * 1000 / self._anchors.speed_milli)

    def real_until(self, sim_time: float) -> float:
        """Real seconds from now until simulated Unix time `sim_time` (0 if already past)."""
        target = self._anchors.real_at(int(sim_time * 1_000_000))
        return max(0.0, (target - real_now_us()) / 1_000_000)

    def guard_timeout(self, sim_seconds: float) -> float:
        """Real seconds for a stuck-guarding timeout of `sim_seconds` (see module doc)."""
        return max(self.real_delay(sim_seconds), REAL_TIMEOUT_FLOOR_S)


# -- what the board's code costs: host CPU time x cpu_factor -------------------------------------
#
# A board's firmware runs on this host's MicroPython many times faster than on an 80 MHz ESP8266;
# vb_hal.py charges its CPU time times cpu_factor(). The factor is measured on this host, in CPU
# time (which a busy neighbour process does not stretch), by timing CALIBRATION_WORK:
#   - reference: MicroPython's tests/perf_bench/misc_pystone.py, Proc0(300), took 162.4 ms on a
#     PYBv1.0 (STM32F405, 168 MHz; dpgeorge's figures in micropython/micropython PR #4858);
#     scaled to the ESP8266's 80 MHz clock at the same work per cycle: 341 ms. (An estimate:
#     no ESP8266 figure for that benchmark is published; the LX106 executing from flash cache
#     is, if anything, slower per cycle. vboard/README.md lists it as a known difference.)
#   - CALIBRATION_WORK took 0.66 x the time of Proc0(6000) on this kind of host (the minimum
#     of 6 interleaved runs each, 21 vs 32 ms CPU), so an ESP8266 would need
#     ESP8266_CALIBRATION_MS = 341 x 20 x 0.66 = 4,476 ms for it.
CALIBRATION_WORK = """
import time, struct
class Reading:
    def __init__(self, raw):
        self.raw = raw
    def value(self):
        return (self.raw * 175) // 65535 - 45
def work(n):
    buf = bytearray(8)
    total = 0
    d = {}
    for i in range(n):
        r = Reading(i & 0xFFFF)
        total += r.value()
        struct.pack_into("<HH", buf, 0, i & 0xFFFF, total & 0xFFFF)
        d[i & 15] = buf[0] ^ buf[3]
        if i % 7 == 0:
            total -= len(d)
    return total
best = 1e9
for k in range(5):
    c0 = time.clock(); work(20000); c1 = time.clock()
    best = min(best, c1 - c0)
print(best)
"""
ESP8266_CALIBRATION_MS = 4476.0
CPU_FACTOR_ENV = "VBOARD_CPU_FACTOR"  # set to skip the measurement (e.g. to compare hosts)


@functools.cache
def cpu_factor() -> float:
    """ESP8266 time / this host's MicroPython CPU time for the same code (measured once)."""
    override = os.environ.get(CPU_FACTOR_ENV)
    if override:
        return float(override)
    from vboard.board import micropython_binary

    out = subprocess.run(
        [micropython_binary(), "-c", CALIBRATION_WORK],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    host_ms = max(float(out.strip()) * 1000, 1.0)
    return ESP8266_CALIBRATION_MS / host_ms
