# Sensirion SHT3x (SHT30/31/35) ambient temperature and humidity on I2C.
#
# Single shot, high repeatability, WITHOUT clock stretching (0x2400): the ESP8266's SoftI2C gives
# up on a stretched clock after 255 us, so the stretching commands (0x2C06...) fail on real
# boards. The chip NACKs a read until the measurement is done, which is why reading is a
# separate step after CONVERSION_MS:
#
#     wait_ms = sht.start()          # sends the command, returns how long to wait
#     ... at least wait_ms later ...
#     sht.poll()                     # 0: done; sht.temperature / sht.humidity in hundredths
#
# Errors: NotAnswering (no ACK), CRCError (a word failed its CRC).

import time

from drivers.errors import CRCError, NotAnswering
from micropython import const

ADDRESS = const(0x44)  # ADDR pin low; 0x45 with ADDR high
CONVERSION_MS = const(15)  # max measurement time at high repeatability
_MEASURE_HIGH_NO_STRETCH = b"\x24\x00"
_SOFT_RESET = b"\x30\xa2"
_CLEAR_STATUS = b"\x30\x41"
_CRC_POLY = const(0x31)  # x^8 + x^5 + x^4 + 1
_CRC_INIT = const(0xFF)


def crc8(buf, start, end):
    crc = _CRC_INIT
    for i in range(start, end):
        crc ^= buf[i]
        for _ in range(8):
            crc = ((crc << 1) ^ _CRC_POLY) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


# T = -45 + 175 * S / 65535 degC and RH = 100 * S / 65535 %, in hundredths and rounded, with
# the fractions reduced (17500/65535 = 3500/13107) so every intermediate stays below 2**30,
# the ESP8266's small-int limit (no big-int allocation).
def temperature_hundredths(raw):
    return -4500 + (3500 * raw + 6553) // 13107


def humidity_hundredths(raw):
    return (2000 * raw + 6553) // 13107


def decode(buf):
    """(raw T, raw RH) from the 6-byte reply; raises CRCError if either word fails its CRC."""
    if crc8(buf, 0, 2) != buf[2] or crc8(buf, 3, 5) != buf[5]:
        raise CRCError("SHT3x reply failed its CRC")
    return buf[0] << 8 | buf[1], buf[3] << 8 | buf[4]


class SHT3x:
    def __init__(self, i2c, address=ADDRESS):
        self.i2c = i2c
        self.address = address
        self._reply = bytearray(6)
        self.temperature = None  # hundredths of degC, set by poll()
        self.humidity = None  # hundredths of %RH, set by poll()

    def _command(self, command):
        try:
            acks = self.i2c.writeto(self.address, command)
        except OSError:
            raise NotAnswering("SHT3x at 0x%02x does not answer" % self.address) from None
        if acks is not None and acks != len(command):
            raise NotAnswering("SHT3x at 0x%02x did not acknowledge the command" % self.address)

    def start(self):
        self.temperature = self.humidity = None
        self._command(_MEASURE_HIGH_NO_STRETCH)
        return CONVERSION_MS

    def poll(self):
        try:
            self.i2c.readfrom_into(self.address, self._reply)
        except OSError:
            raise NotAnswering("SHT3x at 0x%02x has no measurement to read" % self.address) from None
        raw_t, raw_rh = decode(self._reply)
        self.temperature = temperature_hundredths(raw_t)
        self.humidity = humidity_hundredths(raw_rh)
        return 0

    def measure(self):
        """Blocking start + poll, for boot-time self-tests: (temperature, humidity)."""
        time.sleep_ms(self.start() + 1)
        self.poll()
        return self.temperature, self.humidity

    def reset(self):
        """Soft reset and clear the status register (e.g. after a brown-out)."""
        self._command(_SOFT_RESET)
        time.sleep_ms(2)
        self._command(_CLEAR_STATUS)
