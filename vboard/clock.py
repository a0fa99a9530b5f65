"""Simulated time, shared by a virtual board's host process and its MicroPython process.

A board's simulated clock is a linear function of the host's CLOCK_REALTIME:

    sim_us = sim_anchor_us + (real_us - real_anchor_us) * speed_milli // 1000

Both processes read the same kernel clock (CPython `time.time_ns()`, MicroPython's unix port
`time.time_ns()`), so with the same three numbers they agree on simulated time to the
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
    return time.time_ns() // 1000


class SimClock:
    """Thread-safe simulated clock. `start` is the simulated Unix time at creation."""

    def __init__(self, start: float | None = None, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        now = real_now_us()
        sim = now if start is None else int(start * 1_000_000)
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
