# Maxim DS3231 real-time clock on I2C: time (UTC, 24-hour), oscillator-stop flag, the 1 Hz
# square wave that paces sampling, and its temperature sensor.
#
# Times are (year, month, day, hour, minute, second) tuples or Unix epoch seconds (1970, UTC),
# computed here rather than with time.mktime, whose epoch is 2000 on the ESP8266 and 1970 on the
# unix port. Years 2000..2199 (the month register's century bit).
# Errors: NotAnswering (no ACK, or registers holding an impossible date).

from drivers.errors import NotAnswering
from micropython import const

ADDRESS = const(0x68)
_REG_SECONDS = const(0x00)
_REG_CONTROL = const(0x0E)
_REG_STATUS = const(0x0F)
_REG_TEMPERATURE = const(0x11)
_CONTROL_SQW_1HZ = const(0x00)  # EOSC=0 (oscillator on), INTCN=0 (square wave), RS2=RS1=0 (1 Hz)
_STATUS_OSF = const(0x80)  # oscillator stopped since last cleared: the time is not trustworthy
_HOURS_12H = const(0x40)
_HOURS_PM = const(0x20)
_MONTH_CENTURY = const(0x80)
_QUARTER_DEGREE = const(25)  # hundredths per temperature LSB
_DAYS_1970_TO_2000 = const(10957)


def bcd2bin(value):
    return (value >> 4) * 10 + (value & 0x0F)


def bin2bcd(value):
    return (value // 10) << 4 | value % 10


def days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date."""
    if month <= 2:
        year -= 1
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days):
    """(year, month, day) of a day count since 1970-01-01."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def _days_in_month(year, month):
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def decode_datetime(regs):
    """(y, m, d, h, mi, s) from registers 0x00..0x06; NotAnswering if they hold no valid date."""
    second = bcd2bin(regs[0] & 0x7F)
    minute = bcd2bin(regs[1] & 0x7F)
    hours = regs[2]
    if hours & _HOURS_12H:
        hour = bcd2bin(hours & 0x1F) % 12 + (12 if hours & _HOURS_PM else 0)
    else:
        hour = bcd2bin(hours & 0x3F)
    day = bcd2bin(regs[4] & 0x3F)
    month = bcd2bin(regs[5] & 0x1F)
    year = 2000 + bcd2bin(regs[6]) + (100 if regs[5] & _MONTH_CENTURY else 0)
    if not (
        second < 60
        and minute < 60
        and hour < 24
        and 1 <= month <= 12
        and 1 <= day <= _days_in_month(year, month)
        and 1 <= regs[3] <= 7
    ):
        raise NotAnswering("DS3231 registers hold no valid date: %r" % (bytes(regs),))
    return year, month, day, hour, minute, second


def encode_datetime(dt, regs):
    """Fill registers 0x00..0x06 (24-hour mode) from (y, m, d, h, mi, s)."""
    year, month, day, hour, minute, second = dt
    if not 2000 <= year <= 2199:
        raise ValueError("the DS3231 holds years 2000..2199")
    regs[0] = bin2bcd(second)
    regs[1] = bin2bcd(minute)
    regs[2] = bin2bcd(hour)
    regs[3] = (days_from_civil(year, month, day) + 3) % 7 + 1  # ISO weekday: Monday = 1
    regs[4] = bin2bcd(day)
    regs[5] = bin2bcd(month) | (_MONTH_CENTURY if year >= 2100 else 0)
    regs[6] = bin2bcd(year % 100)


def to_epoch(dt):
    year, month, day, hour, minute, second = dt
    return days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second


def from_epoch(seconds):
    days = seconds // 86400
    rest = seconds - days * 86400
    year, month, day = civil_from_days(days)
    return year, month, day, rest // 3600, rest % 3600 // 60, rest % 60


def decode_temperature(msb, lsb):
    """Hundredths of degC from registers 0x11 (signed integer part) and 0x12 (bits 7..6)."""
    quarters = msb << 2 | lsb >> 6
    if quarters & 0x200:
        quarters -= 0x400
    return quarters * _QUARTER_DEGREE


class DS3231:
    def __init__(self, i2c, address=ADDRESS):
        self.i2c = i2c
        self.address = address
        self._regs = bytearray(7)
        self._byte = bytearray(1)

    def _read(self, register, buf):
        try:
            self.i2c.readfrom_mem_into(self.address, register, buf)
        except OSError:
            raise NotAnswering("DS3231 does not answer") from None

    def _write(self, register, buf):
        try:
            self.i2c.writeto_mem(self.address, register, buf)
        except OSError:
            raise NotAnswering("DS3231 does not answer") from None

    def datetime(self):
        self._read(_REG_SECONDS, self._regs)
        return decode_datetime(self._regs)

    def set_datetime(self, dt):
        """Set the time. The seconds register is written first in the same transaction, which
        restarts the countdown chain: the next SQW rising edge comes 500 ms later."""
        encode_datetime(dt, self._regs)
        self._write(_REG_SECONDS, self._regs)

    def time(self):
        """Unix epoch seconds (UTC)."""
        return to_epoch(self.datetime())

    def set_time(self, seconds):
        self.set_datetime(from_epoch(seconds))

    def _status(self):
        self._read(_REG_STATUS, self._byte)
        return self._byte[0]

    def osf(self):
        """True if the oscillator stopped (power loss) since the flag was last cleared."""
        return bool(self._status() & _STATUS_OSF)

    def clear_osf(self):
        self._byte[0] = self._status() & ~_STATUS_OSF & 0xFF
        self._write(_REG_STATUS, self._byte)

    def enable_sqw_1hz(self):
        self._byte[0] = _CONTROL_SQW_1HZ
        self._write(_REG_CONTROL, self._byte)

    def temperature(self):
        """The die temperature in hundredths of degC (updated every 64 s by the chip)."""
        regs = self._regs
        self._read(_REG_TEMPERATURE, memoryview(regs)[:2])
        return decode_temperature(regs[0], regs[1])
