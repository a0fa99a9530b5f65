"""Chip models (vboard/chips) against datasheet facts, driven through the bus interface of
vboard/chips/base.py exactly as the simulated buses drive them: I2C address -> write/stretch/read
-> stop, SPI select -> transfer -> deselect. The DS3231 has its own file, test_chip_ds3231.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vboard.chips import (
    CHIP_KINDS,
    DS3231,
    MAX6675,
    MAX31855,
    SHT2x,
    SHT3x,
    make_chip,
    make_environment,
    make_i2c_chip,
    make_spi_chip,
)
from vboard.chips import sht2x as sht2x_module
from vboard.chips import sht3x as sht3x_module
from vboard.chips.base import I2CDevice, PowerCycled, Reading, ReadingLog, SPIDevice
from vboard.chips.crc import sht2x_crc, sht3x_crc
from vboard.chips.signals import AH, AT, COLD_JUNCTION, DIE_TEMP, KT, QUANTITIES, Environment, Signal, Wave

T0 = 1_700_000_000.0  # simulated Unix time the chips were powered
MS = 1e-3


def seconds(expected: float) -> object:
    """Equal as simulated times near T0 can be (a float there resolves ~0.24 us)."""
    return pytest.approx(expected, abs=1e-6)


@dataclass
class I2CMaster:
    """Drives one chip the way vboard's I2C bus does (SoftI2C semantics)."""

    chip: I2CDevice

    def write(self, now: float, data: bytes) -> int | None:
        """Bytes ACKed, or None when the address was NACKed."""
        if not self.chip.address(now, False):
            self.chip.stop(now)
            return None
        acked = self.chip.write(now, data)
        self.chip.stop(now)
        return acked

    def read(self, now: float, n: int) -> tuple[bytes, float] | None:
        """(data, seconds SCL was stretched), or None when the read address was NACKed."""
        if not self.chip.address(now, True):
            self.chip.stop(now)
            return None
        held = self.chip.stretch(now)
        data = self.chip.read(now + held, n)
        self.chip.stop(now + held)
        return data, held


def spi_read(chip: SPIDevice, now: float, n: int) -> bytes:
    chip.select(now)
    data = chip.transfer(now, bytes(n))
    chip.deselect(now)
    return data


def env_with(**fixed: float) -> Environment:
    env = Environment.from_params(seed=11)
    for quantity, value in fixed.items():
        env.set_override(quantity, value)
    return env


# --- CRC ----------------------------------------------------------------------------------------


def test_sht3x_crc_matches_the_datasheet_example() -> None:
    assert sht3x_crc(bytes([0xBE, 0xEF])) == 0x92


def test_sht2x_crc_matches_the_application_note_and_htu21_examples() -> None:
    assert sht2x_crc(bytes([0xDC])) == 0x79
    assert sht2x_crc(bytes([0x68, 0x3A])) == 0x7C
    assert sht2x_crc(bytes([0x4E, 0x85])) == 0x6B


def test_a_crc_appended_to_its_data_checks_to_zero() -> None:
    data = bytes([0x12, 0x34])
    assert sht3x_crc(data + bytes([sht3x_crc(data)])) == 0
    assert sht2x_crc(data + bytes([sht2x_crc(data)])) == 0


# --- signals ------------------------------------------------------------------------------------


def test_signals_are_deterministic_per_seed_and_differ_between_seeds() -> None:
    times = [T0 + k * 37.3 for k in range(200)]
    for quantity in QUANTITIES:
        first = [Environment.from_params(5).value(quantity, t) for t in times]
        again = [Environment.from_params(5).value(quantity, t) for t in times]
        other = [Environment.from_params(6).value(quantity, t) for t in times]
        assert first == again
        assert sum(a != b for a, b in zip(first, other, strict=True)) > 190


def test_signals_do_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "import json; from vboard.chips.signals import Environment, QUANTITIES;"
        "e = Environment.from_params(9);"
        f"print(json.dumps([e.value(q, {T0} + 12.5 * k) for q in QUANTITIES for k in range(20)]))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        environ = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ
        )
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]


def test_a_signal_is_constant_within_each_second_and_changes_between_seconds() -> None:
    env = Environment.from_params(3)
    for quantity in QUANTITIES:
        for second in range(100):
            start = T0 + second
            values = {env.value(quantity, start + frac) for frac in (0.0, 0.001, 0.5, 0.999999)}
            assert len(values) == 1
        per_second = {env.value(quantity, T0 + s) for s in range(100)}
        assert len(per_second) > 90


def test_default_signals_stay_within_the_chips_ranges_for_a_simulated_month() -> None:
    env = Environment.from_params(4)
    ranges = {KT: (0.0, 1023.75), COLD_JUNCTION: (-20, 85), AT: (-40, 125), AH: (0, 100), DIE_TEMP: (-40, 85)}
    for quantity, (low, high) in ranges.items():
        values = [env.value(quantity, T0 + k * 97.0) for k in range(30 * 86400 // 97)]
        assert low <= min(values) and max(values) <= high, quantity
        assert max(values) - min(values) > 0.5, f"{quantity} should move"


def test_humidity_is_clamped_to_0_100_even_when_parameters_push_it_out() -> None:
    env = Environment.from_params(1, {"humidity": {"base": 95.0, "amplitude": 20.0, "period_s": 600.0}})
    values = [env.value(AH, T0 + k) for k in range(1200)]
    assert max(values) == 100.0
    assert min(values) < 80.0


def test_scenario_parameters_shape_the_thermocouple_signal() -> None:
    params = {"thermocouple": {"base": 250, "amplitude": 30, "period_s": 3600, "noise": 0.3}}
    env = Environment.from_params(2, params)
    signal = env.signals[KT]
    assert signal.base == 250 and signal.noise == 0.3
    assert [(w.amplitude, w.period_s) for w in signal.waves] == [(30.0, 3600.0)]
    values = [env.value(KT, T0 + k) for k in range(3600)]
    assert 250 - 32 < min(values) < 250 - 28
    assert 250 + 28 < max(values) < 250 + 32
    deviations = [v - (250 + 30 * math.sin(2 * math.pi * math.floor(T0 + k) / 3600 + signal.waves[0].phase))
                  for k, v in enumerate(values)]  # fmt: skip
    rms = math.sqrt(sum(d * d for d in deviations) / len(deviations))
    assert 0.25 < rms < 0.35


def test_make_environment_accepts_scenario_parameters_by_alias() -> None:
    env = make_environment(3, {"ambient_humidity": {"base": 60.0, "noise": 0.0, "waves": []}})
    assert env.value(AH, T0) == 60.0
    assert env.signals[KT] == Environment.from_params(3).signals[KT]


def test_signal_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown signal parameters"):
        Environment.from_params(1, {"thermocouple": {"bsae": 3}})
    with pytest.raises(ValueError, match="unknown quantity"):
        Environment.from_params(1, {"pressure": {"base": 1}})
    with pytest.raises(ValueError, match="period_s"):
        Environment.from_params(1, {"kT": {"amplitude": 1, "period_s": 0}})


def test_overrides_step_from_their_time_and_clear() -> None:
    env = Environment.from_params(8)
    before = env.value(KT, T0 + 5)
    env.set_override("thermocouple", 500.0, at=T0 + 10)
    assert env.value(KT, T0 + 5) == before
    assert env.value(KT, T0 + 10) == 500.0
    env.clear_override(KT, at=T0 + 20)
    assert env.value(KT, T0 + 15) == 500.0
    assert env.value(KT, T0 + 25) == Signal.value(env.signals[KT], T0 + 25)
    env.set_override(KT, 42.0)
    assert env.value(KT, T0) == 42.0
    env.clear_override()
    assert env.value(KT, T0 + 5) == before


def test_a_wave_signal_follows_its_formula_exactly() -> None:
    signal = Signal("x", seed=1, base=10.0, waves=(Wave(2.0, 100.0, 0.5),), low=0.0, high=11.0)
    assert signal.value(25.7) == min(11.0, 10.0 + 2.0 * math.sin(2 * math.pi * 25 / 100 + 0.5))


# --- factory ------------------------------------------------------------------------------------


def test_the_factory_builds_every_chip_with_its_interface() -> None:
    env = Environment.from_params(1)
    expected = {"DS3231": DS3231, "SHT30": SHT3x, "SHT20": SHT2x, "MAX6675": MAX6675, "MAX31855": MAX31855}
    assert set(CHIP_KINDS) == set(expected)
    for kind, chip_class in expected.items():
        chip = make_chip(kind, env, powered_at=T0)
        assert type(chip) is chip_class
        assert isinstance(chip, PowerCycled)
        if kind in ("MAX6675", "MAX31855"):
            assert isinstance(chip, SPIDevice)
        else:
            assert isinstance(chip, I2CDevice)
    assert make_i2c_chip("sht30", env, address=0x45).i2c_address == 0x45
    assert make_i2c_chip("SHT20", env).i2c_address == 0x40
    assert make_i2c_chip("DS3231", env, powered_at=T0).i2c_address == 0x68
    with pytest.raises(TypeError, match="powered_at"):
        make_chip("DS3231", env)  # its registers count from power-up: no silent default
    with pytest.raises(ValueError, match="unknown chip"):
        make_chip("BME280", env)
    assert isinstance(make_i2c_chip("SHT20", env), SHT2x)
    assert isinstance(make_spi_chip("max31855", env), MAX31855)
    with pytest.raises(ValueError, match="unknown I2C chip"):
        make_i2c_chip("MAX6675", env)
    with pytest.raises(ValueError, match="unknown SPI chip"):
        make_spi_chip("SHT30", env)
    with pytest.raises(TypeError):
        make_chip("MAX6675", env, adress=1)


def test_reading_log_keeps_at_least_the_newest_capacity_readings() -> None:
    log = ReadingLog(capacity=100)
    for k in range(1000):
        log.add(Reading(float(k), KT, 1.0, 1.0, k))
        assert 100 <= len(log.items) <= 106 or len(log.items) == k + 1
    assert [r.raw for r in log.items][-100:] == list(range(900, 1000))


# --- SHT30 --------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-45, max_value=130), st.floats(min_value=0, max_value=100))
def test_sht30_codes_invert_the_datasheet_formulas_within_half_an_lsb(celsius: float, percent: float) -> None:
    t_code = sht3x_module.temperature_code(celsius)
    rh_code = sht3x_module.humidity_code(percent)
    assert abs(-45 + 175 * t_code / 65535 - celsius) <= 175 / 65535 / 2 + 1e-12
    assert abs(100 * rh_code / 65535 - percent) <= 100 / 65535 / 2 + 1e-12


def test_sht30_codes_clamp_outside_the_range() -> None:
    assert sht3x_module.temperature_code(-60) == 0
    assert sht3x_module.temperature_code(200) == 0xFFFF
    assert sht3x_module.temperature_code(130) == 0xFFFF
    assert sht3x_module.humidity_code(-1) == 0


def decode_sht30(reply: bytes) -> tuple[float, float]:
    assert sht3x_crc(reply[0:2]) == reply[2]
    assert sht3x_crc(reply[3:5]) == reply[5]
    t_code = int.from_bytes(reply[0:2], "big")
    rh_code = int.from_bytes(reply[3:5], "big")
    return -45 + 175 * t_code / 65535, 100 * rh_code / 65535


@pytest.mark.parametrize(("command", "max_s"), [(0x2C06, 15 * MS), (0x2C0D, 6 * MS), (0x2C10, 4 * MS)])
def test_sht30_stretching_single_shot_holds_scl_for_the_measurement_time(command: int, max_s: float) -> None:
    env = env_with(aT=21.37, aH=43.21)
    chip = SHT3x(env, powered_at=T0)
    master = I2CMaster(chip)
    now = T0 + 1.0
    assert master.write(now, command.to_bytes(2, "big")) == 2
    answer = master.read(now, 6)
    assert answer is not None
    reply, held = answer
    assert held == seconds(max_s)
    celsius, percent = decode_sht30(reply)
    assert celsius == pytest.approx(21.37, abs=175 / 65535)
    assert percent == pytest.approx(43.21, abs=100 / 65535)
    # a read started half-way through is held only for the rest
    master.write(now + 1, command.to_bytes(2, "big"))
    answer = master.read(now + 1 + max_s / 2, 6)
    assert answer is not None and answer[1] == seconds(max_s / 2)
    assert master.read(now + 2, 6) is None, "a result is read once"


@pytest.mark.parametrize(("command", "max_s"), [(0x2400, 15 * MS), (0x240B, 6 * MS), (0x2416, 4 * MS)])
def test_sht30_non_stretching_single_shot_nacks_until_ready(command: int, max_s: float) -> None:
    chip = SHT3x(env_with(aT=-12.5, aH=88.0), powered_at=T0)
    master = I2CMaster(chip)
    now = T0 + 2.0
    assert master.write(now, command.to_bytes(2, "big")) == 2
    assert master.read(now, 6) is None
    assert master.read(now + max_s * 0.9, 6) is None
    answer = master.read(now + max_s, 6)
    assert answer is not None
    reply, held = answer
    assert held == 0.0
    celsius, percent = decode_sht30(reply)
    assert celsius == pytest.approx(-12.5, abs=175 / 65535)
    assert percent == pytest.approx(88.0, abs=100 / 65535)
    assert master.read(now + 1.0, 6) is None, "further reads NACK until a new command"


def test_sht30_log_records_exactly_what_the_reply_encodes() -> None:
    chip = SHT3x(Environment.from_params(21), powered_at=T0)
    master = I2CMaster(chip)
    for second in range(5):
        now = T0 + 1 + second + 0.37
        master.write(now, b"\x24\x00")
        answer = master.read(now + 0.02, 6)
        assert answer is not None
        celsius, percent = decode_sht30(answer[0])
        t_reading, rh_reading = chip.log.items[-2:]
        assert (t_reading.quantity, rh_reading.quantity) == (AT, AH)
        assert t_reading.time == rh_reading.time == now
        assert t_reading.reported == celsius and rh_reading.reported == percent
        assert t_reading.truth == chip.env.value(AT, now)
        assert abs(t_reading.truth - celsius) <= 175 / 65535 / 2 + 1e-12
    assert len(chip.log.items) == 10


def test_sht30_reading_fewer_bytes_is_allowed_and_extra_bytes_read_idle() -> None:
    chip = SHT3x(env_with(aT=25.0, aH=50.0), powered_at=T0)
    master = I2CMaster(chip)
    master.write(T0 + 1, b"\x2c\x06")
    answer = master.read(T0 + 1, 2)
    assert answer is not None and len(answer[0]) == 2
    master.write(T0 + 2, b"\x2c\x06")
    answer = master.read(T0 + 2, 8)
    assert answer is not None and answer[0][6:] == b"\xff\xff"


def read_status(master: I2CMaster, now: float) -> int:
    assert master.write(now, b"\xf3\x2d") == 2
    answer = master.read(now, 3)
    assert answer is not None
    reply = answer[0]
    assert sht3x_crc(reply[:2]) == reply[2]
    return int.from_bytes(reply[:2], "big")


def test_sht30_status_register_after_power_up_clear_heater_and_bad_command() -> None:
    chip = SHT3x(Environment.from_params(1), powered_at=T0)
    master = I2CMaster(chip)
    assert master.write(T0 + 0.5 * MS, b"\xf3\x2d") is None, "NACK while powering up"
    status = read_status(master, T0 + 0.1)
    assert status == sht3x_module.STATUS_ALERT_PENDING | sht3x_module.STATUS_RESET_DETECTED == 0x8010
    assert master.write(T0 + 0.2, b"\x30\x41") == 2
    assert read_status(master, T0 + 0.3) == 0
    assert master.write(T0 + 0.4, b"\x30\x6d") == 2
    assert read_status(master, T0 + 0.5) == sht3x_module.STATUS_HEATER == 1 << 13
    assert master.write(T0 + 0.6, b"\x30\x66") == 2
    # an unknown command: second byte NACKed, command-status bit set until a command succeeds
    assert master.write(T0 + 0.7, b"\x12\x34") == 1
    assert read_status(master, T0 + 0.8) == sht3x_module.STATUS_COMMAND_FAILED == 1 << 1
    assert master.write(T0 + 0.9, b"\x24\x00") == 2
    assert read_status(master, T0 + 1.0) == 0


def test_sht30_soft_reset_nacks_briefly_and_sets_reset_detected() -> None:
    chip = SHT3x(Environment.from_params(1), powered_at=T0)
    master = I2CMaster(chip)
    master.write(T0 + 0.1, b"\x30\x41")
    master.write(T0 + 0.2, b"\x30\x6d")
    assert master.write(T0 + 0.3, b"\x30\xa2") == 2
    assert master.write(T0 + 0.3 + 1 * MS, b"\xf3\x2d") is None
    assert read_status(master, T0 + 0.3 + 2 * MS) == 0x8010, "heater off, reset detected"


def fetch(master: I2CMaster, now: float) -> bytes | None:
    assert master.write(now, b"\xe0\x00") == 2
    answer = master.read(now, 6)
    return None if answer is None else answer[0]


def test_sht30_periodic_one_per_second_fetch_nacks_until_new_data() -> None:
    chip = SHT3x(Environment.from_params(5), powered_at=T0)
    master = I2CMaster(chip)
    start = T0 + 1.0
    assert master.write(start, b"\x21\x30") == 2
    assert fetch(master, start + 10 * MS) is None, "first result not ready (15 ms)"
    reply = fetch(master, start + 15 * MS)
    assert reply is not None
    assert chip.log.items[-2].time == start
    decode_sht30(reply)
    assert fetch(master, start + 0.5) is None, "data memory cleared by the fetch"
    assert fetch(master, start + 1.0) is None
    assert fetch(master, start + 1.02) is not None
    assert chip.log.items[-1].time == start + 1.0
    # several periods unfetched: the newest result is returned
    assert fetch(master, start + 4.5) is not None
    assert chip.log.items[-1].time == start + 4.0


def test_sht30_periodic_two_per_second_and_break() -> None:
    chip = SHT3x(Environment.from_params(5), powered_at=T0)
    master = I2CMaster(chip)
    start = T0 + 1.0
    assert master.write(start, b"\x22\x36") == 2
    times = []
    for k in range(6):
        assert fetch(master, start + 0.5 * k + 0.02) is not None
        times.append(chip.log.items[-1].time)
    assert times == [start + 0.5 * k for k in range(6)]
    assert chip.periodic
    assert master.write(start + 4, b"\x24\x00") == 1, "single shot refused in periodic mode"
    assert master.write(start + 4, b"\x30\x93") == 2
    assert not chip.periodic
    assert master.write(start + 5, b"\xe0\x00") == 1, "fetch without periodic mode is not processed"
    assert master.write(start + 5, b"\x24\x00") == 2


def test_sht30_unplugged_nacks_its_address() -> None:
    chip = SHT3x(Environment.from_params(1), powered_at=T0)
    master = I2CMaster(chip)
    chip.faults.plugged = False
    assert master.write(T0 + 1, b"\x24\x00") is None
    chip.faults.plugged = True
    assert master.write(T0 + 1, b"\x24\x00") == 2


def test_sht30_crc_fault_injection() -> None:
    chip = SHT3x(Environment.from_params(1), address=0x45, powered_at=T0)
    master = I2CMaster(chip)

    def measure(now: float) -> bytes:
        master.write(now, b"\x2c\x06")
        answer = master.read(now, 6)
        assert answer is not None
        return answer[0]

    chip.faults.crc_error_next = 1
    bad = measure(T0 + 1)
    assert sht3x_crc(bad[0:2]) != bad[2] and sht3x_crc(bad[3:5]) != bad[5]
    assert chip.faults.crc_error_next == 0
    decode_sht30(measure(T0 + 2))
    chip.faults.crc_error_rate = 0.5
    replies = [measure(T0 + 3 + k) for k in range(200)]
    corrupted = sum(sht3x_crc(r[0:2]) != r[2] for r in replies)
    assert 60 < corrupted < 140
    with pytest.raises(ValueError, match="0x44 or 0x45"):
        SHT3x(Environment.from_params(1), address=0x40)


# --- SHT20 --------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-40, max_value=125), st.floats(min_value=0, max_value=100))
def test_sht20_codes_invert_the_datasheet_formulas_within_one_lsb(celsius: float, percent: float) -> None:
    for t_bits in (14, 13, 12, 11):
        code = sht2x_module.temperature_code(celsius, t_bits)
        assert code % (1 << (16 - t_bits)) == 0
        lsb = 175.72 * (1 << (16 - t_bits)) / 65536
        assert abs(-46.85 + 175.72 * code / 65536 - celsius) <= lsb / 2 + 1e-9
    for rh_bits in (12, 11, 10, 8):
        code = sht2x_module.humidity_code(percent, rh_bits)
        assert code % (1 << (16 - rh_bits)) == 0
        lsb = 125 * (1 << (16 - rh_bits)) / 65536
        assert abs(-6 + 125 * code / 65536 - percent) <= lsb / 2 + 1e-9


def sht20_measure(master: I2CMaster, now: float, command: int) -> tuple[int, float]:
    """(16-bit word, stretch) of a hold-master measurement, CRC checked."""
    assert master.write(now, bytes([command])) == 1
    answer = master.read(now, 3)
    assert answer is not None
    reply, held = answer
    assert sht2x_crc(reply[:2]) == reply[2]
    return int.from_bytes(reply[:2], "big"), held


def test_sht20_hold_master_stretches_for_the_default_resolution() -> None:
    chip = SHT2x(env_with(aT=22.5, aH=37.5), powered_at=T0)
    master = I2CMaster(chip)
    word, held = sht20_measure(master, T0 + 1, 0xE3)
    assert held == seconds(85 * MS)
    assert word & 0x3 == 0, "status bits: temperature"
    assert -46.85 + 175.72 * (word & ~0x3) / 65536 == pytest.approx(22.5, abs=175.72 * 4 / 65536)
    word, held = sht20_measure(master, T0 + 2, 0xE5)
    assert held == seconds(29 * MS)
    assert word & 0x3 == 0x2, "status bits: humidity"
    assert word & 0xC == 0, "12-bit humidity leaves bits 3..2 clear"
    assert -6 + 125 * (word & ~0x3) / 65536 == pytest.approx(37.5, abs=125 * 16 / 65536)
    assert [r.quantity for r in chip.log.items] == [AT, AH]
    assert chip.log.items[0].raw == sht20_measure(master, T0 + 3, 0xE3)[0]


def test_sht20_no_hold_nacks_until_ready_and_reading_two_bytes_is_allowed() -> None:
    chip = SHT2x(env_with(aT=30.0, aH=60.0), powered_at=T0)
    master = I2CMaster(chip)
    assert master.write(T0 + 1, b"\xf5") == 1
    assert master.read(T0 + 1 + 20 * MS, 2) is None
    answer = master.read(T0 + 1 + 29 * MS, 2)
    assert answer is not None and len(answer[0]) == 2 and answer[1] == 0.0
    assert master.read(T0 + 1.1, 3) is None, "read once"
    assert master.write(T0 + 2, b"\xf3") == 1
    assert master.read(T0 + 2 + 84 * MS, 3) is None
    assert master.read(T0 + 2 + 85 * MS, 3) is not None


def read_user_register(master: I2CMaster, now: float) -> int:
    assert master.write(now, b"\xe7") == 1
    answer = master.read(now, 1)
    assert answer is not None
    return answer[0][0]


def test_sht20_user_register_resolution_scales_time_and_bits() -> None:
    chip = SHT2x(env_with(aT=22.5, aH=37.5), powered_at=T0)
    master = I2CMaster(chip)
    assert read_user_register(master, T0 + 1) == 0x02
    assert master.write(T0 + 1, bytes([0xE6, 0x03])) == 2  # bit 0: RH 8 bit / T 12 bit
    assert read_user_register(master, T0 + 1) == 0x03
    word, held = sht20_measure(master, T0 + 2, 0xE3)
    assert held == seconds(22 * MS)
    assert word & 0xF == 0
    word, held = sht20_measure(master, T0 + 3, 0xE5)
    assert held == seconds(4 * MS)
    assert word & 0xFF == 0x02
    master.write(T0 + 4, bytes([0xE6, 0x82]))  # RH 10 / T 13
    assert sht20_measure(master, T0 + 5, 0xE3)[1] == seconds(43 * MS)
    assert sht20_measure(master, T0 + 6, 0xE5)[1] == seconds(9 * MS)
    master.write(T0 + 7, bytes([0xE6, 0x83]))  # RH 11 / T 11
    assert sht20_measure(master, T0 + 8, 0xE3)[1] == seconds(11 * MS)
    assert sht20_measure(master, T0 + 9, 0xE5)[1] == seconds(15 * MS)


def test_sht20_user_register_keeps_reserved_bits_and_end_of_battery_is_read_only() -> None:
    chip = SHT2x(Environment.from_params(1), powered_at=T0, user_register_default=0x3A)
    master = I2CMaster(chip)
    assert read_user_register(master, T0 + 1) == 0x3A
    master.write(T0 + 1, bytes([0xE6, 0x47]))  # tries to clear reserved bits and set end-of-battery
    assert read_user_register(master, T0 + 1) == 0x3F


def test_sht20_soft_reset_restores_defaults_except_the_heater() -> None:
    chip = SHT2x(Environment.from_params(1), powered_at=T0)
    master = I2CMaster(chip)
    assert master.write(T0 + 5 * MS, b"\xe7") is None, "NACK while starting up (15 ms)"
    master.write(T0 + 1, bytes([0xE6, 0x87]))
    assert read_user_register(master, T0 + 1) == 0x87
    assert master.write(T0 + 2, b"\xfe") == 1
    assert master.write(T0 + 2 + 10 * MS, b"\xe7") is None
    assert read_user_register(master, T0 + 2 + 15 * MS) == 0x06


def test_sht20_otp_reload_restores_the_resolution_before_each_measurement() -> None:
    chip = SHT2x(Environment.from_params(1), powered_at=T0)
    master = I2CMaster(chip)
    master.write(T0 + 1, bytes([0xE6, 0x01]))  # 8/12 bit with OTP reload enabled (bit 1 = 0)
    assert sht20_measure(master, T0 + 2, 0xE3)[1] == seconds(85 * MS)
    assert read_user_register(master, T0 + 3) == 0x02


def test_sht20_unknown_command_unplugged_and_crc_fault() -> None:
    chip = SHT2x(Environment.from_params(1), powered_at=T0)
    master = I2CMaster(chip)
    assert master.write(T0 + 1, b"\x42") == 0
    chip.faults.plugged = False
    assert master.write(T0 + 1, b"\xe3") is None
    chip.faults.plugged = True
    chip.faults.crc_error_next = 1
    master.write(T0 + 2, b"\xe3")
    answer = master.read(T0 + 2, 3)
    assert answer is not None and sht2x_crc(answer[0][:2]) != answer[0][2]
    sht20_measure(master, T0 + 3, 0xE3)


# --- MAX6675 ------------------------------------------------------------------------------------


def max6675_frame(chip: SPIDevice, now: float) -> int:
    return int.from_bytes(spi_read(chip, now, 2), "big")


def test_max6675_frame_layout_and_quantization() -> None:
    env = env_with(kT=250.3)
    chip = MAX6675(env, powered_at=T0)
    frame = max6675_frame(chip, T0 + 0.3)
    assert frame & 0x8000 == 0 and frame & 0x0002 == 0 and frame & 0x0004 == 0
    assert (frame >> 3) * 0.25 == 250.25
    reading = chip.log.items[-1]
    assert (reading.quantity, reading.truth, reading.reported, reading.raw) == (KT, 250.3, 250.25, 1001)
    assert reading.time == T0, "the first conversion after power-up"
    env.set_override(KT, 1500.0)
    assert max6675_frame(chip, T0 + 1) >> 3 == 0xFFF
    env.set_override(KT, -5.0)
    assert max6675_frame(chip, T0 + 2) >> 3 == 0


def test_max6675_cs_low_before_the_conversion_ends_returns_the_previous_result() -> None:
    env = env_with(kT=100.0)
    chip = MAX6675(env, powered_at=T0)
    assert max6675_frame(chip, T0 + 0.25) >> 3 == 400  # deselected at T0 + 0.25
    env.set_override(KT, 200.0)
    assert max6675_frame(chip, T0 + 0.25 + 0.2) >> 3 == 400, "0.2 s < 0.22 s conversion: old result"
    assert max6675_frame(chip, T0 + 0.45 + 0.22) >> 3 == 800
    # CS high for a second: conversions ran back to back, the newest finished one is shifted out
    assert max6675_frame(chip, T0 + 2.0) >> 3 == 800
    assert chip.log.items[-1].time == seconds(T0 + 0.67 + 5 * 0.22)


def test_max6675_open_thermocouple_and_three_stated_tail() -> None:
    chip = MAX6675(env_with(kT=300.0), powered_at=T0, miso_float=0xFF)
    chip.faults.tc_open = True
    data = spi_read(chip, T0 + 0.3, 4)
    frame = int.from_bytes(data[:2], "big")
    assert frame & 0x0004, "D2 open"
    assert frame & 0x0001, "D0 three-state reads the float level"
    assert data[2:] == b"\xff\xff"
    assert math.isnan(chip.log.items[-1].reported)
    chip.faults.tc_open = False
    frame = max6675_frame(chip, T0 + 1)
    assert frame & 0x0004 == 0 and frame >> 3 == 1200


def test_max6675_power_cycle_empties_the_register() -> None:
    chip = MAX6675(env_with(kT=100.0), powered_at=T0)
    assert max6675_frame(chip, T0 + 1) >> 3 == 400
    chip.power_cycle(T0 + 2)
    assert max6675_frame(chip, T0 + 2.1) == 0
    assert max6675_frame(chip, T0 + 2.1 + 0.22) >> 3 == 400


# --- MAX31855 -----------------------------------------------------------------------------------


def max31855_frame(chip: SPIDevice, now: float) -> int:
    return int.from_bytes(spi_read(chip, now, 4), "big")


@pytest.mark.parametrize(
    ("celsius", "field"),
    [  # datasheet table 4
        (1600.0, 0b01100100000000),
        (1000.0, 0b00111110100000),
        (100.75, 0b00000110010011),
        (25.0, 0b00000001100100),
        (0.0, 0),
        (-0.25, 0b11111111111111),
        (-1.0, 0b11111111111100),
        (-250.0, 0b11110000011000),
    ],
)
def test_max31855_thermocouple_field_matches_the_datasheet_table(celsius: float, field: int) -> None:
    chip = MAX31855(env_with(kT=celsius, cold_junction=25.0), powered_at=T0)
    frame = max31855_frame(chip, T0 + 0.2)
    assert frame >> 18 == field
    assert frame & (1 << 17) == 0 and frame & (1 << 16) == 0 and frame & (1 << 3) == 0
    signed = (frame >> 18) - (1 << 14) if frame & (1 << 31) else frame >> 18
    assert signed * 0.25 == celsius == chip.log.items[-1].reported


@pytest.mark.parametrize(
    ("celsius", "field"),
    [  # datasheet table 5
        (127.0, 0b011111110000),
        (100.5625, 0b011001001001),
        (25.0, 0b000110010000),
        (0.0, 0),
        (-0.0625, 0b111111111111),
        (-1.0, 0b111111110000),
        (-20.0, 0b111011000000),
        (-55.0, 0b110010010000),
    ],
)
def test_max31855_internal_field_matches_the_datasheet_table(celsius: float, field: int) -> None:
    chip = MAX31855(env_with(kT=100.0, cold_junction=celsius), powered_at=T0)
    frame = max31855_frame(chip, T0 + 0.2)
    assert (frame >> 4) & 0xFFF == field
    cold = [r for r in chip.log.items if r.quantity == COLD_JUNCTION][-1]
    assert cold.reported == celsius


@pytest.mark.parametrize(
    ("fault", "bit"), [("tc_open", 1 << 0), ("tc_short_gnd", 1 << 1), ("tc_short_vcc", 1 << 2)]
)
def test_max31855_fault_bits(fault: str, bit: int) -> None:
    chip = MAX31855(env_with(kT=300.0, cold_junction=-20.0), powered_at=T0)
    setattr(chip.faults, fault, True)
    frame = max31855_frame(chip, T0 + 0.2)
    assert frame & 0x7 == bit
    assert frame & (1 << 16), "D16 is the OR of the fault bits"
    assert frame >> 18 == 0x1FFF, "the model's documented fault code"
    assert (frame >> 4) & 0xFFF == 0b111011000000, "internal temperature still valid"
    assert math.isnan([r for r in chip.log.items if r.quantity == KT][-1].reported)
    setattr(chip.faults, fault, False)
    frame = max31855_frame(chip, T0 + 1)
    assert frame & 0x7 == 0 and not frame & (1 << 16) and frame >> 18 == 1200


def test_max31855_several_faults_at_once_and_range_clamp() -> None:
    env = env_with(kT=2500.0, cold_junction=25.0)
    chip = MAX31855(env, powered_at=T0)
    assert max31855_frame(chip, T0 + 0.2) >> 18 == 1800 * 4
    env.set_override(KT, -300.0)
    assert (max31855_frame(chip, T0 + 1) >> 18) - (1 << 14) == -270 * 4
    chip.faults.tc_open = chip.faults.tc_short_vcc = True
    assert max31855_frame(chip, T0 + 2) & 0x10007 == 0x10005


def test_max31855_conversion_timing() -> None:
    env = env_with(kT=20.0, cold_junction=25.0)
    chip = MAX31855(env, powered_at=T0)
    assert max31855_frame(chip, T0 + 0.09) == 0, "nothing converted yet"
    assert max31855_frame(chip, T0 + 0.2) >> 18 == 80  # deselected at T0 + 0.2
    env.set_override(KT, 40.0)
    assert max31855_frame(chip, T0 + 0.29) >> 18 == 80
    assert max31855_frame(chip, T0 + 0.29 + 0.1) >> 18 == 160
