"""Maxim MAX6675 K-thermocouple converter on SPI, from the datasheet; plus the conversion/CS
behaviour it shares with the MAX31855.

16-bit frame, MSB first: D15 = 0, D14..D3 temperature (12 bits, 0.25 degC, 0..1023.75),
D2 = 1 when the thermocouple is open, D1 = 0 (device ID), D0 three-state (reads the MISO float
level). CS low stops any conversion and shifts out the newest finished result; CS high starts
converting again, back to back, 0.22 s each (max). After the frame MISO is three-stated.

Where the datasheet is silent: the temperature bits of an open-thermocouple frame read full
scale (`fault_code`, the input floats to the rail); the register holds 0 until the first
conversion after power-up finishes.
"""

from __future__ import annotations

import math

from vboard.chips.base import TIME_SLACK_S, Faults, Reading, ReadingLog, output_code
from vboard.chips.signals import KT, Environment

MAX6675_CONVERSION_S = 0.22  # max (0.17 typ)
MAX6675_LSB = 0.25
MAX6675_CODE_MAX = 0xFFF  # 1023.75 degC
MAX6675_OPEN = 0x0004  # D2


class ContinuousConverter:
    """A read-only SPI converter that converts back to back while CS is high."""

    conversion_s: float
    frame_bytes: int

    def __init__(self, env: Environment, *, powered_at: float = 0.0, miso_float: int = 0x00) -> None:
        self.faults = Faults()
        self.log = ReadingLog()
        self.env = env
        self.miso_float = miso_float
        self.power_cycle(powered_at)

    def power_cycle(self, now: float) -> None:
        self._converting_since: float | None = now  # CS idles high: converting from power-up
        self._frame = 0
        self._shifted = 0

    def _convert(self, sampled_at: float) -> int:
        """The frame of a conversion of the inputs at `sampled_at` (and log it)."""
        raise NotImplementedError

    def select(self, now: float) -> None:
        since = self._converting_since
        if since is not None:
            finished = math.floor((now - since + TIME_SLACK_S) / self.conversion_s)
            if finished >= 1:
                self._frame = self._convert(since + (finished - 1) * self.conversion_s)
        self._converting_since = None
        self._shifted = 0

    def deselect(self, now: float) -> None:
        self._converting_since = now

    def transfer(self, now: float, mosi: bytes) -> bytes:
        frame = self._frame.to_bytes(self.frame_bytes, "big")
        out = bytearray()
        for _ in mosi:
            out.append(frame[self._shifted] if self._shifted < self.frame_bytes else self.miso_float)
            self._shifted += 1
        return bytes(out)


class MAX6675(ContinuousConverter):
    conversion_s = MAX6675_CONVERSION_S
    frame_bytes = 2

    def __init__(
        self,
        env: Environment,
        *,
        powered_at: float = 0.0,
        miso_float: int = 0x00,
        fault_code: int = MAX6675_CODE_MAX,
    ) -> None:
        self.fault_code = fault_code
        super().__init__(env, powered_at=powered_at, miso_float=miso_float)

    def _convert(self, sampled_at: float) -> int:
        truth = self.env.value(KT, sampled_at)
        three_state_bit = self.miso_float & 0x01
        if self.faults.tc_open:
            frame = self.fault_code << 3 | MAX6675_OPEN | three_state_bit
            self.log.add(Reading(sampled_at, KT, truth, math.nan, self.fault_code))
            return frame
        code = output_code(truth, MAX6675_LSB, 0, MAX6675_CODE_MAX)
        frame = code << 3 | three_state_bit
        self.log.add(Reading(sampled_at, KT, truth, code * MAX6675_LSB, code))
        return frame
