"""DS3231 model against the datasheet, driven through the I2C interface of vboard/chips/base.py
the way the simulated bus drives it (address -> write -> [repeated start -> read] -> stop)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from vboard.chips.ds3231 import (
    CONTROL_POWER_ON,
    DS3231,
    REG_AGING,
    REG_CONTROL,
    REG_SECONDS,
    REG_STATUS,
    REG_TEMP_MSB,
    STATUS_POWER_ON,
    from_bcd,
    to_bcd,
)
from vboard.chips.signals import DIE_TEMP, Environment

T0 = 1_700_000_000.0  # simulated Unix time of the power-up


def approx_time(expected: float) -> object:
    """Equal as simulated Unix times can be (a float near T0 resolves ~0.24 us)."""
    return pytest.approx(expected, abs=1e-5)


def new_rtc(**params: object) -> DS3231:
    env = Environment.from_params(seed=17)
    env.set_override(DIE_TEMP, 24.0)
    return DS3231(env, powered_at=T0, **params)  # type: ignore[arg-type]


def write_registers(rtc: DS3231, now: float, first: int, values: list[int]) -> None:
    assert rtc.address(now, False)
    assert rtc.write(now, bytes([first, *values])) == len(values) + 1
    rtc.stop(now)


def read_registers(rtc: DS3231, now: float, first: int, count: int) -> bytes:
    assert rtc.address(now, False)
    assert rtc.write(now, bytes([first])) == 1
    assert rtc.address(now, True)  # repeated start
    assert rtc.stretch(now) == 0.0
    data = rtc.read(now, count)
    rtc.stop(now)
    return data


def set_time(rtc: DS3231, now: float, regs: list[int]) -> None:
    """Registers 0x00..0x06: seconds, minutes, hours, day, date, month|century, year."""
    write_registers(rtc, now, REG_SECONDS, regs)


def test_bcd_helpers() -> None:
    assert [to_bcd(v) for v in (0, 9, 10, 59, 99)] == [0x00, 0x09, 0x10, 0x59, 0x99]
    assert [from_bcd(v) for v in (0x00, 0x09, 0x10, 0x59, 0x99)] == [0, 9, 10, 59, 99]


def test_power_on_registers() -> None:
    rtc = new_rtc()
    regs = read_registers(rtc, T0 + 0.3, 0x00, 0x13)
    # 2000-01-01 (day 1) 00:00:00, alarms 0, control 0x1C, status OSF | EN32kHz, aging 0
    assert regs[:7] == bytes([0x00, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00])
    assert regs[7:0x0E] == bytes(7)
    assert regs[REG_CONTROL] == CONTROL_POWER_ON == 0x1C
    assert regs[REG_STATUS] == STATUS_POWER_ON == 0x88
    assert regs[REG_AGING] == 0
    assert regs[REG_TEMP_MSB:] == bytes([24, 0x00])
    assert rtc.now_datetime(T0 + 5.5) == datetime(2000, 1, 1, 0, 0, 5, tzinfo=UTC)


def test_written_time_reads_back_in_bcd_and_counts_on() -> None:
    rtc = new_rtc()
    now = T0 + 10.25
    set_time(rtc, now, [0x58, 0x59, 0x23, 0x03, 0x28, 0x02, 0x24])  # 2024-02-28 23:59:58, day 3
    assert read_registers(rtc, now, 0x00, 7) == bytes([0x58, 0x59, 0x23, 0x03, 0x28, 0x02, 0x24])
    assert read_registers(rtc, now + 0.999, 0x00, 1) == bytes([0x58])
    assert read_registers(rtc, now + 1.0, 0x00, 1) == bytes([0x59])
    assert read_registers(rtc, now + 2.0, 0x00, 7) == bytes([0x00, 0x00, 0x00, 0x04, 0x29, 0x02, 0x24])
    assert rtc.now_datetime(now + 2.0) == datetime(2024, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize(
    ("written", "next_second"),
    [
        ([0x59, 0x59, 0x23, 0x04, 0x29, 0x02, 0x24], [0x00, 0x00, 0x00, 0x05, 0x01, 0x03, 0x24]),  # leap day
        ([0x59, 0x59, 0x23, 0x02, 0x28, 0x02, 0x23], [0x00, 0x00, 0x00, 0x03, 0x01, 0x03, 0x23]),  # 2023
        ([0x59, 0x59, 0x23, 0x01, 0x28, 0x02, 0x00], [0x00, 0x00, 0x00, 0x02, 0x29, 0x02, 0x00]),  # 2000
        ([0x59, 0x59, 0x23, 0x07, 0x30, 0x04, 0x25], [0x00, 0x00, 0x00, 0x01, 0x01, 0x05, 0x25]),  # 30 d
        ([0x59, 0x59, 0x23, 0x07, 0x31, 0x12, 0x25], [0x00, 0x00, 0x00, 0x01, 0x01, 0x01, 0x26]),  # year
    ],
)
def test_calendar_rollovers(written: list[int], next_second: list[int]) -> None:
    rtc = new_rtc()
    set_time(rtc, T0 + 1, written)
    assert read_registers(rtc, T0 + 2, 0x00, 7) == bytes(next_second)


def test_century_rollover_1999_to_2000_sets_the_century_bit() -> None:
    rtc = new_rtc(century_base=1900)
    set_time(rtc, T0 + 1, [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99])  # 1999-12-31 23:59:59
    assert rtc.now_datetime(T0 + 1.5) == datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)
    regs = read_registers(rtc, T0 + 2, 0x00, 7)
    assert regs == bytes([0x00, 0x00, 0x00, 0x06, 0x01, 0x81, 0x00])
    assert rtc.now_datetime(T0 + 2) == datetime(2000, 1, 1, tzinfo=UTC)


def test_the_century_bit_toggles_back_on_the_next_rollover() -> None:
    rtc = new_rtc()
    set_time(rtc, T0 + 1, [0x59, 0x59, 0x23, 0x01, 0x31, 0x92, 0x99])  # century set, year 99
    assert read_registers(rtc, T0 + 2, 0x05, 2) == bytes([0x01, 0x00])


def test_a_date_valid_only_in_the_written_month_is_kept() -> None:
    rtc = new_rtc()
    set_time(rtc, T0 + 1, [0x00, 0x00, 0x12, 0x01, 0x28, 0x02, 0x25])  # February
    set_time(rtc, T0 + 2, [0x00, 0x00, 0x12, 0x01, 0x31, 0x03, 0x25])  # date 31 with month March
    assert read_registers(rtc, T0 + 2, 0x04, 2) == bytes([0x31, 0x03])


def test_12_hour_mode() -> None:
    rtc = new_rtc()
    # 11:59:59 PM in 12-hour mode: bit 6 = 12 h, bit 5 = PM
    set_time(rtc, T0 + 1, [0x59, 0x59, 0x40 | 0x20 | 0x11, 0x02, 0x10, 0x06, 0x25])
    assert rtc.now_datetime(T0 + 1) == datetime(2025, 6, 10, 23, 59, 59, tzinfo=UTC)
    assert read_registers(rtc, T0 + 2, 0x02, 3) == bytes([0x40 | 0x12, 0x03, 0x11]), "12 AM next day"
    set_time(rtc, T0 + 3, [0x59, 0x59, 0x40 | 0x11, 0x02, 0x10, 0x06, 0x25])  # 11:59:59 AM
    assert read_registers(rtc, T0 + 4, 0x02, 1) == bytes([0x40 | 0x20 | 0x12]), "12 PM"
    assert rtc.now_datetime(T0 + 4).hour == 12
    # writing in 24-hour mode switches the mode back; 20-hour bit
    set_time(rtc, T0 + 5, [0x00, 0x30, 0x21, 0x02, 0x10, 0x06, 0x25])
    assert read_registers(rtc, T0 + 5, 0x02, 1) == bytes([0x21])
    assert rtc.now_datetime(T0 + 5).hour == 21


def test_seconds_write_resets_the_countdown_chain_and_sqw_phase() -> None:
    rtc = new_rtc()
    write_registers(rtc, T0 + 0.1, REG_CONTROL, [0x00])  # INTCN = 0, RS = 00: 1 Hz square wave
    assert rtc.next_sqw_rising_edge(T0 + 0.1) == approx_time(T0 + 0.5)
    set_time(rtc, T0 + 3.3, [0x00, 0x00, 0x00, 0x01, 0x01, 0x01, 0x25])
    first = rtc.next_sqw_rising_edge(T0 + 3.3)
    assert first == approx_time(T0 + 3.8)
    assert first is not None
    assert rtc.next_sqw_rising_edge(first) == approx_time(T0 + 4.8)
    # the seconds register ticks at phase 0: on the rising edge the second read is the new one
    assert read_registers(rtc, first, 0x00, 1) == bytes([0x00])
    assert read_registers(rtc, first + 0.6, 0x00, 1) == bytes([0x01])
    # writing only the minutes keeps the phase
    write_registers(rtc, T0 + 5.1, 0x01, [0x30])
    assert rtc.next_sqw_rising_edge(T0 + 5.1) == approx_time(T0 + 5.8)
    assert read_registers(rtc, T0 + 5.9, 0x00, 2) == bytes([0x02, 0x30])


def test_next_edge_is_strictly_after() -> None:
    rtc = new_rtc()
    write_registers(rtc, T0, REG_CONTROL, [0x00])
    edge = rtc.next_sqw_rising_edge(T0)
    assert edge is not None
    later = rtc.next_sqw_rising_edge(edge)
    assert later is not None and later - edge == approx_time(1.0)


@pytest.mark.parametrize(
    ("control", "has_1hz"),
    [(0x1C, False), (0x00, True), (0x04, False), (0x08, False), (0x10, False), (0x18, False), (0x40, True)],
)
def test_sqw_is_1hz_only_with_intcn_0_and_rs_00(control: int, has_1hz: bool) -> None:
    rtc = new_rtc()
    assert rtc.next_sqw_rising_edge(T0) is None, "power-on control 0x1C: no square wave"
    write_registers(rtc, T0 + 1, REG_CONTROL, [control])
    assert (rtc.next_sqw_rising_edge(T0 + 1) is not None) is has_1hz


def test_sqw_stops_when_unplugged_or_on_battery_without_bbsqw() -> None:
    rtc = new_rtc()
    write_registers(rtc, T0, REG_CONTROL, [0x00])
    rtc.faults.plugged = False
    assert rtc.next_sqw_rising_edge(T0) is None
    assert not rtc.address(T0, False)
    rtc.faults.plugged = True
    rtc.set_vcc(T0 + 1, False)
    assert rtc.next_sqw_rising_edge(T0 + 1) is None
    write_registers(rtc, T0 + 2, REG_CONTROL, [0x40])  # BBSQW
    assert rtc.next_sqw_rising_edge(T0 + 2) == approx_time(T0 + 2.5)


def test_osf_at_power_up_clears_when_written_0_and_returns_after_power_loss() -> None:
    rtc = new_rtc()
    assert read_registers(rtc, T0 + 1, REG_STATUS, 1)[0] & 0x80
    write_registers(rtc, T0 + 1, REG_STATUS, [0x88])  # writing 1 does not clear it
    assert read_registers(rtc, T0 + 1, REG_STATUS, 1)[0] & 0x80
    write_registers(rtc, T0 + 2, REG_STATUS, [0x08])
    assert read_registers(rtc, T0 + 2, REG_STATUS, 1)[0] == 0x08
    set_time(rtc, T0 + 3, [0x00, 0x00, 0x12, 0x01, 0x15, 0x06, 0x25])
    assert read_registers(rtc, T0 + 86_410, REG_STATUS, 1)[0] == 0x08, "stays clear while running"
    rtc.power_cycle(T0 + 86_411)  # with a battery: keeps time, oscillator never stopped
    assert read_registers(rtc, T0 + 86_412, REG_STATUS, 1)[0] & 0x80 == 0
    assert rtc.now_datetime(T0 + 86_413) == datetime(2025, 6, 16, 12, 0, 10, tzinfo=UTC)
    rtc.power_loss(T0 + 90_000)
    assert read_registers(rtc, T0 + 90_000, REG_STATUS, 1)[0] & 0x80
    assert rtc.now_datetime(T0 + 90_001) == datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_eosc_stops_the_oscillator_on_battery_and_sets_osf() -> None:
    rtc = new_rtc(clock_at_power_on=T0)
    assert read_registers(rtc, T0, REG_STATUS, 1)[0] & 0x80 == 0, "a battery kept the time"
    rtc.set_vcc(T0 + 10, False)  # EOSC = 0: runs on battery
    rtc.set_vcc(T0 + 20, True)
    assert rtc.now_datetime(T0 + 20.5) == datetime.fromtimestamp(T0 + 20, UTC)
    assert read_registers(rtc, T0 + 21, REG_STATUS, 1)[0] & 0x80 == 0
    write_registers(rtc, T0 + 30, REG_CONTROL, [0x80 | 0x1C])  # EOSC
    assert read_registers(rtc, T0 + 31, REG_STATUS, 1)[0] & 0x80 == 0, "on VCC it keeps running"
    rtc.set_vcc(T0 + 40.75, False)
    assert rtc.now_datetime(T0 + 100) == datetime.fromtimestamp(T0 + 40, UTC), "stopped"
    assert rtc.next_sqw_rising_edge(T0 + 100) is None
    rtc.set_vcc(T0 + 100, True)
    assert read_registers(rtc, T0 + 100, REG_STATUS, 1)[0] & 0x80
    # resumes where it stopped, with the same sub-second phase
    assert rtc.now_datetime(T0 + 100.2) == datetime.fromtimestamp(T0 + 40, UTC)
    assert rtc.now_datetime(T0 + 100.3) == datetime.fromtimestamp(T0 + 41, UTC)


def test_clock_at_power_on_carries_the_sub_second_phase() -> None:
    rtc = new_rtc(clock_at_power_on=T0 + 3600.25)
    write_registers(rtc, T0, REG_CONTROL, [0x00])
    assert rtc.now_datetime(T0) == datetime.fromtimestamp(T0 + 3600, UTC)
    assert rtc.next_sqw_rising_edge(T0) == approx_time(T0 + 0.25)


@pytest.mark.parametrize("ppm", [20.0, -35.0])
def test_drift_ppm_over_a_simulated_day(ppm: float) -> None:
    rtc = new_rtc(clock_at_power_on=T0, drift_ppm=ppm)
    write_registers(rtc, T0, REG_CONTROL, [0x00])
    day = 86_400.0
    gained = day * ppm * 1e-6  # +1.728 s or -3.024 s
    assert rtc.now_datetime(T0 + day) == datetime.fromtimestamp(T0 + day + gained // 1, UTC)
    edge = rtc.next_sqw_rising_edge(T0 + day)
    assert edge is not None
    counted = (edge - T0) * (1 + ppm * 1e-6)
    assert counted % 1.0 == pytest.approx(0.5, abs=1e-5)
    assert 0 < edge - (T0 + day) <= 1.0
    following = rtc.next_sqw_rising_edge(edge)
    assert following is not None
    assert following - edge == pytest.approx(1 / (1 + ppm * 1e-6), abs=1e-6)


def test_drift_and_aging_changes_keep_the_time_counted_so_far() -> None:
    rtc = new_rtc(clock_at_power_on=T0)
    rtc.set_drift_ppm(T0 + 1000.0, 100.0)
    assert rtc.now_datetime(T0 + 1000.0) == datetime.fromtimestamp(T0 + 1000, UTC)
    assert rtc.now_datetime(T0 + 1000.0 + 10_000.0) == datetime.fromtimestamp(T0 + 11_001, UTC)
    rtc.set_drift_ppm(T0 + 11_000.0, 0.0)
    write_registers(rtc, T0 + 11_000.0, REG_AGING, [10])  # +10 LSB = 1 ppm slower
    assert rtc.now_datetime(T0 + 11_000.0 + 1_000_000.5) == datetime.fromtimestamp(T0 + 1_011_000, UTC)
    assert read_registers(rtc, T0 + 11_001, REG_AGING, 1) == bytes([10])


@pytest.mark.parametrize(
    ("celsius", "msb", "lsb"),
    [(25.25, 0x19, 0x40), (25.75, 0x19, 0xC0), (0.0, 0x00, 0x00), (-0.25, 0xFF, 0xC0), (-18.25, 0xED, 0xC0)],
)
def test_temperature_register_encoding(celsius: float, msb: int, lsb: int) -> None:
    rtc = new_rtc()
    rtc.env.set_override(DIE_TEMP, celsius)
    assert read_registers(rtc, T0 + 0.25, REG_TEMP_MSB, 2) == bytes([msb, lsb])
    reading = rtc.log.items[-1]
    assert (reading.quantity, reading.time) == (DIE_TEMP, T0)
    assert reading.truth == reading.reported == celsius


def test_temperature_updates_every_64_s_and_conv_forces_an_update() -> None:
    rtc = new_rtc()
    assert read_registers(rtc, T0 + 0.1, REG_TEMP_MSB, 1) == bytes([0]), "first conversion still running"
    assert read_registers(rtc, T0 + 0.1, REG_STATUS, 1)[0] & 0x04, "BSY"
    assert read_registers(rtc, T0 + 0.3, REG_TEMP_MSB, 1) == bytes([24])
    assert read_registers(rtc, T0 + 0.3, REG_STATUS, 1)[0] & 0x04 == 0
    rtc.env.set_override(DIE_TEMP, 30.0, at=T0 + 10)
    assert read_registers(rtc, T0 + 63.9, REG_TEMP_MSB, 1) == bytes([24])
    assert read_registers(rtc, T0 + 64.1, REG_STATUS, 1)[0] & 0x04, "BSY during the 64 s conversion"
    assert read_registers(rtc, T0 + 64.25, REG_TEMP_MSB, 1) == bytes([30])
    rtc.env.set_override(DIE_TEMP, -5.5, at=T0 + 70)
    write_registers(rtc, T0 + 70, REG_CONTROL, [0x1C | 0x20])  # CONV
    assert read_registers(rtc, T0 + 70.1, REG_CONTROL, 2) == bytes([0x3C, 0x88 | 0x04])
    assert read_registers(rtc, T0 + 70.1, REG_TEMP_MSB, 1) == bytes([30])
    assert read_registers(rtc, T0 + 70.25, REG_CONTROL, 1) == bytes([0x1C]), "CONV clears when done"
    assert read_registers(rtc, T0 + 70.25, REG_TEMP_MSB, 2) == bytes([0xFA, 0x80])
    assert [(r.time, r.reported) for r in rtc.log.items] == [(T0, 24.0), (T0 + 64, 30.0), (T0 + 70, -5.5)]


def test_register_pointer_auto_increments_and_wraps_after_0x12() -> None:
    rtc = new_rtc()
    set_time(rtc, T0 + 1, [0x30, 0x15, 0x08, 0x02, 0x11, 0x03, 0x25])
    data = read_registers(rtc, T0 + 1.3, 0x11, 4)
    assert data == bytes([24, 0x00, 0x30, 0x15])
    # pointer stays where the read left it: a plain read continues from minutes + 1
    assert rtc.address(T0 + 1.3, True)
    assert rtc.read(T0 + 1.3, 2) == bytes([0x08, 0x02])
    rtc.stop(T0 + 1.3)
    # a write across the wrap: aging, temperature (read-only) then seconds
    write_registers(rtc, T0 + 2, REG_AGING, [0x05, 0x77, 0x77, 0x45])
    assert read_registers(rtc, T0 + 2, REG_AGING, 4) == bytes([0x05, 24, 0x00, 0x45])


def test_alarm_registers_are_stored_and_alarm_flags_only_clear() -> None:
    rtc = new_rtc()
    write_registers(rtc, T0 + 1, 0x07, [0x10, 0x20, 0x30, 0x81, 0x45, 0x56, 0x87])
    assert read_registers(rtc, T0 + 1, 0x07, 7) == bytes([0x10, 0x20, 0x30, 0x81, 0x45, 0x56, 0x87])
    write_registers(rtc, T0 + 1, REG_STATUS, [0x03])
    assert read_registers(rtc, T0 + 1, REG_STATUS, 1)[0] & 0x03 == 0


def test_a_read_returns_the_registers_latched_at_the_start_condition() -> None:
    rtc = new_rtc()
    set_time(rtc, T0 + 1, [0x59, 0x00, 0x00, 0x01, 0x01, 0x01, 0x25])
    assert rtc.address(T0 + 1.99, False)
    rtc.write(T0 + 1.99, bytes([0x00]))
    assert rtc.address(T0 + 1.99, True)
    assert rtc.read(T0 + 2.01, 2) == bytes([0x59, 0x00]), "no tearing across the second"
    rtc.stop(T0 + 2.01)
    assert read_registers(rtc, T0 + 2.01, 0x00, 2) == bytes([0x00, 0x01])
