"""The ESP8266's serial bootloader as esptool sees it: the mask-ROM loader, and the flasher stub
esptool uploads into it, answering on a virtual board's console.

Getting in
----------
A real ESP8266 enters the ROM loader when it leaves reset with GPIO0 low; esptool drives RST and
GPIO0 through the USB adapter's DTR/RTS lines. Over ``socket://`` there are no such lines
(esptool says so and skips its reset), so the board stands in for the wiring: the first esptool
SYNC frame in the console input (SLIP 0xC0, direction 0x00, command 0x08, the 36-byte
``07 07 12 20 55...`` payload; bytes that a terminal, mpremote or the firmware never send) is
taken as "reset into the bootloader". The board stops its MicroPython process and keeps it down
(the simulated chips run on), console input goes to `EspRomLoader`, whose replies go to the
client (and to console.log). The loader answers that SYNC at once, so esptool connects on its
first attempt.

Getting out
-----------
The board hard-resets into the flash (reset_cause HARD_RESET = 6) when
 - esptool runs the user code: FLASH_END to the ROM loader (esptool sends it only as "run user
   code", e.g. ``esptool run`` or ``--after soft-reset`` with ``--no-stub``; a ROM "reboot" flag
   also boots the flash, since nothing holds GPIO0 low), or RUN_USER_CODE to the stub
   (``--after soft-reset``);
 - the console client disconnects: esptool's default ``--after hard-reset`` pulses RTS, a no-op
   on a socket, and closes the port; the closing stands in for that pulse; or
 - the harness resets or powers off the board.
The stub's FLASH_END / FLASH_DEFL_END only close the write (as esptool's current stub does),
so ``--after no-reset`` stays in the loader until the client goes.

Booting from flash
------------------
At reset the ROM reads the image at flash offset 0 (`inspect_boot_image`): without the 0xE9
magic (an erased chip) it prints its boot line and ``ets_main.c`` and stays there; with a bad
segment checksum it prints the load lines and ``csum err``; a valid image boots, and when it
contains a MicroPython banner string (``MicroPython v1.27.0 on 2025-12-09``) the board runs
MicroPython reporting that release (os.uname(), the REPL banner). A valid image without one
is some other firmware: the board stays silent. A new board's flash holds a synthetic
MicroPython image of its spec's release and variant (`factory_flash`). The variant is read from
the build name the port keeps for ``sys.implementation._build`` (``ESP8266_GENERIC-FLASH_2M_ROMFS``):
that variant maps a ROMFS partition (`romfs_partition`) into the address space, which the
board's ROM mounts at ``/rom``. ``erase_flash`` (and any erase that
touches the filesystem's sectors) also loses the board's filesystem, which on a real board
lives in that flash; MicroPython's next boot recreates boot.py as the port does.

What is modelled
----------------
Everything esptool v5 (and its stub, esp-flasher-stub) relies on for an ESP8266: SLIP framing;
ROM responses with a 2-byte ``01 <code>`` status and the ROM's stale value field, stub
responses with a big-endian 16-bit code (0xC000...) and value 0; SYNC answered eight times
(value 0x20120707 from the ROM, 0 from the stub); READ_REG / WRITE_REG over a register file
with the chip-detect magic, the efuses holding the board's MAC (so ``read_mac`` and
``chip_id`` print the board's), the UART clock divider (26 MHz crystal), and the SPI
controller's user-command registers driving a SPI NOR model (RDID with a JEDEC id matching
the flash size, status registers, SFDP, reset, read); MEM_BEGIN/DATA/END uploading the stub
(any RAM image run with MEM_END is taken to be esptool's flasher stub, which greets "OHAI");
FLASH_BEGIN/DATA/END with the ROM's up-front erase, including its erase-size bug that esptool
works around; and, in the stub only, FLASH_DEFL_* (zlib), SPI_FLASH_MD5, ERASE_FLASH,
ERASE_REGION, READ_FLASH (one packet in flight, acknowledged by the host, then the MD5),
CHANGE_BAUDRATE, SPI_ATTACH, SPI_SET_PARAMS. Commands the ESP8266 ROM lacks get its
"invalid message" reply (``01 05``), e.g. GET_SECURITY_INFO, which esptool sends and expects
to fail; the stub answers commands it lacks with 0xC300 (0xFF00 for GET_SECURITY_INFO). Writes
are NOR writes: they only clear bits. Baud rates are accepted and meaningless over TCP. Not
modelled: timing (erases are instant), the ROM's 74880-baud boot garbage on the wire.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("vboard.esprom")

SECTOR = 0x1000
SECTORS_PER_BLOCK = 16

# command opcodes (esptool loader.ESPLoader.ESP_CMDS)
FLASH_BEGIN = 0x02
FLASH_DATA = 0x03
FLASH_END = 0x04
MEM_BEGIN = 0x05
MEM_END = 0x06
MEM_DATA = 0x07
SYNC = 0x08
WRITE_REG = 0x09
READ_REG = 0x0A
SPI_SET_PARAMS = 0x0B
SPI_ATTACH = 0x0D
CHANGE_BAUDRATE = 0x0F
FLASH_DEFL_BEGIN = 0x10
FLASH_DEFL_DATA = 0x11
FLASH_DEFL_END = 0x12
SPI_FLASH_MD5 = 0x13
GET_SECURITY_INFO = 0x14
ERASE_FLASH = 0xD0
ERASE_REGION = 0xD1
READ_FLASH = 0xD2
RUN_USER_CODE = 0xD3

SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
# a SYNC request frame as it appears on the wire (the checksum field may in principle be escaped)
SYNC_REQUEST = re.compile(
    rb"\xc0\x00\x08\x24\x00(?:[^\xc0\xdb]|\xdb[\xdc\xdd]){4}" + re.escape(SYNC_PAYLOAD), re.DOTALL
)
STUB_GREETING = b"OHAI"
DATA_HEADER = 16  # size, seq, 0, 0 before the data of *_DATA commands
CHECKSUM_SEED = 0xEF

# registers
CHIP_DETECT_MAGIC_REG = 0x40001000
ESP8266_MAGIC = 0xFFF0C101
EFUSE_DATA0 = 0x3FF00050  # four words; MAC bytes live in words 0, 1 and 3
UART_CLKDIV_REG = 0x60000014
APB_HZ = 52_000_000  # the ESP8266's 26 MHz crystal, doubled
ROM_BAUD = 115200  # what esptool syncs at: the divider the ROM's auto-baud finds
SPI_BASE = 0x60000200
SPI_CMD = SPI_BASE + 0x00
SPI_ADDR = SPI_BASE + 0x04
SPI_USER = SPI_BASE + 0x1C
SPI_USER1 = SPI_BASE + 0x20
SPI_USER2 = SPI_BASE + 0x24
SPI_W0 = SPI_BASE + 0x40
SPI_CMD_USR = 1 << 18
SPI_USR_ADDR = 1 << 30
SPI_USR_MISO = 1 << 28
SPI_USR_MOSI = 1 << 27
RAM_REGIONS = ((0x3FFE8000, 0x40000000), (0x40100000, 0x40108000))

# status codes: the ROM answers 01 <code>, the stub a big-endian 16-bit code
ROM_INVALID_MESSAGE = 0x05
ROM_FAILED = 0x06
ROM_BAD_CHECKSUM = 0x07
STUB_BAD_DATA_LEN = 0xC000
STUB_BAD_CHECKSUM = 0xC100
STUB_INVALID_COMMAND = 0xC300
STUB_FAILED_SPI_OP = 0xC400
STUB_NOT_IN_FLASH_MODE = 0xC600
STUB_INFLATE_ERROR = 0xC700
STUB_TOO_MUCH_DATA = 0xC900
STUB_NOT_IMPLEMENTED = 0xFF00
STUB_MAX_READ_PACKET = 4096

# SPI NOR commands the flash model answers
RDID, RDSR, RDSR2, RDSR3 = 0x9F, 0x05, 0x35, 0x15
WREN, WRDI, WEVSR, WRSR, WRSR2 = 0x06, 0x04, 0x50, 0x01, 0x31
READ, FAST_READ, RDSFDP = 0x03, 0x0B, 0x5A
STATUS_WEL = 0x02
BERGMICRO = 0xE0  # the BG25Q flash of common ESP-12 modules (0x1640E0 for 4 MB)

BOOT_LINE = " ets Jan  8 2013,rst cause:2, boot mode:(3,6)\r\n\r\n"
MICROPYTHON_BANNER = re.compile(rb"MicroPython v(\d+\.\d+\.\d+(?:-[0-9A-Za-z.+-]+)?) on (\d{4}-\d{2}-\d{2})")
FIRMWARE_SCAN_BYTES = 1 << 20  # MicroPython's ESP8266 firmware lives in the first MB
# MICROPY_BOARD_BUILD_NAME, compiled into the firmware for sys.implementation._build
BUILD_NAME = re.compile(rb"ESP8266_GENERIC(?:-([A-Z0-9_]+))?\x00")
ROMFS_VARIANT = "FLASH_2M_ROMFS"
# esp8266_2MiB_ROMFS.ld: FLASH_ROMFS org 0x402b0000 (flash mapped at 0x40200000), len 320K
ROMFS_OFFSET = 0xB0000
ROMFS_SIZE = 320 * 1024
IROM_OFFSET = 0x9000  # where the ESP8266 port's irom0 text starts in its combined image


class LoaderError(Exception):
    """A failed command: the status the ROM and the stub report for it."""

    def __init__(self, rom: int, stub: int) -> None:
        super().__init__(f"rom {rom:#04x} / stub {stub:#06x}")
        self.rom = rom
        self.stub = stub


BAD_LENGTH = (ROM_INVALID_MESSAGE, STUB_BAD_DATA_LEN)
BAD_CHECKSUM = (ROM_BAD_CHECKSUM, STUB_BAD_CHECKSUM)
NOT_IN_FLASH_MODE = (ROM_FAILED, STUB_NOT_IN_FLASH_MODE)
SPI_FAILED = (ROM_FAILED, STUB_FAILED_SPI_OP)


def fail(codes: tuple[int, int]) -> LoaderError:
    return LoaderError(*codes)


# -- SLIP ------------------------------------------------------------------------------------


def slip_encode(payload: bytes) -> bytes:
    return b"\xc0" + payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


class SlipDecoder:
    """Frames from a byte stream; bytes outside frames are line noise and dropped."""

    def __init__(self) -> None:
        self._frame: bytearray | None = None
        self._escape = False

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        for b in data:
            if b == 0xC0:
                if self._frame:
                    frames.append(bytes(self._frame))
                self._frame = bytearray()
                self._escape = False
            elif self._frame is None:
                continue
            elif self._escape:
                self._escape = False
                self._frame.append({0xDC: 0xC0, 0xDD: 0xDB}.get(b, b))
            elif b == 0xDB:
                self._escape = True
            else:
                self._frame.append(b)
        return frames


def checksum(data: bytes) -> int:
    state = CHECKSUM_SEED
    for b in data:
        state ^= b
    return state


# -- the flash chip ----------------------------------------------------------------------------


def jedec_id(flash_bytes: int) -> int:
    """RDID as esptool reads it from W0: manufacturer, memory type, capacity (log2 of bytes)."""
    return BERGMICRO | 0x40 << 8 | (flash_bytes.bit_length() - 1) << 16


def filesystem_start(flash_bytes: int) -> int:
    """Where the ESP8266 port's filesystem begins in flash (esp.flash_user_start()): after the
    firmware (ports/esp8266/modesp.c, _firmware_size), and on 2 MB+ boards after the ROMFS
    partition too (boards/esp8266_2MiB_ROMFS.ld: irom0 at 0x40209000, 1M - 36K - 320K long,
    then the 320K ROMFS partition: 0x9000 + 668K + 320K = 0x100000)."""
    return 0x9A000 if flash_bytes <= 1 << 20 else 0x100000


def _sfdp_table(flash_bytes: int) -> bytes:
    # header "SFDP" rev 1.0 with one parameter header: JEDEC basic table, 9 dwords at 0x30
    table = bytearray(b"\xff" * 0x54)
    table[0:8] = b"SFDP\x00\x01\x00\xff"
    table[8:16] = bytes((0x00, 0x00, 0x01, 9, 0x30, 0x00, 0x00, 0xFF))
    table[0x30:0x34] = struct.pack("<I", 0xFFF920E5)  # 4 KB erase with 0x20, 3-byte addresses
    table[0x34:0x38] = struct.pack("<I", flash_bytes * 8 - 1)  # density in bits - 1
    return bytes(table)


class SpiFlash:
    """The board's SPI NOR flash: its image file, JEDEC id, status register and SFDP table.

    `on_erase(offset, length)` hears of every erase (the board's filesystem lives in flash)."""

    def __init__(self, image: Path, size: int, on_erase: Callable[[int, int], None] | None = None) -> None:
        self.image = image
        self.size = size
        self.on_erase = on_erase
        self.jedec_id = jedec_id(size)
        self.status = 0
        self._volatile_status_write = False
        self._sfdp = _sfdp_table(size)

    def contains(self, offset: int, length: int) -> bool:
        return offset >= 0 and length >= 0 and offset + length <= self.size

    def read(self, offset: int, length: int) -> bytes:
        if not self.contains(offset, length):
            raise fail(SPI_FAILED)
        with self.image.open("rb") as f:
            f.seek(offset)
            return f.read(length).ljust(length, b"\xff")

    def program(self, offset: int, data: bytes) -> None:
        """A NOR write: bits only go from 1 to 0; erasing is what brings them back."""
        if not self.contains(offset, len(data)):
            raise fail(SPI_FAILED)
        if not data:
            return
        old = self.read(offset, len(data))
        merged = int.from_bytes(old, "big") & int.from_bytes(data, "big")
        with self.image.open("r+b") as f:
            f.seek(offset)
            f.write(merged.to_bytes(len(data), "big"))

    def erase(self, offset: int, length: int) -> None:
        """Erase the sectors covering [offset, offset + length)."""
        start = offset - offset % SECTOR
        end = -(-(offset + length) // SECTOR) * SECTOR
        if not self.contains(start, end - start):
            raise fail(SPI_FAILED)
        if end <= start:
            return
        with self.image.open("r+b") as f:
            f.seek(start)
            f.write(b"\xff" * (end - start))
        if self.on_erase is not None:
            self.on_erase(start, end - start)

    def erase_chip(self) -> None:
        self.erase(0, self.size)

    def md5(self, offset: int, length: int) -> bytes:
        return hashlib.md5(self.read(offset, length)).digest()

    def user_command(self, command: int, address: int | None, mosi: bytes, miso_bytes: int) -> bytes:
        """One SPI transaction: what the chip shifts out on MISO (0xFF where it drives nothing)."""
        out = b""
        if command == RDID:
            out = self.jedec_id.to_bytes(3, "little")
        elif command == RDSR:
            out = bytes((self.status & 0xFF,))
        elif command == RDSR2:
            out = bytes((self.status >> 8 & 0xFF,))
        elif command == RDSR3:
            out = b"\x00"
        elif command == WREN:
            self.status |= STATUS_WEL
        elif command == WEVSR:
            self._volatile_status_write = True
        elif command == WRDI:
            self.status &= ~STATUS_WEL
            self._volatile_status_write = False
        elif command in (WRSR, WRSR2) and mosi:
            if self.status & STATUS_WEL or self._volatile_status_write:
                value = int.from_bytes(mosi[:2], "little") if command == WRSR else mosi[0] << 8
                mask = (0xFFFF if len(mosi) > 1 else 0xFF) if command == WRSR else 0xFF00
                self.status = (self.status & ~mask | value & mask) & ~STATUS_WEL
            self._volatile_status_write = False
        elif command == RDSFDP and address is not None:
            out = self._sfdp[address : address + miso_bytes]
        elif command in (READ, FAST_READ) and address is not None and miso_bytes:
            out = self.read(address % self.size, min(miso_bytes, self.size - address % self.size))
        return out[:miso_bytes].ljust(miso_bytes, b"\xff")


# -- boot images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootImage:
    """What the ROM finds at flash offset 0 when the chip leaves reset."""

    version: str | None  # MicroPython release in the firmware ("1.27.0"); None: not MicroPython
    date: str | None
    rom_output: str  # what the ROM prints when it does not start MicroPython
    variant: str = ""  # the ESP8266_GENERIC build variant ("" or e.g. "FLASH_2M_ROMFS")

    @property
    def micropython(self) -> bool:
        return self.version is not None

    def romfs_partition(self, flash_bytes: int) -> tuple[int, int] | None:
        """(flash offset, size) of the ROMFS partition this firmware maps, if any."""
        if self.micropython and self.variant == ROMFS_VARIANT and flash_bytes >= 2 << 20:
            return ROMFS_OFFSET, ROMFS_SIZE
        return None


def inspect_boot_image(flash_head: bytes) -> BootImage:
    """Check the image at offset 0 as the ROM does (magic, segments, checksum) and look for a
    MicroPython banner string in it."""
    if len(flash_head) < 8 or flash_head[0] != 0xE9:
        return BootImage(None, None, BOOT_LINE + "ets_main.c \r\n")
    pos, state = 8, CHECKSUM_SEED
    lines: list[str] = []
    for _ in range(flash_head[1]):
        if pos + 8 > len(flash_head):
            return BootImage(None, None, BOOT_LINE + "".join(lines) + "csum err\r\n")
        address, size = struct.unpack_from("<II", flash_head, pos)
        pos += 8
        if pos + size > len(flash_head):
            return BootImage(None, None, BOOT_LINE + "".join(lines) + "csum err\r\n")
        lines.append(f"load 0x{address:08x}, len {size}, room 16 \r\n")
        state ^= _xor_fold(flash_head[pos : pos + size])
        pos += size
    pos += 15 - pos % 16
    stored = flash_head[pos] if pos < len(flash_head) else None
    if stored != state:
        return BootImage(None, None, BOOT_LINE + "".join(lines) + f"csum 0x{state:02x}\r\ncsum err\r\n")
    found = MICROPYTHON_BANNER.search(flash_head)
    if found is None:
        return BootImage(None, None, "")
    build = BUILD_NAME.search(flash_head)
    variant = build.group(1).decode() if build is not None and build.group(1) else ""
    return BootImage(found.group(1).decode(), found.group(2).decode(), "", variant)


def _xor_fold(data: bytes) -> int:
    """The XOR of all bytes of `data`, computed a word at a time."""
    padded = data + b"\x00" * (-len(data) % 8)
    acc = 0
    for (word,) in struct.iter_unpack("<Q", padded):
        acc ^= word
    folded = acc ^ acc >> 32
    folded ^= folded >> 16
    folded ^= folded >> 8
    return folded & 0xFF


def build_firmware_image(
    version: str, date: str, size: int = 0x20000, flash_params: int = 0x0000, variant: str = ""
) -> bytes:
    """A synthetic ESP8266 MicroPython firmware laid out like the port's combined .bin: a ROM
    ("v1") image of IRAM/DRAM segments at 0 padded to 0x9000, then irom0 text holding the banner
    and build name strings. `flash_params` is header bytes 2-3 as a little-endian word: flash
    mode | size and frequency << 8. `variant`: "" (the 2 MiB+ default) or e.g. FLASH_2M_ROMFS."""
    rng = random.Random(f"{version} {date}")
    segments = [(0x40100000, rng.randbytes(0x3000)), (0x3FFE8000, rng.randbytes(0x400))]
    head = bytearray(struct.pack("<BBHI", 0xE9, len(segments), flash_params, 0x40100004))
    state = CHECKSUM_SEED
    for address, data in segments:
        head += struct.pack("<II", address, len(data)) + data
        state ^= checksum(data) ^ CHECKSUM_SEED
    head += b"\x00" * (15 - len(head) % 16) + bytes((state,))
    banner = f"MicroPython v{version} on {date}; ESP module with ESP8266\x00".encode()
    build = ("ESP8266_GENERIC" + (f"-{variant}" if variant else "") + "\x00").encode()
    strings = banner + rng.randbytes(64) + build
    irom_size = max(size - IROM_OFFSET, len(strings) + 4)
    irom = bytearray(rng.randbytes(irom_size - irom_size % 4))
    at = len(irom) // 3
    irom[at : at + len(strings)] = strings
    return bytes(head.ljust(IROM_OFFSET, b"\xff") + irom)


def factory_flash(flash_bytes: int, version: str, date: str, variant: str = "") -> bytes:
    """A new board's flash: MicroPython `version` (`variant`) at 0, everything else erased."""
    image = build_firmware_image(version, date, variant=variant)
    return image + b"\xff" * (flash_bytes - len(image))


# -- the loader --------------------------------------------------------------------------------


@dataclass
class _FlashWrite:
    offset: int  # where the next (stub) or first (ROM) block goes
    block_size: int
    remaining: int  # stub: bytes still expected
    inflater: zlib._Decompress | None = None


@dataclass
class _RamUpload:
    address: int
    block_size: int
    data: bytearray
    written: int = 0


@dataclass
class _ReadStream:
    offset: int
    length: int
    packet: int
    sent: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.md5)


Reply = tuple[int, bytes]  # value, data before the status bytes


class EspRomLoader:
    """One bootloader session: the ROM loader, then (after MEM_END runs an upload) the stub.

    `send` carries bytes to the console client; `run_user_code` is called once when the chip
    leaves the loader for the flash."""

    def __init__(
        self,
        mac: bytes,
        flash: SpiFlash,
        send: Callable[[bytes], None],
        run_user_code: Callable[[], None],
    ) -> None:
        self.flash = flash
        self.stub = False
        self.finished = False
        self._send = send
        self._run_user_code = run_user_code
        self._decoder = SlipDecoder()
        self._regs = self._power_on_registers(mac)
        self._ram: list[_RamUpload] = []
        self._upload: _RamUpload | None = None
        self._write: _FlashWrite | None = None
        self._read: _ReadStream | None = None
        self._rom_value = 0  # the ROM leaves whatever it last loaded in a reply's value field
        self._carried = 0  # stub: error of the work done after the previous reply
        self._after: Callable[[], None] | None = None

    @staticmethod
    def _power_on_registers(mac: bytes) -> dict[int, int]:
        efuse = (
            mac[5] << 24,
            0x02 << 24 | mac[3] << 8 | mac[4],
            0,
            mac[0] << 16 | mac[1] << 8 | mac[2],
        )
        regs = {EFUSE_DATA0 + 4 * i: word for i, word in enumerate(efuse)}
        regs[CHIP_DETECT_MAGIC_REG] = ESP8266_MAGIC
        regs[UART_CLKDIV_REG] = round(APB_HZ / ROM_BAUD)
        return regs

    # -- input ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            if self.finished:
                return
            if self._read is not None:
                self._read_acknowledged(frame)
            else:
                self._command(frame)

    def _command(self, frame: bytes) -> None:
        if len(frame) < 8:
            return
        direction, op, size, check = struct.unpack_from("<BBHI", frame)
        payload = frame[8:]
        if direction != 0x00:
            if self.stub:
                self._reply(op, (0, b""), STUB_INVALID_COMMAND)
            return
        if self.stub and self._carried:
            error, self._carried = self._carried, 0
            self._reply(op, (0, b""), error)
            return
        handler = (self._stub_commands if self.stub else self._rom_commands).get(op)
        self._after = None
        try:
            if len(payload) != size:
                raise fail(BAD_LENGTH)
            if handler is None:
                raise LoaderError(ROM_INVALID_MESSAGE, STUB_INVALID_COMMAND)
            reply = handler(payload, check)
        except LoaderError as e:
            self._reply(op, (0, b""), e.stub) if self.stub else self._reply(op, (self._rom_value, b""), e.rom)
            return
        if reply is not None:
            self._reply(op, reply)
        after, self._after = self._after, None
        if after is not None:
            after()

    def _reply(self, op: int, reply: Reply, error: int = 0) -> None:
        value, data = reply
        status = self._status_bytes(error)
        body = data + status
        self._send(slip_encode(struct.pack("<BBHI", 1, op, len(body), value) + body))

    def _status_bytes(self, error: int) -> bytes:
        if self.stub:
            return struct.pack(">H", error)
        return bytes((1, error)) if error else b"\x00\x00"

    def _deferred(self, work: Callable[[], None]) -> None:
        """Stub: do `work` after the reply; its failure is reported on the next command."""

        def run() -> None:
            try:
                work()
            except LoaderError as e:
                self._carried = e.stub

        self._after = run

    def _leave(self) -> None:
        self.finished = True
        log.info("leaving the serial loader for the flash")
        self._run_user_code()

    # -- commands both loaders have ------------------------------------------------------------

    @property
    def _rom_commands(self) -> dict[int, Callable[[bytes, int], Reply | None]]:
        return {
            SYNC: self._sync,
            READ_REG: self._read_reg,
            WRITE_REG: self._write_reg,
            MEM_BEGIN: self._mem_begin,
            MEM_DATA: self._mem_data,
            MEM_END: self._mem_end,
            FLASH_BEGIN: self._flash_begin,
            FLASH_DATA: self._flash_data,
            FLASH_END: self._flash_end,
        }

    @property
    def _stub_commands(self) -> dict[int, Callable[[bytes, int], Reply | None]]:
        return {
            **self._rom_commands,
            FLASH_DEFL_BEGIN: self._flash_defl_begin,
            FLASH_DEFL_DATA: self._flash_defl_data,
            FLASH_DEFL_END: self._flash_end,
            SPI_FLASH_MD5: self._md5,
            ERASE_FLASH: self._erase_flash,
            ERASE_REGION: self._erase_region,
            READ_FLASH: self._read_flash,
            CHANGE_BAUDRATE: self._change_baudrate,
            SPI_ATTACH: self._fixed_size(4),
            SPI_SET_PARAMS: self._fixed_size(24),
            GET_SECURITY_INFO: self._security_info,
            RUN_USER_CODE: self._run_user,
        }

    def _sync(self, payload: bytes, _check: int) -> Reply | None:
        if self.stub:
            if len(payload) != len(SYNC_PAYLOAD):
                raise fail(BAD_LENGTH)
            for _ in range(7):
                self._reply(SYNC, (0, b""))
            return 0, b""
        if payload != SYNC_PAYLOAD:
            return None  # the ROM's auto-baud did not lock: no answer
        self._rom_value = struct.unpack_from("<I", payload)[0]
        for _ in range(7):
            self._reply(SYNC, (self._rom_value, b""))
        return self._rom_value, b""

    def _read_reg(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 4:
            raise fail(BAD_LENGTH)
        value = self.read_register(struct.unpack("<I", payload)[0])
        if not self.stub:
            self._rom_value = value
        return value, b""

    def _write_reg(self, payload: bytes, _check: int) -> Reply:
        if not payload or len(payload) % 16:
            raise fail(BAD_LENGTH)
        for address, value, mask, _delay_us in struct.iter_unpack("<IIII", payload):
            old = self.read_register(address)
            self.write_register(address, value & mask | old & ~mask & 0xFFFFFFFF)
        return self._rom_value, b""

    def _mem_begin(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 16:
            raise fail(BAD_LENGTH)
        size, _blocks, block_size, address = struct.unpack("<IIII", payload)
        self._upload = _RamUpload(address, block_size, bytearray(size))
        self._ram.append(self._upload)
        return self._rom_value, b""

    def _mem_data(self, payload: bytes, check: int) -> Reply:
        upload = self._upload
        if len(payload) < DATA_HEADER:
            raise fail(BAD_LENGTH)
        if upload is None:
            raise fail(NOT_IN_FLASH_MODE)
        length, seq = struct.unpack_from("<II", payload)
        data = payload[DATA_HEADER:]
        if length != len(data) or upload.written + length > len(upload.data):
            raise LoaderError(ROM_INVALID_MESSAGE, STUB_TOO_MUCH_DATA)
        if not self.stub and checksum(data) != check & 0xFF:
            raise fail(BAD_CHECKSUM)
        at = upload.written if self.stub else seq * upload.block_size
        upload.data[at : at + length] = data
        upload.written += length
        return self._rom_value, b""

    def _mem_end(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 8:
            raise fail(BAD_LENGTH)
        if self._upload is None and self.stub:
            raise fail(NOT_IN_FLASH_MODE)
        no_run, entry = struct.unpack("<II", payload)
        self._upload = None
        if not no_run and not self.stub:
            self._after = lambda: self._start_stub(entry)
        return self._rom_value, b""

    def _start_stub(self, entry: int) -> None:
        uploaded = b"".join(bytes(u.data) for u in self._ram)
        digest = hashlib.md5(uploaded).hexdigest()
        log.info(
            "running RAM code at %#x (%d bytes, md5 %s) as the flasher stub", entry, len(uploaded), digest
        )
        self.stub = True
        self._write = None
        self._rom_value = 0
        self._send(slip_encode(STUB_GREETING))

    def _flash_begin(self, payload: bytes, _check: int) -> Reply:
        return self._begin_write(payload, deflate=False)

    def _flash_defl_begin(self, payload: bytes, _check: int) -> Reply:
        return self._begin_write(payload, deflate=True)

    def _begin_write(self, payload: bytes, deflate: bool) -> Reply:
        if len(payload) != 16 and not (self.stub and len(payload) == 20):
            raise fail(BAD_LENGTH)
        size, _blocks, block_size, offset = struct.unpack_from("<IIII", payload)
        if not self.stub:
            self._rom_erase_area(offset, size)
            self._write = _FlashWrite(offset, block_size, 0)
            return self._rom_value, b""
        # the stub erases the sectors it is about to write as it goes: the same in the end
        self.flash.erase(offset, size)
        self._write = _FlashWrite(offset, block_size, size, zlib.decompressobj() if deflate else None)
        return 0, b""

    def _rom_erase_area(self, offset: int, size: int) -> None:
        """The ESP8266 ROM's erase for FLASH_BEGIN, with its bug: the sectors up to the next
        64 KB boundary are counted twice, so it erases `size` plus that head. esptool's
        get_erase_size() sends a size that comes out right (or a sector over)."""
        first = offset // SECTOR
        count = -(-size // SECTOR)
        head = min(SECTORS_PER_BLOCK - first % SECTORS_PER_BLOCK, count)
        end = min((first + count + head) * SECTOR, self.flash.size)
        if end > first * SECTOR:
            self.flash.erase(first * SECTOR, end - first * SECTOR)

    def _flash_data(self, payload: bytes, check: int) -> Reply:
        write = self._write
        if len(payload) < DATA_HEADER:
            raise fail(BAD_LENGTH)
        if write is None or write.inflater is not None:
            raise fail(NOT_IN_FLASH_MODE)
        length, seq = struct.unpack_from("<II", payload)
        data = payload[DATA_HEADER:]
        if length != len(data):
            raise LoaderError(ROM_INVALID_MESSAGE, STUB_TOO_MUCH_DATA)
        if checksum(data) != check & 0xFF:
            raise fail(BAD_CHECKSUM)
        if not self.stub:
            self.flash.program(write.offset + seq * write.block_size, data)
            return self._rom_value, b""

        def program() -> None:
            chunk = data[: write.remaining]
            self.flash.program(write.offset, chunk)
            write.offset += len(chunk)
            write.remaining -= len(chunk)

        self._deferred(program)
        return 0, b""

    def _flash_end(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 4:
            raise fail(BAD_LENGTH)
        if not self.stub:
            self._write = None
            self._after = self._leave  # FLASH_END makes the ROM run (or reboot into) the flash
            return self._rom_value, b""
        if self._write is None:
            raise fail(NOT_IN_FLASH_MODE)
        if self._write.remaining:
            raise fail(BAD_LENGTH)
        self._write = None
        return 0, b""

    def read_register(self, address: int) -> int:
        if address in self._regs:
            return self._regs[address]
        for upload in self._ram:
            at = address - upload.address
            if 0 <= at <= len(upload.data) - 4:
                return int(struct.unpack_from("<I", upload.data, at)[0])
        return 0

    def write_register(self, address: int, value: int) -> None:
        if address == SPI_CMD and value & SPI_CMD_USR:
            self._spi_user_command()
            value &= ~SPI_CMD_USR  # the controller clears the bit when the transaction is done
        self._regs[address] = value

    def _spi_user_command(self) -> None:
        user, user1 = self.read_register(SPI_USER), self.read_register(SPI_USER1)
        command = self.read_register(SPI_USER2) & 0xFF
        address = None
        if user & SPI_USR_ADDR:
            address_bits = (user1 >> 26 & 0x3F) + 1
            address = self.read_register(SPI_ADDR) >> (32 - address_bits)
        mosi_bits = (user1 >> 17 & 0x1FF) + 1 if user & SPI_USR_MOSI else 0
        miso_bits = (user1 >> 8 & 0x1FF) + 1 if user & SPI_USR_MISO else 0
        buffer = b"".join(struct.pack("<I", self.read_register(SPI_W0 + 4 * i)) for i in range(16))
        miso = self.flash.user_command(command, address, buffer[: (mosi_bits + 7) // 8], (miso_bits + 7) // 8)
        if miso_bits:
            miso = miso.ljust(-(-len(miso) // 4) * 4, b"\x00")
            for i, (word,) in enumerate(struct.iter_unpack("<I", miso)):
                self._regs[SPI_W0 + 4 * i] = word

    # -- stub-only commands ----------------------------------------------------------------------

    def _fixed_size(self, size: int) -> Callable[[bytes, int], Reply]:
        def accept(payload: bytes, _check: int) -> Reply:
            if len(payload) != size:
                raise fail(BAD_LENGTH)
            return 0, b""

        return accept

    def _flash_defl_data(self, payload: bytes, check: int) -> Reply:
        write = self._write
        if len(payload) < DATA_HEADER:
            raise fail(BAD_LENGTH)
        if write is None or write.inflater is None:
            raise fail(NOT_IN_FLASH_MODE)
        if write.remaining == 0:
            raise LoaderError(ROM_INVALID_MESSAGE, STUB_TOO_MUCH_DATA)
        (length,) = struct.unpack_from("<I", payload)
        data = payload[DATA_HEADER : DATA_HEADER + length]
        if checksum(data) != check & 0xFF:
            raise fail(BAD_CHECKSUM)
        inflater = write.inflater

        def inflate_and_program() -> None:
            try:
                out = inflater.decompress(data)
            except zlib.error as e:
                raise LoaderError(ROM_INVALID_MESSAGE, STUB_INFLATE_ERROR) from e
            if len(out) > write.remaining:
                raise LoaderError(ROM_INVALID_MESSAGE, STUB_TOO_MUCH_DATA)
            self.flash.program(write.offset, out)
            write.offset += len(out)
            write.remaining -= len(out)

        self._deferred(inflate_and_program)
        return 0, b""

    def _md5(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 16:
            raise fail(BAD_LENGTH)
        offset, length = struct.unpack_from("<II", payload)
        return 0, self.flash.md5(offset, length)

    def _erase_flash(self, _payload: bytes, _check: int) -> Reply:
        self.flash.erase_chip()
        log.info("flash erased")
        return 0, b""

    def _erase_region(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 8:
            raise fail(BAD_LENGTH)
        offset, length = struct.unpack("<II", payload)
        if offset % SECTOR or length % SECTOR:
            raise fail(BAD_LENGTH)
        self.flash.erase(offset, length)
        return 0, b""

    def _change_baudrate(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 8:
            raise fail(BAD_LENGTH)
        (baud,) = struct.unpack_from("<I", payload)
        if not baud:
            raise fail(BAD_LENGTH)

        def set_divider() -> None:
            self._regs[UART_CLKDIV_REG] = (APB_HZ + baud // 2) // baud

        self._deferred(set_divider)
        return 0, b""

    def _security_info(self, payload: bytes, _check: int) -> Reply:
        if payload:
            raise fail(BAD_LENGTH)
        raise LoaderError(ROM_INVALID_MESSAGE, STUB_NOT_IMPLEMENTED)  # no such info on an ESP8266

    def _run_user(self, _payload: bytes, _check: int) -> None:
        self._after = self._leave  # no reply: the stub jumps straight into the flash

    def _read_flash(self, payload: bytes, _check: int) -> Reply:
        if len(payload) != 16:
            raise fail(BAD_LENGTH)
        offset, length, packet, _in_flight = struct.unpack("<IIII", payload)
        if packet == 0 or packet > STUB_MAX_READ_PACKET:
            raise fail(BAD_LENGTH)

        def start() -> None:
            if not self.flash.contains(offset, length):
                raise fail(SPI_FAILED)
            self._read = _ReadStream(offset, length, packet)
            if length:
                self._send_read_packet()
            else:
                self._read_acknowledged(struct.pack("<I", 0))

        self._deferred(start)
        return 0, b""

    def _send_read_packet(self) -> None:
        stream = self._read
        assert stream is not None
        if stream.sent >= stream.length:
            return
        chunk = self.flash.read(stream.offset + stream.sent, min(stream.packet, stream.length - stream.sent))
        stream.digest.update(chunk)
        stream.sent += len(chunk)
        self._send(slip_encode(chunk))

    def _read_acknowledged(self, frame: bytes) -> None:
        """READ_FLASH: the host acknowledges each packet with the total it has received; one
        packet is in flight at a time (as esptool's stub does), and the MD5 of it all ends it."""
        stream = self._read
        assert stream is not None
        acked = struct.unpack("<I", frame)[0] if len(frame) == 4 else None
        if acked is not None and stream.sent < stream.length:
            self._send_read_packet()
            return
        if acked is None or acked >= stream.length:
            self._read = None
            self._send(slip_encode(stream.digest.digest()))
