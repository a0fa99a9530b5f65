"""The firmware's chip drivers (firmware/drivers/) on a virtual board, against the register-level
chip models: real MicroPython, the port's machine.SoftI2C/SPI, every transaction played on the
simulated bus. Values are compared with the models' conversions; faults are injected in the
models (NACK, corrupted CRC, open/shorted thermocouple, an unplugged chip, a floating MISO).

The board runs a small command loop over its serial console; each command runs one driver call
and prints its result (or the exception's class) as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware import protocol
from tests.fw_board import add_board, build_firmware
from tests.vboard_support import SerialClient
from vboard.board import Board
from vboard.fleet import Fleet
from vboard.spec import BoardSpec

DRIVER_LOOP = """
import json, time
from machine import Pin, SoftI2C, SPI
from drivers.ds3231 import DS3231
i2c = SoftI2C(scl=Pin(5), sda=Pin(4))
spi = SPI(1, baudrate=4000000, polarity=0, phase=0)
cs = Pin(15, Pin.OUT, value=1)
rtc = DS3231(i2c)
AMB = %(amb)r
TC = %(tc)r
if AMB == "SHT30":
    from drivers.sht3x import SHT3x
    amb = SHT3x(i2c)
else:
    from drivers.sht2x import SHT2x
    amb = SHT2x(i2c)
if TC == "MAX6675":
    from drivers.max6675 import MAX6675
    tc = MAX6675(spi, cs)
else:
    from drivers.max31855 import MAX31855
    tc = MAX31855(spi, cs)
edges = 0
def on_edge(pin):
    global edges
    edges += 1
sqw = Pin(2, Pin.IN, Pin.PULL_UP)
sqw.irq(trigger=Pin.IRQ_RISING, handler=on_edge)

def command(words):
    op = words[0]
    if op == "amb":
        return list(amb.measure())
    if op == "amb-early":  # read before the conversion can be done
        amb.start()
        return amb.poll()
    if op == "amb-phases":
        waits = [amb.start()]
        while waits[-1]:
            time.sleep_ms(waits[-1] + 1)
            waits.append(amb.poll())
        return {"waits": waits, "t": amb.temperature, "h": amb.humidity}
    if op == "tc":
        time.sleep_ms(250)
        value = tc.read()
        return [value, getattr(tc, "cold_junction", None)]
    if op == "rtc-set":
        rtc.set_time(int(words[1]))
        return rtc.time()
    if op == "rtc":
        return [rtc.time(), rtc.osf()]
    if op == "rtc-clear-osf":
        rtc.clear_osf()
        return rtc.osf()
    if op == "rtc-temp":
        return rtc.temperature()
    if op == "sqw":  # edges in 3 s after enabling the 1 Hz square wave
        rtc.enable_sqw_1hz()
        time.sleep_ms(1200)
        start = edges
        time.sleep_ms(3000)
        return edges - start
    raise ValueError(op)

print("READY")
while True:
    line = input().split()
    if line[0] == "q":
        break
    try:
        result = {"value": command(line)}
    except Exception as e:
        result = {"error": type(e).__name__}
    print("RESULT", json.dumps(result), "END")
"""


class Bench:
    """One board running DRIVER_LOOP, and its console."""

    def __init__(self, fleet: Fleet, board: Board) -> None:
        self.fleet = fleet
        self.board = board
        self.term = SerialClient(board.console.port)
        self.term.read_until(b"READY", timeout=60)

    def __call__(self, *words: object) -> dict[str, Any]:
        self.term.send(" ".join(str(w) for w in words).encode() + b"\r")
        out = self.term.read_until(b"END\r\n", timeout=60)
        start = out.rindex(b"RESULT ") + len(b"RESULT ")
        return json.loads(out[start : out.rindex(b"END")])  # type: ignore[no-any-return]

    def faults(self, role: str, **faults: Any) -> None:
        chip = self.board.chips[role]

        def apply() -> None:
            for key, value in faults.items():
                setattr(chip.faults, key, value)

        self.fleet.call(apply)

    def close(self) -> None:
        self.term.send(b"q\r")
        self.term.close()


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_firmware(tmp_path_factory.mktemp("firmware"))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    # slow enough that a driver can poll a conversion before its datasheet time is up
    with Fleet(tmp_path / "fleet", speed=1) as f:
        yield f


def bench(fleet: Fleet, build: Path, amb: str, tc: str, **spec: Any) -> Bench:
    name = f"{amb}-{tc}".lower()
    loop = {"main.py": (DRIVER_LOOP % {"amb": amb, "tc": tc}).encode(), "boot.py": None}
    spec_ = BoardSpec(name=name, ambient=amb, thermocouple=tc, heapsize="256K", **spec)
    board = add_board(fleet, spec_, build, None, files=loop)
    return Bench(fleet, board)


def newest(board: Board, role: str, quantity: str) -> float:
    return float([r.reported for r in board.chips[role].log.items if r.quantity == quantity][-1])


def hundredths(value: float) -> int:
    result = protocol.to_hundredths(value)
    assert result is not None
    return result


def test_sht30_and_max6675(fleet: Fleet, build: Path) -> None:
    b = bench(fleet, build, "SHT30", "MAX6675")
    try:
        t, h = b("amb")["value"]
        assert (t, h) == (
            hundredths(newest(b.board, "ambient", "aT")),
            hundredths(newest(b.board, "ambient", "aH")),
        )
        # no clock stretching: the chip NACKs a read until its 15 ms measurement is done
        assert b("amb-early") == {"error": "NotAnswering"}
        b.faults("ambient", crc_error_next=1)
        assert b("amb") == {"error": "CRCError"}
        assert "value" in b("amb")  # the next reply is good again
        b.faults("ambient", plugged=False)
        assert b("amb") == {"error": "NotAnswering"}
        b.faults("ambient", plugged=True)
        assert "value" in b("amb")

        kt, _ = b("tc")["value"]
        assert kt == hundredths(newest(b.board, "thermocouple", "kT"))
        b.faults("thermocouple", tc_open=True)
        assert b("tc") == {"error": "OpenCircuit"}
        b.faults("thermocouple", tc_open=False, tc_short_gnd=True)
        assert "value" in b("tc")  # a MAX6675 cannot see a short
        b.faults("thermocouple", tc_short_gnd=False, plugged=False)
        assert b("tc") == {"error": "NotAnswering"}  # MISO floats low: an all-zero frame
        b.faults("thermocouple", plugged=True)
        assert "value" in b("tc")
    finally:
        b.close()


def test_sht20_no_hold_and_max31855(fleet: Fleet, build: Path) -> None:
    b = bench(fleet, build, "SHT20", "MAX31855", miso_float=0xFF)
    try:
        phases = b("amb-phases")["value"]
        assert phases["waits"] == [85, 29, 0]  # temperature, then humidity, no-hold
        assert phases["t"] == hundredths(newest(b.board, "ambient", "aT"))
        assert phases["h"] == hundredths(newest(b.board, "ambient", "aH"))
        assert b("amb-early") == {"error": "NotAnswering"}  # NACKed until the 85 ms are up
        b.faults("ambient", crc_error_next=1)
        assert b("amb") == {"error": "CRCError"}
        b.faults("ambient", plugged=False)
        assert b("amb") == {"error": "NotAnswering"}
        b.faults("ambient", plugged=True)
        assert "value" in b("amb")

        now = fleet.clock.now()
        fleet.call(lambda: b.board.env.set_override("kT", -200.0, at=now))
        fleet.call(lambda: b.board.env.set_override("cold_junction", -12.3125, at=now))
        kt, cold = b("tc")["value"]
        assert kt == -20000 and cold == -1231  # -12.3125 degC, 0.0625 LSBs rounded to hundredths
        fleet.call(lambda: b.board.env.set_override("kT", 1234.5, at=fleet.clock.now()))
        assert b("tc")["value"][0] == 123450
        b.faults("thermocouple", tc_open=True)
        assert b("tc") == {"error": "OpenCircuit"}
        b.faults("thermocouple", tc_open=False, tc_short_gnd=True)
        assert b("tc") == {"error": "ShortCircuit"}
        b.faults("thermocouple", tc_short_gnd=False, tc_short_vcc=True)
        assert b("tc") == {"error": "ShortCircuit"}
        b.faults("thermocouple", tc_short_vcc=False, plugged=False)
        assert b("tc") == {"error": "NotAnswering"}  # MISO floats high on this board: all ones
        b.faults("thermocouple", plugged=True)
        assert b("tc")["value"][0] == 123450
    finally:
        b.close()


def test_ds3231_time_osf_square_wave_and_temperature(fleet: Fleet, build: Path) -> None:
    b = bench(fleet, build, "SHT30", "MAX6675", rtc_set=False)
    try:
        t, osf = b("rtc")["value"]
        assert osf is True and t < 1_000_000_000  # fresh: 2000-01-01, oscillator-stop flag set
        when = 2_000_000_000  # 2033-05-18
        assert abs(b("rtc-set", when)["value"] - when) <= 1
        assert b("rtc-clear-osf") == {"value": False}
        registers = b.board.rtc.registers(fleet.clock.now())
        assert not registers[0x0F] & 0x80
        assert b("sqw")["value"] in (3, 4)  # about one rising edge per second
        assert b.board.irq_lost == 0
        temp = b("rtc-temp")["value"]
        assert math.isclose(temp / 100, newest(b.board, "rtc", "die_temp"))
    finally:
        b.close()
