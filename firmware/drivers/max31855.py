# Maxim MAX31855 thermocouple converter on SPI (read-only, 32-bit frame, MSB first).
#
# Like the MAX6675, CS low shifts out the last conversion and CS high starts the next (100 ms
# max), so read() is one short SPI transaction. The SPI bus is set up by the caller (SPI(1),
# mode 0, <= 5 MHz); `cs` is a machine.Pin output.
#
# Frame: D31..D18 signed 14-bit thermocouple temperature (0.25 degC), D17 reserved, D16 fault,
# D15..D4 signed 12-bit cold-junction temperature (0.0625 degC), D3 reserved, D2 short to VCC,
# D1 short to GND, D0 open circuit.
# Errors: NotAnswering (all-zero/all-one frame, reserved bits set, or a fault bit without a
# cause), OpenCircuit (OC), ShortCircuit (SCG or SCV).

from drivers.errors import NotAnswering, OpenCircuit, ShortCircuit
from micropython import const

CONVERSION_MS = const(100)
_FAULT = const(0x01)  # D16, in the second byte
_RESERVED_B1 = const(0x02)  # D17
_RESERVED_B3 = const(0x08)  # D3
_OC = const(0x01)
_SCG = const(0x02)
_SCV = const(0x04)
_QUARTER_DEGREE = const(25)  # hundredths per thermocouple LSB


def decode(buf):
    """(thermocouple, cold junction) in hundredths of degC from the 4-byte frame.

    Decoded byte by byte: a 32-bit frame would not fit the ESP8266's 31-bit small ints."""
    b0, b1, b2, b3 = buf[0], buf[1], buf[2], buf[3]
    if (b0 | b1 | b2 | b3) == 0 or (b0 & b1 & b2 & b3) == 0xFF or b1 & _RESERVED_B1 or b3 & _RESERVED_B3:
        raise NotAnswering("MAX31855 not answering (frame %02x%02x%02x%02x)" % (b0, b1, b2, b3))
    if b3 & _OC:
        raise OpenCircuit("thermocouple open")
    if b3 & (_SCG | _SCV):
        raise ShortCircuit("thermocouple shorted to %s" % ("GND" if b3 & _SCG else "VCC"))
    if b1 & _FAULT:
        raise NotAnswering("MAX31855 reports a fault without a cause")
    thermocouple = b0 << 6 | b1 >> 2
    if thermocouple & 0x2000:
        thermocouple -= 0x4000
    cold = b2 << 4 | b3 >> 4
    if cold & 0x800:
        cold -= 0x1000
    # 0.0625 degC = 6.25 hundredths: rounded half up.
    return thermocouple * _QUARTER_DEGREE, (cold * 25 + 2) >> 2


class MAX31855:
    conversion_ms = CONVERSION_MS

    def __init__(self, spi, cs):
        self.spi = spi
        self.cs = cs
        self._frame = bytearray(4)
        self.cold_junction = None  # hundredths of degC, set by read()
        cs.value(1)

    def read(self):
        """Thermocouple temperature in hundredths of degC; sets cold_junction."""
        frame = self._frame
        self.cs.value(0)
        try:
            self.spi.readinto(frame, 0)
        finally:
            self.cs.value(1)
        self.cold_junction = None
        temperature, self.cold_junction = decode(frame)
        return temperature
