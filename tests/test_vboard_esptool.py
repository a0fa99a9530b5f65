"""The virtual board's serial bootloader (vboard/esprom.py) against the real esptool, mpremote
and MicroPython, plus protocol details checked frame by frame.

Firmware images are synthetic (nothing can be downloaded here): a valid ESP8266 ROM image
(0xE9 header, two segments, checksum) padded like the port's combined .bin, with a
MicroPython banner string in its irom part; esptool's own image-info confirms they are valid.
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from esptool.targets.esp8266 import ESP8266ROM  # type: ignore[import-untyped]

from tests.vboard_support import mpremote
from vboard import esprom
from vboard.board import HARD_RESET, Board
from vboard.fleet import Fleet
from vboard.spec import BoardSpec

ESPTOOL = str(Path(sys.executable).parent / "esptool")
NEW_VERSION, NEW_DATE = "1.99.0", "2030-01-02"
IMAGE_SIZE = 0x18000


def esptool(board: Board, *args: str, expect_ok: bool = True) -> str:
    result = subprocess.run(
        [ESPTOOL, "--chip", "esp8266", "--port", board.url, *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = result.stdout + result.stderr
    if expect_ok:
        assert result.returncode == 0, f"esptool {' '.join(args)} failed:\n{output[-3000:]}"
    else:
        assert result.returncode != 0, f"esptool {' '.join(args)} should have failed:\n{output[-3000:]}"
    return output


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def micropython_identity(board: Board) -> tuple[str, int]:
    out = mpremote(
        board.url, "exec", "import os, machine; print(os.uname().version); print(machine.reset_cause())"
    )
    version, cause = out.strip().splitlines()
    return version, int(cause)


def flash_bytes(board: Board, offset: int, length: int) -> bytes:
    with board.flash_image.open("rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path / "fleet", speed=1) as running:
        yield running


def bare_board(fleet: Fleet, name: str, flash_size: str = "4MB") -> Board:
    """A board without sensors: the console, flash and bootloader are what is under test."""
    return fleet.add(BoardSpec(name=name, rtc=False, ambient=None, thermocouple=None, flash_size=flash_size))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "micropython-new.bin"
    path.write_bytes(esprom.build_firmware_image(NEW_VERSION, NEW_DATE, size=IMAGE_SIZE))
    return path


# -- firmware images -------------------------------------------------------------------------------


def test_synthetic_firmware_is_a_valid_esp8266_image_that_the_boot_check_accepts(image: Path) -> None:
    info = subprocess.run([ESPTOOL, "image-info", str(image)], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "Segments: 2" in info.stdout
    assert re.search(r"Checksum: 0x[0-9a-f]{2} \(valid\)", info.stdout), info.stdout
    data = image.read_bytes()
    boot = esprom.inspect_boot_image(data)
    assert (boot.version, boot.date, boot.rom_output) == (NEW_VERSION, NEW_DATE, "")

    erased = esprom.inspect_boot_image(b"\xff" * 4096)
    assert not erased.micropython and "ets_main.c" in erased.rom_output
    corrupt = bytearray(data)
    corrupt[20] ^= 0x01  # a byte of the first segment: the ROM's checksum no longer matches
    bad = esprom.inspect_boot_image(bytes(corrupt))
    assert not bad.micropython and "csum err" in bad.rom_output and "load 0x40100000" in bad.rom_output
    other = esprom.build_firmware_image(NEW_VERSION, NEW_DATE, size=IMAGE_SIZE).replace(
        b"MicroPython v", b"NotPython v"
    )
    assert esprom.inspect_boot_image(other) == esprom.BootImage(None, None, "")  # valid, but not MicroPython


# -- esptool against boards ------------------------------------------------------------------------


def test_identity_commands_read_the_boards_efuses_and_flash_chip_rom_and_stub(fleet: Fleet) -> None:
    big = bare_board(fleet, "ident-4mb")
    small = bare_board(fleet, "ident-1mb", flash_size="1MB")
    mac = big.spec.mac

    out = esptool(big, "--no-stub", "chip-id")
    assert "Chip type:          ESP8266EX" in out
    assert "Crystal frequency:  26MHz" in out
    assert f"Chip ID: 0x00{mac[3:].hex()}" in out
    assert "Uploading stub" not in out

    out = esptool(big, "--baud", "460800", "read-mac")
    assert "Stub flasher running." in out
    assert f"MAC:                {mac.hex(':')}" in out

    out = esptool(big, "flash-id")
    assert "Manufacturer: e0" in out and "Device: 4016" in out and "Detected flash size: 4MB" in out
    out = esptool(small, "--no-stub", "flash-id")
    assert "Manufacturer: e0" in out and "Device: 4014" in out and "Detected flash size: 1MB" in out
    assert f"MAC:                {small.spec.mac.hex(':')}" in out

    # closing the port stands in for esptool's RTS pulse: MicroPython is back, hard reset
    assert micropython_identity(big) == (f"v{big.spec.mpy_version} on {big.spec.mpy_date}", HARD_RESET)


def test_erase_then_compressed_write_boots_the_flashed_micropython_with_a_fresh_filesystem(
    fleet: Fleet, image: Path
) -> None:
    board = bare_board(fleet, "flash-me")
    mpremote(board.url, "exec", "open('keep.txt', 'w').write('gone after erase')")
    assert board.files().exists("keep.txt")

    out = esptool(board, "erase-flash")
    assert "Flash memory erased successfully" in out
    assert flash_bytes(board, 0, board.spec.flash_bytes) == b"\xff" * board.spec.flash_bytes
    console = board.workdir / "console.log"
    wait_for("the ROM's complaint", lambda: b"ets_main.c" in console.read_bytes())
    assert board.loader is None and not board.status()["running"]  # nothing to boot: it stays down

    write = ["--baud", "460800", "write-flash", "--flash-size", "detect", "--flash-mode", "dio", "0"]
    out = esptool(board, *write, str(image))
    assert "compressed" in out and "Hash of data verified." in out
    data = image.read_bytes()
    # esptool patched the header: flash mode DIO (2) and the detected 4MB (0x40) with the frequency kept
    expected = data[:2] + bytes((0x02, 0x40 | data[3] & 0x0F)) + data[4:]
    assert flash_bytes(board, 0, len(data)) == expected
    assert flash_bytes(board, len(data), 0x10000) == b"\xff" * 0x10000

    assert micropython_identity(board) == (f"v{NEW_VERSION} on {NEW_DATE}", HARD_RESET)
    # first boot on the fresh filesystem: the port writes its boot.py, and mpremote works
    assert mpremote(board.url, "exec", "import os; print(os.listdir())").strip() == "['boot.py']"
    assert "gc.collect()" in mpremote(board.url, "fs", "cat", "boot.py")


def test_rom_writes_uncompressed_and_the_stub_verifies_and_reads_it_back(
    fleet: Fleet, image: Path, tmp_path: Path
) -> None:
    board = bare_board(fleet, "rom-write")
    mpremote(board.url, "exec", "with open('keep.txt', 'w') as f: f.write('kept')")
    data = image.read_bytes()
    other = esprom.build_firmware_image("0.0.1", "2000-01-01", size=IMAGE_SIZE)
    rom_at, stub_at = 0x40000, 0x80000  # between the firmware and the filesystem (0x100000)

    esptool(board, "write-flash", hex(rom_at), _write(tmp_path, "other.bin", other))
    # the ROM erases on FLASH_BEGIN (with its erase-size bug, which esptool works around)
    out = esptool(board, "--no-stub", "write-flash", hex(rom_at), str(image))
    assert f"Wrote {len(data)} bytes at 0x{rom_at:08x}" in out and "compressed" not in out
    assert flash_bytes(board, rom_at, len(data)) == data

    out = esptool(board, "write-flash", "--no-compress", hex(stub_at), str(image))
    assert f"Wrote {len(data)} bytes at 0x{stub_at:08x}" in out and "Hash of data verified." in out
    assert flash_bytes(board, stub_at, len(data)) == data

    out = esptool(board, "verify-flash", hex(rom_at), str(image), hex(stub_at), str(image))
    assert out.count("Verification successful (digest matched).") == 2
    out = esptool(board, "verify-flash", hex(rom_at), _write(tmp_path, "other.bin", other), expect_ok=False)
    assert "Verification failed" in out

    readback = tmp_path / "readback.bin"
    esptool(board, "read-flash", hex(rom_at), hex(len(data)), str(readback))
    assert readback.read_bytes() == data

    # offset 0 and the filesystem were left alone
    assert micropython_identity(board) == (f"v{board.spec.mpy_version} on {board.spec.mpy_date}", HARD_RESET)
    assert mpremote(board.url, "fs", "cat", "keep.txt").strip() == "kept"


def test_a_sync_split_across_reads_enters_the_loader_and_closing_the_port_resumes_micropython(
    fleet: Fleet,
) -> None:
    board = bare_board(fleet, "raw-sync")
    sync = _request(esprom.SYNC, esprom.SYNC_PAYLOAD)
    with socket.create_connection(("127.0.0.1", board.console.port), timeout=10) as sock:
        sock.sendall(sync[:20])
        time.sleep(0.1)
        sock.sendall(sync[20:])
        replies = _read_replies(sock, esprom.SYNC, 8)
        assert replies == [struct.pack("<BBHI", 1, esprom.SYNC, 2, 0x20120707) + b"\x00\x00"] * 8
        assert board.loader is not None
        wait_for("MicroPython to stop", lambda: not board.status()["running"])
        sock.sendall(_request(esprom.READ_REG, struct.pack("<I", esprom.CHIP_DETECT_MAGIC_REG)))
        (reply,) = _read_replies(sock, esprom.READ_REG, 1)
        assert struct.unpack_from("<I", reply, 4)[0] == esprom.ESP8266_MAGIC
    wait_for("the loader to end", lambda: board.loader is None)
    assert micropython_identity(board)[1] == HARD_RESET


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _read_replies(sock: socket.socket, op: int, count: int) -> list[bytes]:
    """`count` replies to `op`, skipping what came before them (the REPL echoed the first part
    of the SYNC before the chip reset: esptool skips such noise too)."""
    decoder, replies = esprom.SlipDecoder(), list[bytes]()
    while len(replies) < count:
        chunk = sock.recv(4096)
        assert chunk, "console closed"
        replies += [f for f in decoder.feed(chunk) if f[:2] == bytes((1, op))]
    return replies


# -- the protocol, frame by frame --------------------------------------------------------------------


def _request(op: int, payload: bytes, check: int = 0) -> bytes:
    return esprom.slip_encode(struct.pack("<BBHI", 0, op, len(payload), check) + payload)


def _data(op: int, data: bytes, seq: int = 0) -> bytes:
    return _request(op, struct.pack("<IIII", len(data), seq, 0, 0) + data, esprom.checksum(data))


class Session:
    """An EspRomLoader on a flash image file, fed whole requests; replies are collected."""

    def __init__(self, tmp_path: Path, size: int = 1 << 20, fill: bytes = b"\xff") -> None:
        self.image = tmp_path / "flash.bin"
        self.image.write_bytes(fill * size)
        self.erased: list[tuple[int, int]] = []
        self.flash = esprom.SpiFlash(self.image, size, on_erase=lambda o, n: self.erased.append((o, n)))
        self.out = bytearray()
        self.left = 0
        self.loader = esprom.EspRomLoader(
            bytes.fromhex("5ccf7fa1b2c3"), self.flash, self.out.extend, self._leave
        )
        self._decoder = esprom.SlipDecoder()

    def _leave(self) -> None:
        self.left += 1

    def send(self, request: bytes) -> list[bytes]:
        self.loader.feed(request)
        frames = self._decoder.feed(bytes(self.out))
        self.out.clear()
        return frames

    def status(self, request: bytes) -> tuple[int, int, bytes]:
        """(op, value, status bytes) of the single reply to `request`."""
        (reply,) = self.send(request)
        _, op, size, value = struct.unpack_from("<BBHI", reply)
        assert size == len(reply) - 8
        return op, value, reply[-2:]

    def start_stub(self) -> None:
        code = bytes(range(256)) * 8
        assert (
            self.status(_request(esprom.MEM_BEGIN, struct.pack("<IIII", len(code), 1, 0x1800, 0x4010E000)))[2]
            == b"\0\0"
        )
        assert self.status(_data(esprom.MEM_DATA, code))[2] == b"\0\0"
        replies = self.send(_request(esprom.MEM_END, struct.pack("<II", 0, 0x4010E004)))
        assert replies[-1] == b"OHAI" and self.loader.stub


def test_rom_replies_like_the_esp8266_rom_including_to_commands_it_lacks(tmp_path: Path) -> None:
    s = Session(tmp_path)
    replies = s.send(_request(esprom.SYNC, esprom.SYNC_PAYLOAD))
    assert replies == [struct.pack("<BBHI", 1, esprom.SYNC, 2, 0x20120707) + b"\0\0"] * 8
    op, value, status = s.status(_request(esprom.READ_REG, struct.pack("<I", esprom.CHIP_DETECT_MAGIC_REG)))
    assert (op, value, status) == (esprom.READ_REG, 0xFFF0C101, b"\0\0")
    # esptool asks every chip for its security info first and expects the ESP8266 ROM to refuse
    for op in (
        esprom.GET_SECURITY_INFO,
        esprom.SPI_FLASH_MD5,
        esprom.FLASH_DEFL_BEGIN,
        esprom.ERASE_FLASH,
        0x0E,
    ):
        assert s.status(_request(op, b"\0" * 16 if op == esprom.SPI_FLASH_MD5 else b""))[::2] == (
            op,
            b"\x01\x05",
        )
    assert s.status(_data(esprom.FLASH_DATA, b"\0" * 16))[2] == b"\x01\x06"  # no FLASH_BEGIN yet
    assert s.status(_request(esprom.FLASH_BEGIN, struct.pack("<IIIII", 0, 0, 0x400, 0, 0)))[2] == b"\x01\x05"
    assert s.status(_request(esprom.FLASH_BEGIN, struct.pack("<IIII", 0x1000, 1, 0x400, 0)))[2] == b"\0\0"
    bad = _data(esprom.FLASH_DATA, b"\x12" * 0x400)
    bad = bad[:5] + bytes((bad[5] ^ 0xFF,)) + bad[6:]  # corrupt the checksum field
    assert s.status(bad)[2] == b"\x01\x07"
    assert s.left == 0
    assert s.status(_request(esprom.FLASH_END, struct.pack("<I", 1)))[2] == b"\0\0"
    assert s.left == 1 and s.loader.finished  # the ROM ran the user code


@pytest.mark.parametrize(
    "offset,size", [(0, 0x1000), (0x3F000, 0x500), (0x8000, 0x30000), (0x10000, 0x10000), (0xF000, 0x2000)]
)
def test_rom_erase_bug_and_esptools_workaround_cancel_out(tmp_path: Path, offset: int, size: int) -> None:
    s = Session(tmp_path)
    rom = object.__new__(ESP8266ROM)  # only its get_erase_size arithmetic is used
    erase_size = rom.get_erase_size(offset, size)
    assert (
        s.status(_request(esprom.FLASH_BEGIN, struct.pack("<IIII", erase_size, 1, 0x400, offset)))[2]
        == b"\0\0"
    )
    ((start, length),) = s.erased
    needed_end = -(-(offset + size) // esprom.SECTOR) * esprom.SECTOR
    assert start == offset
    assert (
        needed_end <= start + length <= needed_end + esprom.SECTOR
    )  # at most the one sector the ROM overshoots


def test_stub_status_codes_deferred_errors_and_run_user_code(tmp_path: Path) -> None:
    s = Session(tmp_path, fill=b"\x00")
    s.start_stub()
    assert (
        s.send(_request(esprom.SYNC, esprom.SYNC_PAYLOAD)) == [struct.pack("<BBHI", 1, 8, 2, 0) + b"\0\0"] * 8
    )
    assert s.status(_request(esprom.GET_SECURITY_INFO, b""))[2] == b"\xff\x00"
    assert s.status(_request(0x55, b""))[2] == b"\xc3\x00"
    assert s.status(_request(esprom.ERASE_REGION, struct.pack("<II", 0x1000, 0x800)))[2] == b"\xc0\x00"

    # a compressed write: 0x1800 bytes at 0x2000; the stub erases only the sectors it writes
    payload = bytes(range(256)) * 24
    packed = zlib.compress(payload, 9)
    begin = struct.pack("<IIIII", len(payload), 1, 0x4000, 0x2000, 0)
    assert s.status(_request(esprom.FLASH_DEFL_BEGIN, begin))[2] == b"\0\0"
    assert s.erased == [(0x2000, 0x2000)]
    assert s.status(_data(esprom.FLASH_DEFL_DATA, packed))[2] == b"\0\0"
    assert s.status(_request(esprom.FLASH_DEFL_END, struct.pack("<I", 1)))[2] == b"\0\0"
    assert s.flash.read(0x2000, len(payload)) == payload
    assert s.flash.read(0x2000 + len(payload), 0x800) == b"\xff" * 0x800  # rest of the last sector erased
    assert s.flash.read(0x1000, 0x1000) == b"\0" * 0x1000  # the sector before untouched
    (reply,) = s.send(_request(esprom.SPI_FLASH_MD5, struct.pack("<IIII", 0x2000, len(payload), 0, 0)))
    assert reply[8:] == hashlib.md5(payload).digest() + b"\0\0"  # 16 raw bytes, then the status

    # garbage instead of deflate data: acknowledged, then reported on the next command
    assert s.status(_request(esprom.FLASH_DEFL_BEGIN, begin))[2] == b"\0\0"
    assert s.status(_data(esprom.FLASH_DEFL_DATA, b"not zlib at all"))[2] == b"\0\0"
    assert (
        s.status(_request(esprom.READ_REG, struct.pack("<I", esprom.CHIP_DETECT_MAGIC_REG)))[2] == b"\xc7\x00"
    )

    # NOR flash: writing without erasing can only clear bits
    s.flash.erase(0x2000, 4)
    s.flash.program(0x2000, b"\x0f\xf0\xff\x00")
    s.flash.program(0x2000, b"\xf0\xf0\x0f\xff")
    assert s.flash.read(0x2000, 4) == b"\x00\xf0\x0f\x00"

    assert s.send(_request(esprom.RUN_USER_CODE, b"")) == [] and s.left == 1


def test_stub_read_flash_streams_one_packet_per_acknowledgement_then_the_md5(tmp_path: Path) -> None:
    s = Session(tmp_path)
    s.flash.program(0x3000, bytes(range(256)) * 40)
    s.start_stub()
    length = 0x2800
    frames = s.send(_request(esprom.READ_FLASH, struct.pack("<IIII", 0x3000, length, 0x1000, 64)))
    assert len(frames) == 2 and frames[0][-2:] == b"\0\0" and len(frames[1]) == 0x1000
    received = frames[1]
    while True:
        frames = s.send(esprom.slip_encode(struct.pack("<I", len(received))))
        assert len(frames) == 1
        if len(received) == length:
            assert frames[0] == hashlib.md5(received).digest()
            break
        received += frames[0]
    assert received == s.flash.read(0x3000, length)
    assert s.status(_request(esprom.READ_REG, struct.pack("<I", esprom.UART_CLKDIV_REG)))[2] == b"\0\0"
