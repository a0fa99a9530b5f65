"""Sensirion SHT20 at I2C 0x40 (the SHT2x/HTU21 command set), from the SHT20 datasheet (v3, 2011).

Hold master (0xE3 T, 0xE5 RH): the read header is ACKed and SCL is held low until the
measurement is done. No hold master (0xF3, 0xF5): the read header is NACKed until it is done.
Reply: MSB, LSB, CRC; the two lowest bits of LSB are status (bit 1: 1 = humidity). The
measurement time and the number of significant bits follow the resolution in the user register.
A result is read once; further read headers are NACKed until the next command.

Assumptions where the datasheet is silent: an unknown command byte is NACKed; write headers are
ACKed during a measurement (a new command replaces the pending result). The heater's warming
and the end-of-battery detector (bit 6 reads 0) are not modelled.
"""

from __future__ import annotations

from vboard.chips.base import (
    TIME_SLACK_S,
    Faults,
    Reading,
    ReadingLog,
    output_code,
    seeded_rng,
    take_crc_fault,
)
from vboard.chips.crc import sht2x_crc
from vboard.chips.signals import AH, AT, Environment

SHT2X_ADDRESS = 0x40

CMD_T_HOLD = 0xE3
CMD_RH_HOLD = 0xE5
CMD_T_NO_HOLD = 0xF3
CMD_RH_NO_HOLD = 0xF5
CMD_WRITE_USER = 0xE6
CMD_READ_USER = 0xE7
CMD_SOFT_RESET = 0xFE
# command -> (quantity, hold master)
MEASUREMENTS = {
    CMD_T_HOLD: (AT, True),
    CMD_RH_HOLD: (AH, True),
    CMD_T_NO_HOLD: (AT, False),
    CMD_RH_NO_HOLD: (AH, False),
}

USER_RESOLUTION_BIT7 = 0x80
USER_RESOLUTION_BIT0 = 0x01
USER_END_OF_BATTERY = 0x40  # read-only
USER_RESERVED = 0x38  # must keep their values
USER_HEATER = 0x04
USER_DISABLE_OTP_RELOAD = 0x02
USER_WRITABLE = USER_RESOLUTION_BIT7 | USER_RESOLUTION_BIT0 | USER_HEATER | USER_DISABLE_OTP_RELOAD
USER_DEFAULT = USER_DISABLE_OTP_RELOAD  # 0x02: RH 12 bit / T 14 bit

# (bit 7, bit 0) -> (RH bits, T bits), datasheet table 8
RESOLUTIONS = {(0, 0): (12, 14), (0, 1): (8, 12), (1, 0): (10, 13), (1, 1): (11, 11)}
# max measurement times, datasheet table 7
T_MEASUREMENT_S = {14: 0.085, 13: 0.043, 12: 0.022, 11: 0.011}
RH_MEASUREMENT_S = {12: 0.029, 11: 0.015, 10: 0.009, 8: 0.004}

STATUS_HUMIDITY = 0x02  # bit 1 of the LSB
STATUS_MASK = 0x03
POWER_UP_S = 0.015  # start-up time max
SOFT_RESET_S = 0.015
IDLE_BYTE = 0xFF  # SDA released
FULL_SCALE = 65536


def _quantized_code(exact: float, bits: int) -> int:
    """The 16-bit output word (status bits clear) for an exact code at `bits` resolution."""
    step = 1 << (16 - bits)
    return output_code(exact, step, 0, FULL_SCALE // step - 1) * step


def temperature_code(celsius: float, bits: int = 14) -> int:
    """S_T for a temperature: T = -46.85 + 175.72 * S_T / 2^16, inverted, at `bits` resolution."""
    return _quantized_code((celsius + 46.85) * FULL_SCALE / 175.72, bits)


def temperature_from_code(code: int) -> float:
    return -46.85 + 175.72 * (code & ~STATUS_MASK) / FULL_SCALE


def humidity_code(percent: float, bits: int = 12) -> int:
    """S_RH for a relative humidity: RH = -6 + 125 * S_RH / 2^16, inverted, at `bits` resolution."""
    return _quantized_code((percent + 6.0) * FULL_SCALE / 125.0, bits)


def humidity_from_code(code: int) -> float:
    return -6.0 + 125.0 * (code & ~STATUS_MASK) / FULL_SCALE


class SHT2x:
    def __init__(
        self,
        env: Environment,
        *,
        address: int = SHT2X_ADDRESS,
        powered_at: float = 0.0,
        user_register_default: int = USER_DEFAULT,
    ) -> None:
        self.i2c_address = address
        self.faults = Faults()
        self.log = ReadingLog()
        self.env = env
        self.user_register_default = user_register_default
        self._rng = seeded_rng(env.seed, f"SHT2x@{address:#04x}")
        self.power_cycle(powered_at)

    def power_cycle(self, now: float) -> None:
        self._user = self.user_register_default
        self._restart(now, POWER_UP_S)

    def _restart(self, now: float, duration: float) -> None:
        self._busy_until = now + duration
        self._command: int | None = None
        self._reply: bytes | None = None
        self._reply_ready_at = 0.0
        self._reply_holds = False

    @property
    def user_register(self) -> int:
        return self._user

    def resolution(self) -> tuple[int, int]:
        """(RH bits, T bits) the user register selects."""
        return RESOLUTIONS[(1 if self._user & USER_RESOLUTION_BIT7 else 0, self._user & USER_RESOLUTION_BIT0)]

    def _reload_defaults(self) -> None:
        """OTP reload: the defaults come back, except the heater bit."""
        self._user = (self.user_register_default & ~USER_HEATER) | (self._user & USER_HEATER)

    def _measure(self, now: float, quantity: str, holds: bool) -> None:
        if not self._user & USER_DISABLE_OTP_RELOAD:
            self._reload_defaults()
        rh_bits, t_bits = self.resolution()
        truth = self.env.value(quantity, now)
        if quantity == AT:
            code = temperature_code(truth, t_bits)
            reported = temperature_from_code(code)
            duration = T_MEASUREMENT_S[t_bits]
        else:
            code = humidity_code(truth, rh_bits) | STATUS_HUMIDITY
            reported = humidity_from_code(code)
            duration = RH_MEASUREMENT_S[rh_bits]
        self.log.add(Reading(now, quantity, truth, reported, code))
        word = code.to_bytes(2, "big")
        crc = sht2x_crc(word)
        if take_crc_fault(self.faults, self._rng):
            crc ^= 0xFF
        self._set_reply(now + duration, word + bytes([crc]), holds)

    def _set_reply(self, ready_at: float, reply: bytes, holds: bool) -> None:
        self._reply = reply
        self._reply_ready_at = ready_at
        self._reply_holds = holds

    def _execute(self, now: float, command: int) -> bool:
        """Start a one-byte command; False if it is unknown (NACKed)."""
        if command in MEASUREMENTS:
            quantity, holds = MEASUREMENTS[command]
            self._measure(now, quantity, holds)
        elif command == CMD_READ_USER:
            self._set_reply(now, bytes([self._user]), holds=False)
        elif command == CMD_SOFT_RESET:
            self._reload_defaults()
            self._restart(now, SOFT_RESET_S)
        elif command != CMD_WRITE_USER:
            return False
        return True

    def _write_user(self, value: int) -> None:
        self._user = (self._user & ~USER_WRITABLE) | (value & USER_WRITABLE)

    # --- I2CDevice ----------------------------------------------------------------------------

    def address(self, now: float, read: bool) -> bool:
        if not self.faults.plugged or now + TIME_SLACK_S < self._busy_until:
            return False
        if not read:
            self._command = None
            return True
        if self._reply is None:
            return False
        return self._reply_holds or now + TIME_SLACK_S >= self._reply_ready_at

    def write(self, now: float, data: bytes) -> int:
        for index, byte in enumerate(data):
            if self._command is None:
                self._command = byte
                self._reply = None
                if not self._execute(now, byte):
                    return index
            elif self._command == CMD_WRITE_USER:
                self._write_user(byte)
                self._command = -1  # the register takes one byte
            else:
                return index  # no other command takes data bytes
        return len(data)

    def stretch(self, now: float) -> float:
        if self._reply is not None and self._reply_holds:
            return max(0.0, self._reply_ready_at - now)
        return 0.0

    def read(self, now: float, n: int) -> bytes:
        reply = self._reply or b""
        self._reply = None
        return reply[:n] + bytes([IDLE_BYTE]) * max(0, n - len(reply))

    def stop(self, now: float) -> None:
        self._command = None
