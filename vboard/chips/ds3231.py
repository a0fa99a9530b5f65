"""DS3231 real-time clock at I2C 0x68, register-level, from the Maxim datasheet.

Timekeeping is computed from simulated time, not ticked: the clock is an anchor (simulated time,
the chip's seconds count and sub-second phase there) and a rate (1 + drift in ppm). Writing the
seconds register resets the countdown chain (phase 0 at the write); writing any time register
makes the registers hold the written values at that instant and count on from there.

The calendar is the chip's: years 00-99 with a century bit that toggles when the year rolls
99 -> 00, every year divisible by 4 a leap year. `century_base` maps the registers to a
Gregorian year (base + 100 * century + year) for `now_datetime`.

The temperature registers are updated lazily: a TCXO conversion is computed (and logged, at
its start time) when a read first shows its result; conversions nobody read leave no trace.

Not modelled: alarm matching (the alarm registers are stored; A1F/A2F only clear), the 32 kHz
output, the INT function of the SQW pin.
"""

from __future__ import annotations

import bisect
import math
from datetime import UTC, datetime

from vboard.chips.base import TIME_SLACK_S, Faults, Reading, ReadingLog, output_code
from vboard.chips.signals import DIE_TEMP, Environment

DS3231_ADDRESS = 0x68

REG_SECONDS = 0x00
REG_MINUTES = 0x01
REG_HOURS = 0x02
REG_DAY = 0x03  # day of week 1..7
REG_DATE = 0x04
REG_MONTH = 0x05
REG_YEAR = 0x06
REG_ALARM1_SECONDS = 0x07
REG_ALARM2_DAY = 0x0D
REG_CONTROL = 0x0E
REG_STATUS = 0x0F
REG_AGING = 0x10
REG_TEMP_MSB = 0x11
REG_TEMP_LSB = 0x12
REGISTER_COUNT = 0x13  # the register pointer wraps from 0x12 to 0x00
TIME_REGISTERS = range(REG_SECONDS, REG_YEAR + 1)

HOURS_12H = 0x40
HOURS_PM = 0x20
MONTH_CENTURY = 0x80

CONTROL_EOSC = 0x80  # 1: oscillator stops when on battery
CONTROL_BBSQW = 0x40  # battery-backed square wave
CONTROL_CONV = 0x20  # force a temperature conversion
CONTROL_RS2 = 0x10
CONTROL_RS1 = 0x08
CONTROL_INTCN = 0x04  # 1: SQW pin is the alarm interrupt, 0: square wave
CONTROL_POWER_ON = CONTROL_RS2 | CONTROL_RS1 | CONTROL_INTCN  # 0x1C

STATUS_OSF = 0x80  # oscillator stopped since last cleared
STATUS_EN32KHZ = 0x08
STATUS_BSY = 0x04  # TCXO conversion in progress
STATUS_A2F = 0x02
STATUS_A1F = 0x01
STATUS_POWER_ON = STATUS_OSF | STATUS_EN32KHZ
STATUS_CLEAR_ONLY = STATUS_OSF | STATUS_A2F | STATUS_A1F  # writing 0 clears, writing 1 keeps

TEMP_LSB = 0.25  # degC, 10-bit two's complement
TEMP_CODE_MIN = -512
TEMP_CODE_MAX = 511
TEMP_PERIOD_S = 64.0  # automatic TCXO conversion interval
TEMP_CONVERSION_S = 0.2  # tCONV max
AGING_PPM_PER_LSB = 0.1  # typical at +25 degC; positive aging slows the oscillator
SQW_RISING_PHASE = 0.5  # rising edge 500 ms into each DS3231 second

DAY_S = 86_400
CYCLE_YEARS = 200  # century bit + 00..99
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _is_leap(year_index: int) -> bool:
    return year_index % 4 == 0  # the chip's rule (100 is a multiple of 4, so it holds per century)


def _month_length(year_index: int, month: int) -> int:
    return 29 if month == 2 and _is_leap(year_index) else _MONTH_DAYS[month - 1]


def _build_year_starts() -> list[int]:
    starts = [0]
    for year_index in range(CYCLE_YEARS):
        starts.append(starts[-1] + (366 if _is_leap(year_index) else 365))
    return starts


_YEAR_START_DAY = _build_year_starts()
CYCLE_SECONDS = _YEAR_START_DAY[-1] * DAY_S


def _day_of_year_start(year_index: int, month: int) -> int:
    return sum(_month_length(year_index, m) for m in range(1, month))


def fields_to_count(year_index: int, month: int, date: int, hour: int, minute: int, second: int) -> int:
    """Seconds since 00-01-01 00:00:00 with the century bit clear, in the chip's calendar."""
    days = _YEAR_START_DAY[year_index] + _day_of_year_start(year_index, month) + date - 1
    return days * DAY_S + hour * 3600 + minute * 60 + second


def count_to_fields(count: int) -> tuple[int, int, int, int, int, int]:
    """(year_index 0..199, month, date, hour, minute, second) for a seconds count."""
    count %= CYCLE_SECONDS
    days, second_of_day = divmod(count, DAY_S)
    year_index = bisect.bisect_right(_YEAR_START_DAY, days) - 1
    day_of_year = days - _YEAR_START_DAY[year_index]
    month = 1
    while day_of_year >= _month_length(year_index, month):
        day_of_year -= _month_length(year_index, month)
        month += 1
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    return year_index, month, day_of_year + 1, hour, minute, second


def to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class DS3231:
    """The RTC, first powered at simulated time `powered_at` (required: the registers count from
    there). `clock_at_power_on`: Unix time the registers hold at `powered_at` (a battery kept them
    running, OSF clear); None: a first power-up, registers at their reset values, OSF set.
    `battery`: a backup cell keeps time across power_cycle(); without one a power cycle is a
    power_loss()."""

    _pointer: int
    _control: int
    _status: int
    _aging: int
    _temp_code: int

    def __init__(
        self,
        env: Environment,
        *,
        powered_at: float,
        address: int = DS3231_ADDRESS,
        clock_at_power_on: float | None = None,
        osf: bool | None = None,
        drift_ppm: float = 0.0,
        battery: bool = True,
        century_base: int = 2000,
    ) -> None:
        self.i2c_address = address
        self.faults = Faults()
        self.log = ReadingLog()
        self.env = env
        self.battery = battery
        self.century_base = century_base
        self._drift_ppm = drift_ppm
        self._reset(powered_at)
        if clock_at_power_on is not None:
            self.set_clock(powered_at, clock_at_power_on)
            self._status &= ~STATUS_OSF
        if osf is not None:
            self._status = (self._status | STATUS_OSF) if osf else (self._status & ~STATUS_OSF)

    # --- power --------------------------------------------------------------------------------

    def _reset(self, now: float) -> None:
        """First power-up (or VCC and VBAT both lost): every register at its reset value."""
        self._pointer = 0
        self._alarms = bytearray(REG_ALARM2_DAY - REG_ALARM1_SECONDS + 1)
        self._control = CONTROL_POWER_ON
        self._status = STATUS_POWER_ON
        self._aging = 0
        self._temp_code = 0
        self._temp_from: float | None = None  # start of the conversion the temp registers hold
        self._forced_conversion: float | None = None
        self._conversion_epoch = now  # automatic conversions at VCC-on + k * 64 s
        self._vcc = True
        self._running = True
        self._hours_12h = False
        self._latched: bytes | None = None
        self._expect_pointer = False
        self._time_writes: dict[int, int] = {}
        self._anchor(now, fields_to_count(0, 1, 1, 0, 0, 0), 0.0, 1)

    def power_loss(self, now: float) -> None:
        """VCC and the backup battery are both lost and power returns at `now`: the oscillator
        stopped (OSF), the registers are back at their reset values (00-01-01 00:00:00)."""
        self._reset(now)

    def power_cycle(self, now: float) -> None:
        if self.battery:
            self.set_vcc(now, False)
            self.set_vcc(now, True)
        else:
            self.power_loss(now)

    def set_vcc(self, now: float, on: bool) -> None:
        """Switch between VCC and the backup battery (the oscillator stops on battery if EOSC)."""
        if not on and not self.battery:
            raise ValueError("without a battery, losing VCC is power_loss()")
        if on and not self._vcc:
            self._conversion_epoch = now
        self._vcc = on
        self._update_oscillator(now)

    def _update_oscillator(self, now: float) -> None:
        should_run = self._vcc or not self._control & CONTROL_EOSC
        if should_run == self._running:
            return
        count, phase = self._count_and_phase(now)
        dow = self._day_of_week(now)
        self._running = should_run
        self._anchor(now, count, phase, dow)
        if not should_run:
            self._status |= STATUS_OSF

    # --- the clock ----------------------------------------------------------------------------

    @property
    def drift_ppm(self) -> float:
        return self._drift_ppm

    def set_drift_ppm(self, now: float, ppm: float) -> None:
        self._rerate(now, drift_ppm=ppm)

    def _rate(self) -> float:
        aging = self._aging - 256 if self._aging & 0x80 else self._aging
        return 1.0 + (self._drift_ppm - AGING_PPM_PER_LSB * aging) * 1e-6

    def _rerate(self, now: float, drift_ppm: float | None = None, aging: int | None = None) -> None:
        """Change the oscillator's rate from `now` on, keeping the time it has counted so far."""
        count, phase = self._count_and_phase(now)
        day_of_week = self._day_of_week(now)
        if drift_ppm is not None:
            self._drift_ppm = drift_ppm
        if aging is not None:
            self._aging = aging
        self._anchor(now, count, phase, day_of_week)

    def _anchor(self, now: float, count: int, phase: float, day_of_week: int) -> None:
        self._anchor_time = now
        self._anchor_count = count
        self._anchor_phase = phase
        self._anchor_dow = day_of_week
        self._rate_now = self._rate()

    def _count_and_phase(self, now: float) -> tuple[int, float]:
        """The chip's seconds count (not wrapped) and the phase within its second at `now`."""
        if not self._running:
            return self._anchor_count, self._anchor_phase
        elapsed = self._anchor_phase + (now - self._anchor_time) * self._rate_now
        whole = math.floor(elapsed)
        return self._anchor_count + whole, elapsed - whole

    def _day_of_week(self, now: float) -> int:
        count, _ = self._count_and_phase(now)
        days = count // DAY_S - self._anchor_count // DAY_S
        return (self._anchor_dow - 1 + days) % 7 + 1

    def set_clock(self, now: float, unix_time: float) -> None:
        """Harness shortcut: the registers hold `unix_time` (UTC) at `now`, phase included; the
        day of week is ISO (Monday = 1)."""
        moment = datetime.fromtimestamp(math.floor(unix_time), UTC)
        year_index = moment.year - self.century_base
        if not 0 <= year_index < CYCLE_YEARS:
            raise ValueError(f"{moment.year} is outside the DS3231's 200 years from {self.century_base}")
        count = fields_to_count(
            year_index, moment.month, moment.day, moment.hour, moment.minute, moment.second
        )
        self._anchor(now, count, unix_time - math.floor(unix_time), moment.isoweekday())

    def now_datetime(self, now: float) -> datetime:
        """What the time registers read at `now`, as a UTC datetime."""
        count, _ = self._count_and_phase(now)
        year_index, month, date, hour, minute, second = count_to_fields(count)
        return datetime(self.century_base + year_index, month, date, hour, minute, second, tzinfo=UTC)

    def day_of_week(self, now: float) -> int:
        return self._day_of_week(now)

    # --- SQW ----------------------------------------------------------------------------------

    def next_sqw_rising_edge(self, after: float) -> float | None:
        """Simulated time of the next 1 Hz rising edge strictly after `after`, assuming nothing
        changes meanwhile; None when SQW is not a 1 Hz square wave."""
        if not self.faults.plugged or not self._running:
            return None
        if self._control & (CONTROL_INTCN | CONTROL_RS2 | CONTROL_RS1):
            return None
        if not self._vcc and not self._control & CONTROL_BBSQW:
            return None
        rate = self._rate_now
        elapsed = self._anchor_phase + (after - self._anchor_time) * rate
        first_after_anchor = math.ceil(self._anchor_phase - SQW_RISING_PHASE)
        edge = max(math.floor(elapsed - SQW_RISING_PHASE) + 1, first_after_anchor)
        when = self._anchor_time + (edge + SQW_RISING_PHASE - self._anchor_phase) / rate
        if when <= after:  # rounding at an exact edge
            when = self._anchor_time + (edge + 1 + SQW_RISING_PHASE - self._anchor_phase) / rate
        return when

    # --- temperature --------------------------------------------------------------------------

    def _latest_conversion_start(self, now: float) -> float | None:
        """Start of the newest finished conversion at `now` (automatic or forced)."""
        candidates = []
        since_epoch = now + TIME_SLACK_S - TEMP_CONVERSION_S - self._conversion_epoch
        if since_epoch >= 0:
            candidates.append(
                self._conversion_epoch + math.floor(since_epoch / TEMP_PERIOD_S) * TEMP_PERIOD_S
            )
        forced = self._forced_conversion
        if forced is not None and forced + TEMP_CONVERSION_S <= now + TIME_SLACK_S:
            candidates.append(forced)
            self._forced_conversion = None
        return max(candidates) if candidates else None

    def _refresh_temperature(self, now: float) -> None:
        start = self._latest_conversion_start(now)
        if start is None or start == self._temp_from:
            return
        if self._temp_from is not None and start < self._temp_from:
            return
        truth = self.env.value(DIE_TEMP, start)
        self._temp_code = output_code(truth, TEMP_LSB, TEMP_CODE_MIN, TEMP_CODE_MAX)
        self._temp_from = start
        self.log.add(Reading(start, DIE_TEMP, truth, self._temp_code * TEMP_LSB, self._temp_code))

    def _busy(self, now: float) -> bool:
        since_epoch = now - self._conversion_epoch
        if since_epoch >= 0 and since_epoch % TEMP_PERIOD_S < TEMP_CONVERSION_S:
            return True
        forced = self._forced_conversion
        return forced is not None and forced <= now < forced + TEMP_CONVERSION_S

    # --- registers ----------------------------------------------------------------------------

    def registers(self, now: float) -> bytes:
        """The 19 registers as a read at `now` returns them."""
        self._refresh_temperature(now)
        count, _ = self._count_and_phase(now)
        year_index, month, date, hour, minute, second = count_to_fields(count)
        century, year = divmod(year_index, 100)
        if self._hours_12h:
            hour_12 = hour % 12 or 12
            hours = HOURS_12H | (HOURS_PM if hour >= 12 else 0) | to_bcd(hour_12)
        else:
            hours = to_bcd(hour)
        control = self._control
        if self._forced_conversion is not None:
            control |= CONTROL_CONV
        status = self._status | (STATUS_BSY if self._busy(now) else 0)
        code = self._temp_code & 0x3FF
        return bytes(
            [
                to_bcd(second),
                to_bcd(minute),
                hours,
                self._day_of_week(now),
                to_bcd(date),
                (MONTH_CENTURY if century else 0) | to_bcd(month),
                to_bcd(year),
                *self._alarms,
                control,
                status,
                self._aging,
                code >> 2,
                (code & 0x3) << 6,
            ]
        )

    def _write_time(self, now: float, written: dict[int, int]) -> None:
        """Apply one transaction's time-register writes together (so a date valid only in the
        new month is not clamped by the old one)."""
        count, phase = self._count_and_phase(now)
        year_index, month, date, hour, minute, second = count_to_fields(count)
        century, year = divmod(year_index, 100)
        day_of_week = self._day_of_week(now)
        for register, value in written.items():
            if register == REG_SECONDS:
                second = min(59, from_bcd(value & 0x7F))
                phase = 0.0
            elif register == REG_MINUTES:
                minute = min(59, from_bcd(value & 0x7F))
            elif register == REG_HOURS:
                self._hours_12h = bool(value & HOURS_12H)
                if self._hours_12h:
                    hour_12 = min(12, max(1, from_bcd(value & 0x1F)))
                    hour = hour_12 % 12 + (12 if value & HOURS_PM else 0)
                else:
                    hour = min(23, from_bcd(value & 0x3F))
            elif register == REG_DAY:
                day_of_week = min(7, max(1, value & 0x07))
            elif register == REG_DATE:
                date = min(31, max(1, from_bcd(value & 0x3F)))
            elif register == REG_MONTH:
                century = 1 if value & MONTH_CENTURY else 0
                month = min(12, max(1, from_bcd(value & 0x1F)))
            elif register == REG_YEAR:
                year = min(99, from_bcd(value))
        year_index = century * 100 + year
        date = min(date, _month_length(year_index, month))
        self._anchor(now, fields_to_count(year_index, month, date, hour, minute, second), phase, day_of_week)

    def _write_register(self, now: float, register: int, value: int) -> None:
        if REG_ALARM1_SECONDS <= register <= REG_ALARM2_DAY:
            self._alarms[register - REG_ALARM1_SECONDS] = value
        elif register == REG_CONTROL:
            self._control = value & ~CONTROL_CONV
            if value & CONTROL_CONV and self._forced_conversion is None:
                self._forced_conversion = now
            self._update_oscillator(now)
        elif register == REG_STATUS:
            kept = self._status & value & STATUS_CLEAR_ONLY
            self._status = kept | (value & STATUS_EN32KHZ)
        elif register == REG_AGING:
            self._rerate(now, aging=value)
        # 0x11-0x12 (temperature) are read-only

    # --- I2CDevice ----------------------------------------------------------------------------

    def address(self, now: float, read: bool) -> bool:
        if not self.faults.plugged:
            return False
        self._apply_time_writes(now)  # a repeated START ends the previous write
        if read:
            # the chip copies the registers to a transfer buffer at START: a read never tears
            self._latched = self.registers(now)
        else:
            self._expect_pointer = True
        return True

    def write(self, now: float, data: bytes) -> int:
        # The master may send one transaction's bytes in several write() calls (SoftI2C's
        # start()/write()/stop() primitives): only the first byte after the address is the
        # register pointer, and time registers written in one transaction apply together.
        if not data:
            return 0
        self._refresh_temperature(now)
        values = data
        if self._expect_pointer:
            self._pointer = data[0] % REGISTER_COUNT
            self._expect_pointer = False
            values = data[1:]
        pointer = self._pointer
        for value in values:
            if pointer in TIME_REGISTERS:
                self._time_writes[pointer] = value
            else:
                self._write_register(now, pointer, value)
            pointer = (pointer + 1) % REGISTER_COUNT
        self._pointer = pointer
        return len(data)

    def _apply_time_writes(self, now: float) -> None:
        if self._time_writes:
            writes, self._time_writes = self._time_writes, {}
            self._write_time(now, writes)

    def read(self, now: float, n: int) -> bytes:
        image = self._latched if self._latched is not None else self.registers(now)
        out = bytearray()
        for _ in range(n):
            out.append(image[self._pointer])
            self._pointer = (self._pointer + 1) % REGISTER_COUNT
        return bytes(out)

    def stretch(self, now: float) -> float:
        return 0.0

    def stop(self, now: float) -> None:
        self._latched = None
        self._apply_time_writes(now)
