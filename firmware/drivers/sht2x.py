# Sensirion SHT20 (and HTU21-compatible) ambient temperature and humidity on I2C.
#
# No-hold-master commands (0xF3 temperature, 0xF5 humidity): the bus is free while the chip
# measures, and it NACKs a read until the result is ready. Temperature and humidity are two
# conversions (max 85 ms + 29 ms at the default 14/12-bit resolution), so a measurement is two
# phases, each a short bus transaction:
#
#     wait_ms = sht.start()          # triggers temperature, returns 85
#     wait_ms = sht.poll()           # reads temperature, triggers humidity, returns 29
#     wait_ms = sht.poll()           # reads humidity, returns 0: sht.temperature / .humidity set
#
# Errors: NotAnswering (no ACK, or a reply of the wrong kind), CRCError.

import time

from drivers.errors import CRCError, NotAnswering
from micropython import const

ADDRESS = const(0x40)
TEMPERATURE_MS = const(85)  # max conversion time, 14-bit temperature
HUMIDITY_MS = const(29)  # max conversion time, 12-bit humidity
_TRIGGER_T_NO_HOLD = b"\xf3"
_TRIGGER_RH_NO_HOLD = b"\xf5"
_SOFT_RESET = b"\xfe"
_SOFT_RESET_MS = const(15)
_CRC_POLY = const(0x131)  # x^8 + x^5 + x^4 + 1
_STATUS_BITS = const(0x03)  # the two lowest bits of the LSB are status, not data
_STATUS_HUMIDITY = const(0x02)  # bit 1: 0 = temperature, 1 = humidity

_IDLE = const(0)
_MEASURING_T = const(1)
_MEASURING_RH = const(2)


def crc8(buf, start, end):
    crc = 0
    for i in range(start, end):
        crc ^= buf[i]
        for _ in range(8):
            crc = (crc << 1) ^ _CRC_POLY if crc & 0x80 else crc << 1
    return crc


# T = -46.85 + 175.72 * S / 65536 degC and RH = -6 + 125 * S / 65536 %, in hundredths and
# rounded; reduced (17572/65536 = 4393/16384, 12500/65536 = 3125/16384) so every intermediate
# stays below 2**30, the ESP8266's small-int limit.
def temperature_hundredths(raw):
    return -4685 + ((4393 * (raw & ~_STATUS_BITS) + 8192) >> 14)


def humidity_hundredths(raw):
    return -600 + ((3125 * (raw & ~_STATUS_BITS) + 8192) >> 14)


def decode(buf, humidity):
    """The raw 16-bit word of a 3-byte reply (status bits included); checks CRC and kind."""
    if crc8(buf, 0, 2) != buf[2]:
        raise CRCError("SHT2x reply failed its CRC")
    if bool(buf[1] & _STATUS_HUMIDITY) != humidity:
        raise NotAnswering("SHT2x replied with the wrong kind of measurement")
    return buf[0] << 8 | buf[1]


class SHT2x:
    def __init__(self, i2c, address=ADDRESS):
        self.i2c = i2c
        self.address = address
        self._reply = bytearray(3)
        self._phase = _IDLE
        self.temperature = None  # hundredths of degC
        self.humidity = None  # hundredths of %RH

    def _command(self, command):
        try:
            acks = self.i2c.writeto(self.address, command)
        except OSError:
            raise NotAnswering("SHT2x does not answer") from None
        if acks is not None and acks != len(command):
            raise NotAnswering("SHT2x did not acknowledge the command")

    def _read(self, humidity):
        try:
            self.i2c.readfrom_into(self.address, self._reply)
        except OSError:
            raise NotAnswering("SHT2x has no measurement to read") from None
        return decode(self._reply, humidity)

    def start(self):
        self.temperature = self.humidity = None
        self._phase = _IDLE
        self._command(_TRIGGER_T_NO_HOLD)
        self._phase = _MEASURING_T
        return TEMPERATURE_MS

    def poll(self):
        """Advance one phase; returns ms until the next poll(), or 0 when the result is ready."""
        phase = self._phase
        self._phase = _IDLE
        if phase == _MEASURING_T:
            self.temperature = temperature_hundredths(self._read(False))
            self._command(_TRIGGER_RH_NO_HOLD)
            self._phase = _MEASURING_RH
            return HUMIDITY_MS
        if phase == _MEASURING_RH:
            self.humidity = humidity_hundredths(self._read(True))
            return 0
        raise ValueError("SHT2x.poll() without start()")

    def measure(self):
        """Blocking, for boot-time self-tests: (temperature, humidity)."""
        wait = self.start()
        while wait:
            time.sleep_ms(wait + 1)
            wait = self.poll()
        return self.temperature, self.humidity

    def reset(self):
        self._command(_SOFT_RESET)
        time.sleep_ms(_SOFT_RESET_MS)
