"""The virtual board's serial console against the real mpremote and a raw terminal."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vboard_support import SerialClient, mpremote
from vboard.board import Board
from vboard.fleet import Fleet
from vboard.spec import BoardSpec


@pytest.fixture
def bare_board(tmp_path: Path) -> Iterator[tuple[Fleet, Board]]:
    """A board with no chips: the console and filesystem are what is under test."""
    with Fleet(tmp_path / "fleet", speed=1) as fleet:
        board = fleet.add(BoardSpec(name="console", rtc=False, ambient=None, thermocouple=None))
        fleet.wait_repl(board)  # first boot done: tests change the flash only after it
        yield fleet, board


def test_mpremote_copies_a_tree_and_reads_back_identical_hashes(
    bare_board: tuple[Fleet, Board], tmp_path: Path
) -> None:
    _, board = bare_board
    src = tmp_path / "tree"
    (src / "lib" / "drivers").mkdir(parents=True)
    files = {
        "main.py": b"print('main')\n",
        "lib/util.py": b"X = 1\n" * 300,
        "lib/drivers/blob.bin": bytes(range(256)) * 20,
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    mpremote(board.url, "fs", "cp", "-r", f"{src}/.", ":")
    listing = mpremote(board.url, "fs", "ls", "lib/drivers")
    assert "5120 blob.bin" in listing
    for rel, data in files.items():
        out = mpremote(board.url, "fs", "sha256sum", f":{rel}")
        assert hashlib.sha256(data).hexdigest() in out, (rel, out)
        assert board.files().read_bytes(rel) == data  # the bytes are in the flash image


def test_first_boot_writes_the_ports_boot_py(bare_board: tuple[Fleet, Board]) -> None:
    _, board = bare_board
    assert "boot.py" in mpremote(board.url, "fs", "ls")
    assert "gc.collect()" in mpremote(board.url, "fs", "cat", "boot.py")


def test_soft_reset_runs_boot_then_main_and_ctrl_c_stops_main(bare_board: tuple[Fleet, Board]) -> None:
    fleet, board = bare_board
    board.files().write_bytes("boot.py", "print('boot.py ran')\n")
    board.files().write_bytes(
        "main.py", "import time\nprint('main.py ran')\nwhile True:\n    time.sleep_ms(100)\n"
    )
    term = SerialClient(board.console.port)
    try:
        fleet.run(board.reset())  # power up with these files, as after pressing RST
        out = term.read_until(b"main.py ran")
        assert out.index(b"boot.py ran") < out.index(b"main.py ran")
        term.send(b"\x03")  # main.py loops forever: Ctrl-C interrupts it
        out = term.read_until(b">>> ")
        assert b"KeyboardInterrupt" in out
        assert b"vb_" not in out  # the simulation's own frames do not show
        term.send(b"print(6*7)\r")
        assert b"42" in term.read_until(b">>> ")
        term.send(b"\x04")  # Ctrl-D in the friendly REPL: soft reboot, boot.py and main.py again
        out = term.read_until(b"main.py ran")
        assert b"MPY: soft reboot" in out
        assert out.index(b"boot.py ran") < out.index(b"main.py ran")
        term.send(b"\x03")
        assert b"KeyboardInterrupt" in term.read_until(b">>> ")
    finally:
        term.close()


def test_mpremote_soft_reset_runs_boot_but_not_main_as_on_the_board(bare_board: tuple[Fleet, Board]) -> None:
    _, board = bare_board
    board.files().write_bytes("boot.py", "BOOTED = True\n")
    board.files().write_bytes("main.py", "MAIN = True\n")
    # mpremote soft-resets from the raw REPL, where the port skips main.py
    out = mpremote(board.url, "exec", "print('BOOTED' in globals(), 'MAIN' in globals())")
    assert out.split() == ["True", "False"]


def test_hard_reset_keeps_flash_and_reports_the_cause(bare_board: tuple[Fleet, Board]) -> None:
    fleet, board = bare_board
    # (closed: on the chip a soft reset's finalisers would close it; vboard/README.md)
    mpremote(board.url, "exec", "with open('keep.txt', 'w') as f: f.write('kept')")
    mpremote(board.url, "reset")
    out = mpremote(board.url, "exec", "import machine; print(machine.reset_cause(), open('keep.txt').read())")
    assert out.split() == ["4", "kept"]  # machine.reset() is SOFT_RESET on the ESP8266
    fleet.run(board.reset())
    assert mpremote(board.url, "exec", "import machine; print(machine.reset_cause())").strip() == "6"


def test_errors_are_the_ports(bare_board: tuple[Fleet, Board]) -> None:
    _, board = bare_board
    script = (
        "import machine\n"
        "for bad in (6, 11, 17):\n"
        "    try:\n"
        "        machine.Pin(bad)\n"
        "    except ValueError as e:\n"
        "        print('ValueError', e)\n"
        "try:\n"
        "    machine.SPI(0)\n"
        "except ValueError:\n"
        "    print('SPI0 ValueError')\n"
        "try:\n"
        "    machine.freq(100000000)\n"
        "except ValueError:\n"
        "    print('freq ValueError')\n"
        "try:\n"
        "    machine.Pin(16).irq(lambda p: None)\n"
        "except OSError:\n"
        "    print('pin16 OSError')\n"
    )
    out = mpremote(board.url, "exec", script).splitlines()
    assert out == ["ValueError invalid pin"] * 3 + ["SPI0 ValueError", "freq ValueError", "pin16 OSError"]


def test_friendly_repl_line_editing_and_continuation(bare_board: tuple[Fleet, Board]) -> None:
    _, board = bare_board
    term = SerialClient(board.console.port)
    try:
        term.send(b"\r")
        term.read_until(b">>> ")
        term.send(b"prinx\x08t(7*6)\r")  # backspace erases the x
        assert b"\r\n42\r\n>>> " in term.read_until(b">>> ")
        term.send(b"for i in range(2):\r")
        term.read_until(b"... ")
        term.send(b"    print('n', i)\r")
        term.read_until(b"... ")
        term.send(b"\r")
        out = term.read_until(b">>> ")
        assert b"n 0\r\nn 1\r\n" in out
    finally:
        term.close()
