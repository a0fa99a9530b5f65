"""The virtual board's simulated ESP8266 hardware, driven by MicroPython programs that use
only the documented ESP8266 port API, checked against the chip models' ground truth."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fw_board import console_text
from tests.vboard_support import SerialClient, mpremote
from vboard import board as board_module
from vboard.board import Board, prepare_flash
from vboard.broker import Mosquitto
from vboard.fleet import Fleet
from vboard.net import NtpResponder
from vboard.spec import BoardSpec, LanSpec, board_workdir

SSID, PASSWORD = "lab-wifi", "lab-password-1"
RESULT = b"RESULT "


def run_program(fleet: Fleet, board: Board, source: str, timeout: float = 120) -> Any:
    """Install `source` as main.py, reset the board, and return the JSON it prints after RESULT."""
    fleet.wait_repl(board)  # the first boot is over: it cannot run this main.py too
    board.files().write_bytes("main.py", source)
    term = SerialClient(board.console.port)
    try:
        fleet.run(board.reset())
        out = term.read_until(b"END\r\n", timeout=timeout)
    finally:
        term.close()
    line = out[out.rindex(RESULT) + len(RESULT) : out.rindex(b"END")]
    return json.loads(line)


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """A fleet at the speed a test asks for with @pytest.mark.speed(N) (default 10x).

    At N x, every round trip to the host costs N x its real duration in simulated time, so
    tests that time sensor conversions to the millisecond run slowly; the long SQW test runs
    at 60x (a host hiccup of 4 edges' worth of real time would overflow the board's 4-deep
    scheduler queue: 67 ms at 60x, 33 ms at 120x on a shared machine)."""
    marker = request.node.get_closest_marker("speed")
    speed = marker.args[0] if marker else 10
    lan = LanSpec(access_points=[{"ssid": SSID, "password": PASSWORD}])
    with Fleet(tmp_path / "fleet", speed=speed, lan=lan) as fleet:
        yield fleet


SQW_HOUR = """
import json, time, socket, network
from machine import Pin, I2C, SPI

i2c = I2C(scl=Pin(5), sda=Pin(4))
found = i2c.scan()
i2c.writeto_mem(0x68, 0x00, bytes([0x00, 0x00, 0x12, 0x01, 0x24, 0x11, 0x26]))  # 2026-11-24 12:00:00
i2c.writeto_mem(0x68, 0x0E, b'\\x00')  # INTCN=0, RS=00: 1 Hz square wave
st = i2c.readfrom_mem(0x68, 0x0F, 1)[0]
i2c.writeto_mem(0x68, 0x0F, bytes([st & 0x7F]))  # clear OSF

wlan = network.WLAN(network.STA_IF)
wlan.active(True)
wlan.connect(%(ssid)r, %(password)r)
while not wlan.isconnected():
    time.sleep_ms(100)
addr = socket.getaddrinfo('127.0.0.1', %(port)d)[0][-1]
s = socket.socket()
s.settimeout(5)
s.connect(addr)
s.write(b'\\x10\\x0e\\x00\\x04MQTT\\x04\\x02\\x00\\x3c\\x00\\x02vb')  # MQTT CONNECT, client id "vb"
connack = s.read(4)
s.close()

def bcd(b):
    return (b >> 4) * 10 + (b & 15)

def rtc_seconds():
    r = i2c.readfrom_mem(0x68, 0x00, 3)
    return bcd(r[2]) * 3600 + bcd(r[1]) * 60 + bcd(r[0])

edges = 0
def on_edge(pin):
    global edges
    edges += 1

def settled():
    # Just after a rising edge (SQW high for the first half of the second, callbacks run):
    # the edge count and the DS3231 seconds are both stable for the next ~400 ms.
    while sqw.value() == 1:
        time.sleep_ms(20)
    while sqw.value() == 0:
        time.sleep_ms(20)
    time.sleep_ms(100)
    return rtc_seconds(), edges

sqw = Pin(2, Pin.IN, Pin.PULL_UP)
sqw.irq(trigger=Pin.IRQ_RISING, handler=on_edge)
first, edges0 = settled()
spi = SPI(1, baudrate=4000000, polarity=0, phase=0)
cs = Pin(15, Pin.OUT, value=1)
while rtc_seconds() - first < %(seconds)d:
    time.sleep_ms(250)
    cs(0); frame = spi.read(2); cs(1)
last, edges1 = settled()
edges = edges1 - edges0
print('RESULT', json.dumps({'found': found, 'connack': list(connack), 'edges': edges, 'first': first,
      'last': last, 'frame': list(frame)}), 'END')
"""


@pytest.mark.speed(60)
def test_one_irq_per_simulated_second_for_an_hour(lab: Fleet, mosquitto: Mosquitto) -> None:
    board = lab.add(BoardSpec(name="sqw", heapsize="auto"))
    hour = 3600
    source = SQW_HOUR % {"ssid": SSID, "password": PASSWORD, "port": mosquitto.port, "seconds": hour}
    result = run_program(lab, board, source, timeout=hour / lab.clock.speed + 60)
    assert result["found"] == [0x44, 0x68]
    assert result["connack"] == [0x20, 0x02, 0x00, 0x00]  # the real broker accepted the connection
    # one rising edge per DS3231 second, none lost, none extra: the counter and the clock agree
    assert result["last"] - result["first"] == result["edges"]
    assert result["edges"] >= hour
    assert board.irq_lost == 0
    assert board.heap_at_boot is not None


THERMOCOUPLE_AND_AMBIENT = """
import json, time
from machine import Pin, I2C, SPI

def crc8(data):
    crc = 0xFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc

i2c = I2C(scl=Pin(5), sda=Pin(4))
spi = SPI(1, baudrate=4000000, polarity=0, phase=0)
cs = Pin(15, Pin.OUT, value=1)
out = []
for i in range(5):
    time.sleep_ms(1000)
    i2c.writeto(0x44, b'\\x24\\x00')  # single shot, high repeatability, no clock stretching
    t0 = time.ticks_us()
    try:
        r = i2c.readfrom(0x44, 6)
        early = None
    except OSError as e:
        early = e.args[0]
    waited = time.ticks_diff(time.ticks_us(), t0)  # simulated us: every host round trip counts
    if early is not None:
        time.sleep_ms(16)
        r = i2c.readfrom(0x44, 6)
    ok = crc8(r[0:2]) == r[2] and crc8(r[3:5]) == r[5]
    t = -45 + 175 * ((r[0] << 8) | r[1]) / 65535
    h = 100 * ((r[3] << 8) | r[4]) / 65535
    cs(0); f = spi.read(2); cs(1)
    raw = (f[0] << 8) | f[1]
    out.append({'early': early, 'waited': waited, 'crc_ok': ok, 'aT': t, 'aH': h,
                'kT': (raw >> 3) * 0.25, 'open': bool(raw & 4)})
print('RESULT', json.dumps(out), 'END')
"""


def test_sensor_values_through_i2c_and_spi_equal_ground_truth(lab: Fleet) -> None:
    board = lab.add(BoardSpec(name="sensors"))
    readings = run_program(lab, board, THERMOCOUPLE_AND_AMBIENT)
    assert isinstance(readings, list) and len(readings) == 5
    ambient = [r for r in board.chips["ambient"].log.items if r.quantity in ("aT", "aH")]
    thermo = [r for r in board.chips["thermocouple"].log.items if r.quantity == "kT"]
    truth_t = [r.reported for r in ambient if r.quantity == "aT"][-5:]
    truth_h = [r.reported for r in ambient if r.quantity == "aH"][-5:]
    for got, t, h in zip(readings, truth_t, truth_h, strict=True):
        if got["waited"] < 15_000:  # asked before the 15 ms measurement was done: NACK -> ENODEV
            assert got["early"] == 19
        assert got["crc_ok"]
        assert math.isclose(got["aT"], t, abs_tol=1e-9)
        assert math.isclose(got["aH"], h, abs_tol=1e-9)
        assert not got["open"]
    reported_kt = {r.reported for r in thermo}
    assert all(got["kT"] in reported_kt for got in readings)


FAULTS = """
import json, time
from machine import Pin, I2C, SPI
i2c = I2C(scl=Pin(5), sda=Pin(4))
spi = SPI(1, baudrate=4000000)
cs = Pin(15, Pin.OUT, value=1)
def sht():
    try:
        i2c.writeto(0x44, b'\\x24\\x00')
        time.sleep_ms(20)
        return list(i2c.readfrom(0x44, 6))
    except OSError as e:
        return 'OSError %d' % e.args[0]
def tc():
    time.sleep_ms(300)
    cs(0); f = spi.read(2); cs(1)
    return list(f)
print('READY')
while True:
    cmd = input()
    if cmd == 'q':
        break
    print('RESULT', json.dumps({'sht': sht(), 'tc': tc()}), 'END')
"""


def test_fault_injection_is_seen_as_on_hardware(lab: Fleet) -> None:
    board = lab.add(BoardSpec(name="faults"))
    lab.wait_repl(board)
    board.files().write_bytes("main.py", FAULTS)
    term = SerialClient(board.console.port)

    def measure() -> dict[str, object]:
        term.send(b"go\r")
        out = term.read_until(b"END\r\n")
        return json.loads(out[out.rindex(RESULT) + len(RESULT) : out.rindex(b"END")])  # type: ignore[no-any-return]

    try:
        lab.run(board.reset())
        term.read_until(b"READY")
        healthy = measure()
        assert isinstance(healthy["sht"], list) and len(healthy["sht"]) == 6
        lab.call(lambda: setattr(board.chips["ambient"].faults, "plugged", False))
        lab.call(lambda: setattr(board.chips["thermocouple"].faults, "plugged", False))
        unplugged = measure()
        assert unplugged["sht"] == "OSError 19"  # ENODEV: nobody acknowledges the address
        assert unplugged["tc"] == [0, 0]  # MISO floats (this board: low)
        lab.call(lambda: setattr(board.chips["ambient"].faults, "plugged", True))
        lab.call(lambda: setattr(board.chips["thermocouple"].faults, "plugged", True))
        lab.call(lambda: setattr(board.chips["ambient"].faults, "crc_error_next", 1))
        lab.call(lambda: setattr(board.chips["thermocouple"].faults, "tc_open", True))
        faulty = measure()
        reply = faulty["sht"]
        assert isinstance(reply, list) and len(reply) == 6
        tc = faulty["tc"]
        assert isinstance(tc, list) and tc[1] & 0x04  # MAX6675 D2: open thermocouple
    finally:
        term.send(b"q\r")
        term.close()


WIFI = """
import json, time, network, socket
wlan = network.WLAN(network.STA_IF)
wlan.active(True)
t0 = time.ticks_ms()
wlan.connect(%(ssid)r, %(password)r)
while not wlan.isconnected():
    time.sleep_ms(50)
took = time.ticks_diff(time.ticks_ms(), t0)
s = socket.socket()
s.connect(socket.getaddrinfo('127.0.0.1', %(port)d)[0][-1])
s.settimeout(60)
print('CONNECTED', took, wlan.ifconfig()[0], wlan.status('rssi'))
try:
    while True:
        s.write(b'\\xc0\\x00')  # PINGREQ
        s.read(2)
        time.sleep_ms(500)
except OSError as e:
    err = e.args[0]
try:
    socket.getaddrinfo('127.0.0.1', 1883)
    dns = 'ok'
except OSError as e:
    dns = e.args[0]
try:
    socket.socket().connect(('127.0.0.1', %(port)d))
    again = 'ok'
except OSError as e:
    again = e.args[0]
print('RESULT', json.dumps({'err': err, 'dns': dns, 'again': again, 'status': wlan.status()}), 'END')
while not wlan.isconnected():
    time.sleep_ms(100)
print('BACK', wlan.status())
"""


def test_wifi_drop_makes_live_and_new_sockets_fail(lab: Fleet, mosquitto: Mosquitto) -> None:
    board = lab.add(BoardSpec(name="wifi"))
    lab.wait_repl(board)
    board.files().write_bytes("main.py", WIFI % {"ssid": SSID, "password": PASSWORD, "port": mosquitto.port})
    term = SerialClient(board.console.port)
    try:
        lab.run(board.reset())
        out = term.read_until(b"CONNECTED")
        ap = lab.lan.access_points[SSID]
        lab.call(lambda: setattr(ap, "up", False))
        lab.call(board.station.advance)  # the station notices at once (beacons stop)
        out = term.read_until(b"END\r\n", timeout=60)
        result = json.loads(out[out.rindex(RESULT) + len(RESULT) : out.rindex(b"END")])
        assert result["err"] == 104  # the stalled connection was aborted: ECONNRESET
        assert result["dns"] == -2  # no DNS without a link
        assert result["again"] == 113  # EHOSTUNREACH
        assert result["status"] in (1, 3)  # CONNECTING / NO_AP_FOUND: the SDK keeps trying
        lab.call(lambda: setattr(ap, "up", True))
        assert b"BACK 5" in term.read_until(b"BACK 5", timeout=30)
    finally:
        term.close()


def test_mpremote_sees_the_boards_identity(lab: Fleet) -> None:
    board = lab.add(BoardSpec(name="ident"))
    out = mpremote(
        board.url,
        "exec",
        "import os, machine, network, esp\n"
        "print(os.uname().sysname, os.uname().release != '', esp.flash_size(), machine.freq())\n"
        "print(network.WLAN(network.STA_IF).config('mac').hex(), machine.unique_id().hex())",
    ).split()
    assert out[:4] == ["esp8266", "True", str(4 << 20), "80000000"]
    assert out[4] == board.spec.mac.hex()
    assert out[5] == board.spec.chip_id.hex()
    # "auto" heap: the firmware finds about an ESP8266's free heap (scaled to 64-bit) at boot
    assert board.heap_at_boot is not None
    assert 56 * 1024 <= board.heap_at_boot[1] <= 72 * 1024


NTP_AND_RTC = """
import json, time, network, ntptime, machine
wlan = network.WLAN(network.STA_IF)
wlan.active(True)
wlan.connect(%(ssid)r, %(password)r)
while not wlan.isconnected():
    time.sleep_ms(50)
before = time.time()
ntptime.host = 'pool.ntp.org'
ntptime.settime()
after = time.time()
rtc = machine.RTC()
rtc.memory(b'kept across resets')
print('RESULT', json.dumps({'before': before, 'after': after, 'datetime': rtc.datetime()}), 'END')
"""


def test_ntptime_sets_the_rtc_from_simulated_time(lab: Fleet) -> None:
    board = lab.add(BoardSpec(name="ntp"))
    result = run_program(lab, board, NTP_AND_RTC % {"ssid": SSID, "password": PASSWORD})
    assert result["before"] < 3600  # the ESP8266's RTC starts at 2000-01-01 on power-up
    sim_now_2000 = lab.clock.now() - 946_684_800
    assert abs(result["after"] - sim_now_2000) < 30  # simulated seconds of test overhead at 10x
    assert result["datetime"][0] >= 2026
    lab.call(lambda: setattr(lab.lan, "ntp_up", False))
    out = mpremote(
        board.url, "exec", "import ntptime\ntry:\n ntptime.settime()\nexcept OSError as e:\n print(e.args[0])"
    )
    assert out.strip() == "110"  # ETIMEDOUT: nobody answers on UDP 123
    out = mpremote(
        board.url, "exec", "import machine, time; print(machine.RTC().memory(), time.time() > 10**8)"
    )
    assert out.strip() == "b'kept across resets' True"  # RTC memory and time survive a soft reset


def test_an_ntp_answer_is_in_the_boards_time_when_the_host_reads_it_late(
    lab: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The board's clock stands still while it awaits the answer: the host reading the request
    late (a busy host: here 0.3 s real, 3 s simulated at 10x) must not show in what NTP says."""
    board = lab.add(BoardSpec(name="ntp-late"))
    run_program(lab, board, NTP_AND_RTC % {"ssid": SSID, "password": PASSWORD})  # the RTC set
    answer = NtpResponder.datagram_received

    def read_late(self: NtpResponder, data: bytes, addr: tuple[str | object, int]) -> None:
        time.sleep(0.3)  # blocks the host's loop, as a busy host would
        answer(self, data, addr)

    monkeypatch.setattr(NtpResponder, "datagram_received", read_late)
    out = mpremote(board.url, "exec", "import ntptime, time\nprint(ntptime.time() - time.time())")
    assert abs(int(out.strip())) <= 1  # whole seconds; reading the host's time would say 3


def test_the_host_times_answers_with_the_roms_lan_round_trip() -> None:
    source = (Path(board_module.__file__).parent / "rom" / "vb_hal.py").read_text()
    found = re.search(r"^LAN_ROUND_TRIP_US = (\d+)$", source, re.M)
    assert found is not None and int(found.group(1)) == round(board_module.LAN_ROUND_TRIP_S * 1_000_000)


def test_watchdog_resets_a_stuck_board_and_deepsleep_wakes_it(lab: Fleet) -> None:
    board = lab.add(BoardSpec(name="wdt"))
    lab.wait_repl(board)
    board.files().write_bytes(
        "main.py",
        "import machine, time\n"
        "if machine.reset_cause() == machine.WDT_RESET:\n"
        "    print('WDT RESET SEEN')\n"
        "    machine.deepsleep(5000)\n"
        "elif machine.reset_cause() == machine.DEEPSLEEP_RESET:\n"
        "    print('WOKE FROM DEEPSLEEP')\n"
        "else:\n"
        "    wdt = machine.WDT()\n"
        "    wdt.feed()\n"
        "    print('STUCK')\n"
        "    while True:\n"
        "        time.sleep_ms(100)  # never feeds again\n",
    )
    term = SerialClient(board.console.port)
    try:
        lab.run(board.reset())
        term.read_until(b"STUCK")
        term.read_until(b"WDT RESET SEEN", timeout=60)
        term.read_until(b"WOKE FROM DEEPSLEEP", timeout=60)
    finally:
        term.close()


def test_watchdog_keeps_counting_after_ctrl_c_and_a_soft_reset(lab: Fleet) -> None:
    """As on the ESP8266: nothing stops a started watchdog but a hard reset."""
    board = lab.add(BoardSpec(name="wdt2"))
    lab.wait_repl(board)
    board.files().write_bytes(
        "main.py",
        "import machine, time\n"
        "print('CAUSE', machine.reset_cause())\n"
        "try:\n"
        "    machine.WDT(timeout=1000)\n"
        "except ValueError:\n"
        "    print('FIXED TIMEOUT')\n"
        "wdt = machine.WDT()\n"
        "print('STARTED')\n"
        "while True:\n"
        "    wdt.feed()\n"
        "    time.sleep_ms(100)\n",
    )
    term = SerialClient(board.console.port)
    try:
        lab.run(board.reset())
        assert b"FIXED TIMEOUT" in term.read_until(b"STARTED")  # (a Ctrl-C before is no test)
        term.send(b"\x03")  # the app stops feeding
        term.read_until(b">>> ")
        term.send(b"\x01\x04")  # raw REPL, soft reset (as mpremote does): the watchdog counts on
        term.read_until(b"soft reboot")
        assert b"CAUSE 1" in term.read_until(b"CAUSE 1", timeout=30)  # WDT_RESET
    finally:
        term.close()


# main.py measuring the largest block it can allocate: on a board the ROM is not in the heap, so
# what the firmware finds free at boot is in one piece (but for what boot.py left)
LARGEST_BLOCK_MAIN = """import gc
gc.collect()
free = gc.mem_free()
lo, hi = 0, free
while hi - lo > 32:
    mid = (lo + hi) // 2
    try:
        block = bytearray(mid)
        block = None
        lo = mid
    except MemoryError:
        hi = mid
print("FREE %d LARGEST %d" % (free, lo))
"""


def test_the_free_heap_at_boot_is_in_one_piece_as_on_a_board(lab: Fleet) -> None:
    spec = BoardSpec(name="onepiece")
    prepare_flash(board_workdir(lab.workdir, spec.name) / "flash.bin", spec, {"main.py": LARGEST_BLOCK_MAIN})
    board = lab.add(spec)
    lab.wait_repl(board)
    free, largest = map(int, re.findall(r"FREE (\d+) LARGEST (\d+)", console_text(board))[0])
    assert board.heap_holes_at_boot is not None and 0 <= board.heap_holes_at_boot < 8 * 1024
    # The ROM's boot collects often and fills the holes left between its objects
    # (vb_rom.fill_heap_holes); without that, the largest block was ~60% of the free heap
    # (the ROM's one- and two-block holes), now the only gap is what boot.py's compilation left.
    assert largest >= free * 85 // 100, (free, largest)
