# Maxim MAX6675 K-type thermocouple converter on SPI (read-only, 16-bit frame, MSB first).
#
# CS low stops the running conversion and shifts out the last result; CS high starts the next
# conversion (0.22 s max). A read sooner than that after the previous one gets the previous
# result again: the caller spaces reads by `conversion_ms` (once a second, read() never waits:
# it is one short SPI transaction). The SPI bus is set up by the caller
# (SPI(1), mode 0, <= 4.3 MHz); `cs` is a machine.Pin output.
#
# Frame: D15 dummy sign bit (0), D14..D3 temperature in 0.25 degC (0..1023.75), D2 open
# thermocouple, D1 device ID (0), D0 three-state.
# Errors: NotAnswering (all-zero or all-one frame, or the always-zero bits set: no converter
# drives MISO), OpenCircuit (D2).

from drivers.errors import NotAnswering, OpenCircuit
from micropython import const

CONVERSION_MS = const(220)  # max conversion time: read no more often than this
_OPEN = const(0x0004)
_ALWAYS_ZERO = const(0x8002)  # D15 dummy sign bit and D1 device ID
_QUARTER_DEGREE = const(25)  # hundredths of degC per LSB


def decode(frame):
    """Temperature in hundredths of degC from a 16-bit frame."""
    if frame == 0 or frame == 0xFFFF or frame & _ALWAYS_ZERO:
        raise NotAnswering("MAX6675 not answering (frame 0x%04x)" % frame)
    if frame & _OPEN:
        raise OpenCircuit("thermocouple open")
    return (frame >> 3) * _QUARTER_DEGREE


class MAX6675:
    conversion_ms = CONVERSION_MS

    def __init__(self, spi, cs):
        self.spi = spi
        self.cs = cs
        self._frame = bytearray(2)
        cs.value(1)  # CS high: the converter runs conversions

    def read(self):
        """Temperature in hundredths of degC (from the conversion finished since the last read)."""
        frame = self._frame
        self.cs.value(0)
        try:
            self.spi.readinto(frame, 0)
        finally:
            self.cs.value(1)
        return decode(frame[0] << 8 | frame[1])
