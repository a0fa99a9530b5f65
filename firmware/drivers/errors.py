# The ways a sensor read can fail, shared by every driver so the app maps each to a protocol
# flag in one place (thermocouple: NotAnswering -> FLAG_TC_FAULT, OpenCircuit -> FLAG_TC_OPEN,
# ShortCircuit -> FLAG_TC_SHORT; ambient: NotAnswering -> FLAG_AMB_FAULT, CRCError ->
# FLAG_AMB_CRC). None of them is an OSError, so they cannot be mistaken for a network failure.


class SensorError(Exception):
    """Base class: the reading is unusable; the sample gets null and a flag."""


class NotAnswering(SensorError):
    """Absent, not acknowledging on the bus, or answering with an impossible frame."""


class CRCError(SensorError):
    """The reply arrived but failed its CRC check."""


class OpenCircuit(SensorError):
    """The thermocouple is open (broken wire or unplugged)."""


class ShortCircuit(SensorError):
    """The thermocouple is shorted to GND or VCC."""
