"""The sensor drivers' pure logic (CRCs, conversions, frame decoding, calendar) under the real
MicroPython unix port, checked against datasheet examples and independent CPython arithmetic.

Bus-level behaviour against the simulated chips belongs to the virtual-board tests; until those
run, a few tests here drive the drivers through a recording fake bus (marked as such) to pin
the command bytes and the two-phase sequencing the datasheets ask for.
"""

from __future__ import annotations

import calendar
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.fw_run import checked, compile_firmware, run_script


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_firmware(tmp_path_factory.mktemp("fwlib"))


@pytest.fixture(scope="module")
def mp(micropython_bin: str, lib: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run a snippet on MicroPython; it returns the value of `result` (JSON). The heap is roomy:
    the test vectors are big literals, and the drivers' arithmetic does not depend on it."""
    cwd = tmp_path_factory.mktemp("drivers")

    def run(body: str) -> Any:
        script = "import json\n" + body + "\nprint('RESULT', json.dumps(result))\n"
        result = run_script(micropython_bin, lib, script, cwd, heap="1M")
        checked(result)
        return json.loads(result.stdout.split("RESULT ", 1)[1])

    return run


def raising(call: str) -> str:
    """A MicroPython expression giving the exception class name `call` raises, or 'ok'."""
    return f"_raises(lambda: {call})"


RAISES = """
def _raises(f):
    try:
        f()
        return "ok"
    except Exception as e:
        return type(e).__name__
"""


# --- SHT3x ------------------------------------------------------------------------------------


def test_sht3x_crc_datasheet_check_value(mp: Any) -> None:
    # SHT3x-DIS datasheet, CRC properties: CRC(0xBEEF) = 0x92.
    assert mp("from drivers import sht3x\nresult = sht3x.crc8(b'\\xbe\\xef', 0, 2)") == 0x92


def test_sht3x_conversions_round_the_datasheet_formulas(mp: Any) -> None:
    raws = [*range(0, 65536, 97), 65535]
    got = mp(
        "from drivers import sht3x\n"
        f"result = [[sht3x.temperature_hundredths(r), sht3x.humidity_hundredths(r)] for r in {raws!r}]"
    )
    for raw, (t, rh) in zip(raws, got, strict=True):
        assert abs(t - (-45 + 175 * raw / 65535) * 100) <= 0.5
        assert abs(rh - 100 * raw / 65535 * 100) <= 0.5
    assert got[0] == [-4500, 0] and got[-1] == [13000, 10000]


def test_sht3x_decode_checks_both_crcs(mp: Any) -> None:
    # 0x6666 -> 25.0 degC-ish, 0x8000 -> ~50 %RH; CRCs computed by the driver's own crc8 would
    # prove nothing, so they are the independently computed values for these words.
    good = bytes([0x66, 0x66, crc8_31(b"\x66\x66"), 0x80, 0x00, crc8_31(b"\x80\x00")])
    bad_rh = good[:5] + bytes([good[5] ^ 1])
    got = mp(
        RAISES + "from drivers import sht3x\n"
        f"result = [sht3x.decode({good!r}), {raising(f'sht3x.decode({bad_rh!r})')}]"
    )
    assert got == [[0x6666, 0x8000], "CRCError"]


def crc8_31(data: bytes, poly: int = 0x31, init: int = 0xFF) -> int:
    """CRC-8 as the Sensirion datasheets define it, computed in CPython."""
    crc = init
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


# --- SHT2x ------------------------------------------------------------------------------------


def test_sht2x_crc_examples(mp: Any) -> None:
    # The HTU21D/SHT2x CRC examples: 0xDC -> 0x79, 0x683A -> 0x7C, 0x4E85 -> 0x6B.
    got = mp(
        "from drivers import sht2x\n"
        "result = [sht2x.crc8(b'\\xdc', 0, 1), sht2x.crc8(b'\\x68\\x3a', 0, 2),"
        " sht2x.crc8(b'\\x4e\\x85', 0, 2)]"
    )
    assert got == [0x79, 0x7C, 0x6B]


def test_sht2x_conversions_clear_status_bits_and_round(mp: Any) -> None:
    raws = [*range(0, 65536, 4 * 61), 65532]
    got = mp(
        "from drivers import sht2x\n"
        f"result = [[sht2x.temperature_hundredths(r), sht2x.humidity_hundredths(r),"
        f" sht2x.temperature_hundredths(r | 3), sht2x.humidity_hundredths(r | 2)] for r in {raws!r}]"
    )
    for raw, (t, rh, t_status, rh_status) in zip(raws, got, strict=True):
        assert abs(t - (-46.85 + 175.72 * raw / 65536) * 100) <= 0.5
        assert abs(rh - (-6 + 125 * raw / 65536) * 100) <= 0.5
        assert (t_status, rh_status) == (t, rh)


def sht2x_reply(word: int) -> bytes:
    data = word.to_bytes(2, "big")
    return data + bytes([crc8_31(data, poly=0x31, init=0x00)])  # 0x131 in 8-bit arithmetic


def test_sht2x_decode_checks_crc_and_measurement_kind(mp: Any) -> None:
    temperature = sht2x_reply(0x6838)  # status bit 1 clear: a temperature
    humidity = sht2x_reply(0x4E86)  # status bit 1 set: a humidity
    bad_crc = temperature[:2] + bytes([temperature[2] ^ 0x10])
    got = mp(
        RAISES + "from drivers import sht2x\n"
        f"result = [sht2x.decode({temperature!r}, False), sht2x.decode({humidity!r}, True),"
        f" {raising(f'sht2x.decode({temperature!r}, True)')}, {raising(f'sht2x.decode({bad_crc!r}, False)')}]"
    )
    assert got == [0x6838, 0x4E86, "NotAnswering", "CRCError"]


# --- MAX6675 / MAX31855 -----------------------------------------------------------------------


def test_max6675_frames(mp: Any) -> None:
    frames = {
        "25C": 100 << 3,  # 25.00 degC = 100 quarter degrees in D14..D3
        "25C_d0_high": 100 << 3 | 1,  # D0 is three-state: ignored
        "max": 4095 << 3,  # 1023.75 degC
        "open": 100 << 3 | 0x04,  # D2: thermocouple input open
        "zeros": 0x0000,
        "ones": 0xFFFF,
        "sign_bit": 0x8000 | 100 << 3,  # D15 is always 0: not a MAX6675 talking
        "device_id": 100 << 3 | 0x02,  # D1 is always 0
    }
    calls = ", ".join(f"{name!r}: _value(lambda: max6675.decode({frame}))" for name, frame in frames.items())
    got = mp(RAISES + VALUE + f"from drivers import max6675\nresult = {{{calls}}}")
    assert got == {
        "25C": 2500,
        "25C_d0_high": 2500,
        "max": 102375,
        "open": "OpenCircuit",
        "zeros": "NotAnswering",
        "ones": "NotAnswering",
        "sign_bit": "NotAnswering",
        "device_id": "NotAnswering",
    }


VALUE = """
def _value(f):
    try:
        return f()
    except Exception as e:
        return type(e).__name__
"""

# MAX31855 datasheet, Table 2 (thermocouple) and Table 4 (cold junction): temperature -> bits.
THERMOCOUPLE = {
    160000: 0b01100100000000,
    100000: 0b00111110100000,
    10075: 0b00000110010011,
    2500: 0b00000001100100,
    0: 0b00000000000000,
    -25: 0b11111111111111,
    -100: 0b11111111111100,
    -25000: 0b11110000011000,
}
COLD_JUNCTION = {
    12700: 0b011111110000,  # 127.0000
    10056: 0b011001001001,  # 100.5625 -> 10056.25 hundredths
    2500: 0b000110010000,
    -6: 0b111111111111,  # -0.0625 -> -6.25 hundredths
    -100: 0b111111110000,
    -2000: 0b111011000000,
    -5500: 0b110010010000,
}


def max31855_frame(tc_bits: int, cj_bits: int, faults: int = 0) -> bytes:
    value = tc_bits << 18 | (0x10000 if faults else 0) | cj_bits << 4 | faults
    return value.to_bytes(4, "big")


def test_max31855_datasheet_temperatures(mp: Any) -> None:
    pairs = list(zip(THERMOCOUPLE.items(), COLD_JUNCTION.items(), strict=False))
    frames = [max31855_frame(tc_bits, cj_bits) for (_, tc_bits), (_, cj_bits) in pairs]
    got = mp(
        RAISES + VALUE + "from drivers import max31855\n"
        f"result = [_value(lambda: list(max31855.decode(f))) for f in {frames!r}]"
    )
    for ((tc, _), (cj, _)), value in zip(pairs, got, strict=True):
        if value == "NotAnswering":
            assert tc == 0 and cj == 0  # an all-zero frame cannot be told from a dead bus
            continue
        assert value[0] == tc
        assert abs(value[1] - cj) <= 0.5, (cj, value)


def test_max31855_fault_bits_and_dead_bus(mp: Any) -> None:
    frames = {
        "open": max31855_frame(THERMOCOUPLE[2500], COLD_JUNCTION[2500], 0b001),
        "short_gnd": max31855_frame(THERMOCOUPLE[2500], COLD_JUNCTION[2500], 0b010),
        "short_vcc": max31855_frame(THERMOCOUPLE[2500], COLD_JUNCTION[2500], 0b100),
        "zeros": bytes(4),
        "ones": b"\xff\xff\xff\xff",
        "reserved_d17": (int.from_bytes(max31855_frame(100, 400), "big") | 1 << 17).to_bytes(4, "big"),
        "fault_without_cause": (int.from_bytes(max31855_frame(100, 400), "big") | 1 << 16).to_bytes(4, "big"),
        "negative": max31855_frame(THERMOCOUPLE[-25000], COLD_JUNCTION[-2000]),
    }
    calls = ", ".join(f"{name!r}: _value(lambda: list(max31855.decode({f!r})))" for name, f in frames.items())
    got = mp(RAISES + VALUE + f"from drivers import max31855\nresult = {{{calls}}}")
    assert got == {
        "open": "OpenCircuit",
        "short_gnd": "ShortCircuit",
        "short_vcc": "ShortCircuit",
        "zeros": "NotAnswering",
        "ones": "NotAnswering",
        "reserved_d17": "NotAnswering",
        "fault_without_cause": "NotAnswering",
        "negative": [-25000, -2000],
    }


# --- DS3231 -----------------------------------------------------------------------------------


def test_ds3231_calendar_matches_cpython(mp: Any) -> None:
    rng = random.Random(7)
    stamps = [0, 946684800, 951782400, 4102444799, 4102444800, 7258118399]
    stamps += [rng.randrange(946684800, 7258118400) for _ in range(300)]
    got = mp(
        "from drivers import ds3231\n"
        f"result = [[list(ds3231.from_epoch(s)), ds3231.to_epoch(ds3231.from_epoch(s))] for s in {stamps!r}]"
    )
    for stamp, (fields, back) in zip(stamps, got, strict=True):
        dt = datetime.fromtimestamp(stamp, UTC)
        assert fields == [dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second]
        assert back == stamp == calendar.timegm(dt.timetuple())


def test_ds3231_registers_round_trip_with_weekday_and_century(mp: Any) -> None:
    dates = [
        (2024, 2, 29, 23, 59, 58),
        (2000, 1, 1, 0, 0, 0),
        (2099, 12, 31, 12, 30, 5),
        (2100, 3, 1, 7, 8, 9),
    ]
    got = mp(
        "from drivers import ds3231\n"
        "result = []\n"
        f"for dt in {dates!r}:\n"
        "    regs = bytearray(7)\n"
        "    ds3231.encode_datetime(dt, regs)\n"
        "    result.append([list(regs), list(ds3231.decode_datetime(regs))])\n"
    )
    for dt, (regs, back) in zip(dates, got, strict=True):
        assert tuple(back) == dt
        assert regs[3] == datetime(*dt).isoweekday()
        assert bool(regs[5] & 0x80) == (dt[0] >= 2100)
    # 2024-02-29 23:59:58: BCD seconds 0x58, minutes 0x59, hours 0x23, Thursday, 0x29, 0x02, 0x24.
    assert got[0][0] == [0x58, 0x59, 0x23, 4, 0x29, 0x02, 0x24]


def test_ds3231_twelve_hour_mode_and_invalid_registers(mp: Any) -> None:
    def regs(hours: int, month: int = 0x06, day: int = 0x15) -> list[int]:
        return [0x00, 0x00, hours, 3, day, month, 0x25]

    cases = {
        "12am": regs(0x40 | 0x12),
        "1am": regs(0x40 | 0x01),
        "12pm": regs(0x40 | 0x20 | 0x12),
        "11pm": regs(0x40 | 0x20 | 0x11),
        "24h_17": regs(0x17),
        "month13": regs(0x17, month=0x13),
        "feb30": regs(0x17, month=0x02, day=0x30),
        "all_ones": [0xFF] * 7,
    }
    calls = ", ".join(
        f"{k!r}: _value(lambda: ds3231.decode_datetime(bytes({v!r}))[3])" for k, v in cases.items()
    )
    got = mp(RAISES + VALUE + f"from drivers import ds3231\nresult = {{{calls}}}")
    assert got == {
        "12am": 0,
        "1am": 1,
        "12pm": 12,
        "11pm": 23,
        "24h_17": 17,
        "month13": "NotAnswering",
        "feb30": "NotAnswering",
        "all_ones": "NotAnswering",
    }


def test_ds3231_temperature_registers(mp: Any) -> None:
    # 10-bit two's complement, 0.25 degC: 0x19/0x40 = +25.25, 0xE7/0x00 = -25.00, 0xFF/0xC0 = -0.25.
    got = mp(
        "from drivers import ds3231\n"
        "result = [ds3231.decode_temperature(0x19, 0x40), ds3231.decode_temperature(0xE7, 0x00),"
        " ds3231.decode_temperature(0xFF, 0xC0), ds3231.decode_temperature(0x7F, 0xC0)]"
    )
    assert got == [2525, -2500, -25, 12775]


# --- command sequences through a recording fake bus (no simulated chip yet) -------------------

FAKE_BUS = """
class FakeI2C:
    # Records transactions and answers reads from a queue; an absent device raises OSError(19)
    # (ENODEV), as machine.I2C/SoftI2C does when the address is not acknowledged.
    def __init__(self, replies=(), present=True):
        self.log = []
        self.replies = list(replies)
        self.present = present
    def writeto(self, addr, buf):
        if not self.present:
            raise OSError(19)
        self.log.append(["w", addr, list(buf)])
        return len(buf)
    def readfrom_into(self, addr, buf):
        if not self.present or not self.replies:
            raise OSError(19)
        reply = self.replies.pop(0)
        buf[:] = reply
        self.log.append(["r", addr, len(buf)])
    def readfrom_mem_into(self, addr, reg, buf):
        if not self.present:
            raise OSError(19)
        reply = self.replies.pop(0)
        for i in range(len(buf)):
            buf[i] = reply[i]
        self.log.append(["rm", addr, reg, len(buf)])
    def writeto_mem(self, addr, reg, buf):
        if not self.present:
            raise OSError(19)
        self.log.append(["wm", addr, reg, list(buf)])
class FakePin:
    def __init__(self):
        self.log = []
    def value(self, v=None):
        if v is not None:
            self.log.append(v)
class FakeSPI:
    def __init__(self, frame, cs):
        self.frame = frame
        self.cs = cs
        self.selected = []
    def readinto(self, buf, write=0):
        self.selected.append(self.cs.log[-1])
        for i in range(len(buf)):
            buf[i] = self.frame[i]
"""


def test_sht3x_two_phase_sequence_on_a_fake_bus(mp: Any) -> None:
    reply = bytes([0x66, 0x66, crc8_31(b"\x66\x66"), 0x80, 0x00, crc8_31(b"\x80\x00")])
    got = mp(
        FAKE_BUS + RAISES + "from drivers.sht3x import SHT3x\n"
        f"bus = FakeI2C([{reply!r}])\n"
        "s = SHT3x(bus, 0x45)\n"
        "wait = s.start()\n"
        "done = s.poll()\n"
        "absent = SHT3x(FakeI2C(present=False))\n"
        f"result = [wait, done, s.temperature, s.humidity, bus.log, {raising('absent.start()')}]"
    )
    assert got == [15, 0, 2500, 5000, [["w", 0x45, [0x24, 0x00]], ["r", 0x45, 6]], "NotAnswering"]


def test_sht2x_two_phase_sequence_on_a_fake_bus(mp: Any) -> None:
    got = mp(
        FAKE_BUS + "from drivers.sht2x import SHT2x\n"
        f"bus = FakeI2C([{sht2x_reply(0x6838)!r}, {sht2x_reply(0x4E86)!r}])\n"
        "s = SHT2x(bus)\n"
        "waits = [s.start(), s.poll(), s.poll()]\n"
        "result = [waits, s.temperature, s.humidity, bus.log]"
    )
    waits, temperature, humidity, log = got
    assert waits == [85, 29, 0]
    assert abs(temperature - (-46.85 + 175.72 * 0x6838 / 65536) * 100) <= 0.5
    assert abs(humidity - (-6 + 125 * 0x4E84 / 65536) * 100) <= 0.5
    assert log == [["w", 0x40, [0xF3]], ["r", 0x40, 3], ["w", 0x40, [0xF5]], ["r", 0x40, 3]]


def test_thermocouple_read_frames_the_transfer_with_chip_select(mp: Any) -> None:
    got = mp(
        FAKE_BUS + "from drivers.max6675 import MAX6675\nfrom drivers.max31855 import MAX31855\n"
        "cs = FakePin()\n"
        "spi = FakeSPI(b'\\x03\\x20', cs)\n"
        "t = MAX6675(spi, cs).read()\n"
        "cs2 = FakePin()\n"
        f"spi2 = FakeSPI({max31855_frame(THERMOCOUPLE[10075], COLD_JUNCTION[2500])!r}, cs2)\n"
        "m = MAX31855(spi2, cs2)\n"
        "t2 = m.read()\n"
        "result = [t, cs.log, spi.selected, t2, m.cold_junction, cs2.log]"
    )
    assert got == [2500, [1, 0, 1], [0], 10075, 2500, [1, 0, 1]]


def test_ds3231_control_and_status_writes_on_a_fake_bus(mp: Any) -> None:
    got = mp(
        FAKE_BUS + "from drivers.ds3231 import DS3231\n"
        "bus = FakeI2C([b'\\x88', b'\\x88', b'\\x19\\x40'])\n"
        "rtc = DS3231(bus)\n"
        "osf = rtc.osf()\n"
        "rtc.clear_osf()\n"
        "rtc.enable_sqw_1hz()\n"
        "temp = rtc.temperature()\n"
        "rtc.set_time(1709251198)\n"
        "result = [osf, temp, bus.log]"
    )
    osf, temperature, log = got
    assert osf is True and temperature == 2525
    assert log == [
        ["rm", 0x68, 0x0F, 1],
        ["rm", 0x68, 0x0F, 1],
        ["wm", 0x68, 0x0F, [0x08]],  # OSF cleared, EN32kHz (bit 3) kept
        ["wm", 0x68, 0x0E, [0x00]],  # 1 Hz square wave on SQW
        ["rm", 0x68, 0x11, 2],
        ["wm", 0x68, 0x00, [0x58, 0x59, 0x23, 4, 0x29, 0x02, 0x24]],  # 2024-02-29 23:59:58
    ]
