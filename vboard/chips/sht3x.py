"""Sensirion SHT30 (SHT3x-DIS) at I2C 0x44 or 0x45, from the datasheet (v5, 2018).

Single shot with clock stretching: the read header after the command is ACKed and SCL is held
low until the measurement is done. Without stretching: the read header is NACKed until the
measurement is done. Periodic mode (0.5/1/2/4/10 mps and ART): results are fetched with 0xE000;
a read header with no new result is NACKed. A result is read once; further read headers are
NACKed until the next command. Periodic results are computed lazily, so only the fetched ones
appear in the reading log (sampled at their measurement's start).

Assumptions where the datasheet is silent: an unknown command has its second byte NACKed and
sets the command-status bit; in periodic mode only fetch, break, soft reset, status and heater
commands are accepted (the datasheet asks for a break before anything else); write headers are
ACKed during a measurement (a new command replaces the pending result). The heater's warming
of the sensor and the alert commands are not modelled.
"""

from __future__ import annotations

import math

from vboard.chips.base import (
    TIME_SLACK_S,
    Faults,
    Reading,
    ReadingLog,
    output_code,
    seeded_rng,
    take_crc_fault,
)
from vboard.chips.crc import sht3x_crc
from vboard.chips.signals import AH, AT, Environment

SHT3X_ADDRESSES = (0x44, 0x45)  # ADDR pin low / high

# repeatability -> max measurement duration (datasheet table 4)
MEASUREMENT_S = {"high": 0.015, "medium": 0.006, "low": 0.004}

# command -> (repeatability, clock stretching)
SINGLE_SHOT = {
    0x2C06: ("high", True),
    0x2C0D: ("medium", True),
    0x2C10: ("low", True),
    0x2400: ("high", False),
    0x240B: ("medium", False),
    0x2416: ("low", False),
}
# command -> (measurements per second, repeatability)
PERIODIC = {
    0x2032: (0.5, "high"),
    0x2024: (0.5, "medium"),
    0x202F: (0.5, "low"),
    0x2130: (1.0, "high"),
    0x2126: (1.0, "medium"),
    0x212D: (1.0, "low"),
    0x2236: (2.0, "high"),
    0x2220: (2.0, "medium"),
    0x222B: (2.0, "low"),
    0x2334: (4.0, "high"),
    0x2322: (4.0, "medium"),
    0x2329: (4.0, "low"),
    0x2737: (10.0, "high"),
    0x2721: (10.0, "medium"),
    0x272A: (10.0, "low"),
    0x2B32: (4.0, "high"),  # ART: accelerated response time, 4 Hz
}
CMD_FETCH = 0xE000
CMD_BREAK = 0x3093
CMD_SOFT_RESET = 0x30A2
CMD_READ_STATUS = 0xF32D
CMD_CLEAR_STATUS = 0x3041
CMD_HEATER_ON = 0x306D
CMD_HEATER_OFF = 0x3066
ALLOWED_IN_PERIODIC = (
    CMD_FETCH,
    CMD_BREAK,
    CMD_SOFT_RESET,
    CMD_READ_STATUS,
    CMD_CLEAR_STATUS,
    CMD_HEATER_ON,
    CMD_HEATER_OFF,
)

STATUS_ALERT_PENDING = 1 << 15
STATUS_HEATER = 1 << 13
STATUS_RH_ALERT = 1 << 11
STATUS_T_ALERT = 1 << 10
STATUS_RESET_DETECTED = 1 << 4
STATUS_COMMAND_FAILED = 1 << 1
STATUS_WRITE_CRC_FAILED = 1 << 0
STATUS_AFTER_RESET = STATUS_ALERT_PENDING | STATUS_RESET_DETECTED
STATUS_CLEARABLE = STATUS_ALERT_PENDING | STATUS_RH_ALERT | STATUS_T_ALERT | STATUS_RESET_DETECTED

POWER_UP_S = 0.0015  # tPU max
SOFT_RESET_S = 0.0015
IDLE_BYTE = 0xFF  # SDA released


def temperature_code(celsius: float) -> int:
    """S_T for a temperature: T = -45 + 175 * S_T / 65535, inverted and rounded."""
    return output_code(celsius + 45.0, 175.0 / 65535.0, 0, 0xFFFF)


def temperature_from_code(code: int) -> float:
    return -45.0 + 175.0 * code / 65535.0


def humidity_code(percent: float) -> int:
    """S_RH for a relative humidity: RH = 100 * S_RH / 65535, inverted and rounded."""
    return output_code(percent, 100.0 / 65535.0, 0, 0xFFFF)


def humidity_from_code(code: int) -> float:
    return 100.0 * code / 65535.0


def _word(code: int, corrupt: bool) -> bytes:
    pair = code.to_bytes(2, "big")
    crc = sht3x_crc(pair)
    return pair + bytes([crc ^ 0xFF if corrupt else crc])


class SHT3x:
    def __init__(self, env: Environment, *, address: int = 0x44, powered_at: float = 0.0) -> None:
        if address not in SHT3X_ADDRESSES:
            raise ValueError(f"an SHT3x answers at 0x44 or 0x45, not {address:#04x}")
        self.i2c_address = address
        self.faults = Faults()
        self.log = ReadingLog()
        self.env = env
        self._rng = seeded_rng(env.seed, f"SHT3x@{address:#04x}")
        self.power_cycle(powered_at)

    def power_cycle(self, now: float) -> None:
        self._reset(now, POWER_UP_S)

    def _reset(self, now: float, duration: float) -> None:
        self._busy_until = now + duration
        self._status = STATUS_AFTER_RESET
        self._heater = False
        self._command = bytearray()
        self._reply: bytes | None = None
        self._reply_ready_at = 0.0
        self._reply_stretches = False
        self._periodic: tuple[float, float, float] | None = None  # (start, period, duration)
        self._last_fetched = -1
        self._fetch_pending = False

    @property
    def status(self) -> int:
        return self._status | (STATUS_HEATER if self._heater else 0)

    @property
    def periodic(self) -> bool:
        return self._periodic is not None

    def _measure(self, sampled_at: float) -> bytes:
        """Convert T and RH as they are at `sampled_at`, log them, and build the 6-byte reply."""
        t_truth = self.env.value(AT, sampled_at)
        rh_truth = self.env.value(AH, sampled_at)
        t_code = temperature_code(t_truth)
        rh_code = humidity_code(rh_truth)
        self.log.add(Reading(sampled_at, AT, t_truth, temperature_from_code(t_code), t_code))
        self.log.add(Reading(sampled_at, AH, rh_truth, humidity_from_code(rh_code), rh_code))
        corrupt = take_crc_fault(self.faults, self._rng)
        return _word(t_code, corrupt) + _word(rh_code, corrupt)

    def _execute(self, now: float, command: int) -> bool:
        """Run a command; False if it is not accepted (its second byte is NACKed)."""
        if self._periodic is not None and command not in ALLOWED_IN_PERIODIC:
            self._status |= STATUS_COMMAND_FAILED
            return False
        if command == CMD_SOFT_RESET:
            self._reset(now, SOFT_RESET_S)
            return True
        self._reply = None
        self._fetch_pending = False
        if command == CMD_READ_STATUS:
            # reports the previous command's outcome, so it leaves the command-status bit alone
            status = self.status.to_bytes(2, "big")
            self._set_reply(now, status + bytes([sht3x_crc(status)]), stretches=False)
            return True
        if command in SINGLE_SHOT:
            repeatability, stretches = SINGLE_SHOT[command]
            self._set_reply(now + MEASUREMENT_S[repeatability], self._measure(now), stretches)
        elif command in PERIODIC:
            measurements_per_s, repeatability = PERIODIC[command]
            self._periodic = (now, 1.0 / measurements_per_s, MEASUREMENT_S[repeatability])
            self._last_fetched = -1
        elif command == CMD_FETCH and self._periodic is not None:
            self._fetch_pending = True
        elif command == CMD_BREAK:
            self._periodic = None
        elif command == CMD_CLEAR_STATUS:
            self._status &= ~STATUS_CLEARABLE
        elif command in (CMD_HEATER_ON, CMD_HEATER_OFF):
            self._heater = command == CMD_HEATER_ON
        else:
            self._status |= STATUS_COMMAND_FAILED
            return False
        self._status &= ~STATUS_COMMAND_FAILED
        return True

    def _set_reply(self, ready_at: float, reply: bytes, stretches: bool) -> None:
        self._reply = reply
        self._reply_ready_at = ready_at
        self._reply_stretches = stretches

    def _fetch(self, now: float) -> bool:
        """Periodic mode: make the newest result not yet fetched the reply, if there is one."""
        assert self._periodic is not None
        start, period, duration = self._periodic
        newest = math.floor((now + TIME_SLACK_S - start - duration) / period)
        if newest < 0 or newest <= self._last_fetched:
            return False
        self._last_fetched = newest
        self._fetch_pending = False
        self._set_reply(now, self._measure(start + newest * period), stretches=False)
        return True

    # --- I2CDevice ----------------------------------------------------------------------------

    def address(self, now: float, read: bool) -> bool:
        if not self.faults.plugged or now + TIME_SLACK_S < self._busy_until:
            return False
        if not read:
            self._command.clear()
            return True
        if self._fetch_pending:
            return self._fetch(now)
        if self._reply is None:
            return False
        return self._reply_stretches or now + TIME_SLACK_S >= self._reply_ready_at

    def write(self, now: float, data: bytes) -> int:
        for index, byte in enumerate(data):
            if len(self._command) == 2:
                return index  # no command of this model takes data bytes
            self._command.append(byte)
            if len(self._command) == 2 and not self._execute(now, int.from_bytes(self._command, "big")):
                return index
        return len(data)

    def stretch(self, now: float) -> float:
        if self._reply is not None and self._reply_stretches:
            return max(0.0, self._reply_ready_at - now)
        return 0.0

    def read(self, now: float, n: int) -> bytes:
        reply = self._reply or b""
        self._reply = None
        return reply[:n] + bytes([IDLE_BYTE]) * max(0, n - len(reply))

    def stop(self, now: float) -> None:
        self._command.clear()
