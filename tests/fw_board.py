"""Put the board firmware on virtual boards the way the provisioning build does, and watch what
they publish.

`build_firmware(dest)` lays out a board's flash as the build does (roles/board_build): every
firmware module compiled with mpy-cross (flat, `drivers/` as a package), `boot.py` and `main.py`
as source (MicroPython runs only those names at boot). `add_board(fleet, spec, build, cfg)` puts
that and a `config.json` on a new virtual board's flash before it first boots (so the board
never runs anything else); `install(board, build, cfg)` onto a running one (reset it then).
`romfs_image(build)` is the other deployment form: the compiled modules in a ROMFS image, for a
FLASH_2M_ROMFS board (`add_board(..., romfs=image)` writes it into the board's partition, and
only boot.py, main.py and config.json onto its filesystem).
`Watcher` is a paho-mqtt subscriber with a persistent QoS 1 session (nothing the broker
accepted is missed, even across a broker restart) that keeps every message and the samples of
the data topic in arrival order.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from mpremote.romfs import make_romfs
from paho.mqtt.enums import CallbackAPIVersion

from firmware import config as fwconfig
from firmware import protocol
from tests.fw_run import FIRMWARE, mpy_cross
from vboard import esprom, flashfs
from vboard.board import HAL_HEAP_OVERHEAD, Board, prepare_flash
from vboard.fleet import Fleet
from vboard.spec import BoardSpec, board_workdir

# -X heapsize of the firmware's virtual boards (bench/bench_fw_heap.py measures what it needs):
# 80 KiB for the firmware on top of what the ROM itself takes
FIRMWARE_HEAP = f"{(80 * 1024 + HAL_HEAP_OVERHEAD) // 1024}K"
SOURCE_NAMES = ("boot.py", "main.py")  # run as source at boot, as roles/board_build does
HOST_ONLY = ("__init__.py",)


def build_firmware(dest: Path) -> Path:
    """The firmware files as they go onto a board's flash, in dest; returns dest."""
    compiler = mpy_cross()
    for source in sorted(FIRMWARE.rglob("*.py")):
        relative = source.relative_to(FIRMWARE)
        if str(relative) in HOST_ONLY:
            continue
        if str(relative) in SOURCE_NAMES:
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            continue
        target = (dest / relative).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [compiler, "-o", str(target), "-s", str(relative), str(source)], check=True, capture_output=True
        )
    return dest


def board_config(device: str, broker_port: int, ssid: str, password: str, **overrides: Any) -> dict[str, Any]:
    """A valid config.json for a virtual board (broker and NTP on 127.0.0.1)."""
    cfg: dict[str, Any] = {
        "device": device,
        "wifi": [{"ssid": ssid, "password": password}],
        "broker": {"host": "127.0.0.1", "port": broker_port},
        "ntp_host": "127.0.0.1",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    errors = fwconfig.validate(cfg)
    assert not errors, errors
    return cfg


def romfs_image(build: Path) -> bytes:
    """The compiled modules of a build_firmware() folder as a ROMFS image (`mpremote romfs build`)."""
    with tempfile.TemporaryDirectory(prefix="fw-romfs-") as tmp:
        shutil.copytree(build, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*SOURCE_NAMES))
        with contextlib.redirect_stdout(io.StringIO()):
            return bytes(make_romfs(tmp, mpy_cross=False))


def firmware_files(
    build: Path, cfg: dict[str, Any] | str | None, code: bool = True
) -> dict[str, bytes | None]:
    """What the build puts on a board's filesystem (only boot.py and main.py unless `code`) and
    its config.json (a dict, raw text, or None: no such file), as FlashFilesystem.write_tree()
    takes them (None: removed)."""
    files: dict[str, bytes | None] = (
        dict(flashfs.tree(build)) if code else {name: (build / name).read_bytes() for name in SOURCE_NAMES}
    )
    files[fwconfig.CONFIG_FILE] = (
        None if cfg is None else (cfg if isinstance(cfg, str) else json.dumps(cfg)).encode()
    )
    return files


def install(board: Board, build: Path, cfg: dict[str, Any] | str | None) -> None:
    board.files().write_tree(firmware_files(build, cfg))


def add_board(
    fleet: Fleet,
    spec: BoardSpec,
    build: Path,
    cfg: dict[str, Any] | str | None,
    romfs: bytes | None = None,
    files: dict[str, bytes | None] | None = None,
) -> Board:
    """A new board whose flash holds the firmware from its very first boot: the build's files,
    or with `romfs` (a romfs_image()) a FLASH_2M_ROMFS firmware with that image in its partition
    and only boot.py, main.py and the config on its filesystem; then `files` over them (a path
    to bytes, or None to remove it)."""
    image = board_workdir(fleet.workdir, spec.name) / "flash.bin"
    if romfs is not None:
        spec.firmware_variant = esprom.ROMFS_VARIANT
        spec.validate()
    prepare_flash(image, spec)
    if romfs is not None:
        assert len(romfs) <= esprom.ROMFS_SIZE, f"a ROMFS image of {len(romfs)} bytes exceeds the partition"
        with image.open("r+b") as f:
            f.seek(esprom.ROMFS_OFFSET)
            f.write(romfs)
    files = {**firmware_files(build, cfg, code=romfs is None), **(files or {})}
    flashfs.FlashFilesystem.open(image, spec.flash_bytes).write_tree(files)
    return fleet.add(spec)


def console_text(board: Board) -> str:
    path = board.workdir / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float  # arrival, in the watcher's clock (simulated time when given a fleet's clock)


@dataclass
class Watcher:
    """A QoS 1 subscriber with a persistent session on every topic of the protocol."""

    port: int
    clock: Callable[[], float] = time.monotonic
    prefix: str = protocol.DEFAULT_PREFIX
    client_id: str = "fw-watcher"
    messages: list[Message] = field(default_factory=list)
    samples: list[tuple[Any, ...]] = field(default_factory=list)
    sample_arrivals: list[float] = field(default_factory=list)
    device_samples: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)

    def start(self) -> Watcher:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError("the watcher did not subscribe")
        return self

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(t, 1) for t in protocol.subscriptions(self.prefix)])

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        now = self.clock()
        with self.lock:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), now))
            parsed = protocol.parse_topic(self.prefix, msg.topic)
            if parsed is not None and parsed[1] == protocol.DATA:
                for sample in json.loads(msg.payload):
                    self.samples.append(tuple(sample))
                    self.sample_arrivals.append(now)
                    self.device_samples.setdefault(parsed[0], []).append(tuple(sample))

    # --- views -----------------------------------------------------------------------------

    def of_kind(self, kind: str) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith("/" + kind)]

    def samples_of(self, device: str) -> list[tuple[Any, ...]]:
        """One device's samples as they arrived (duplicates included)."""
        with self.lock:
            return list(self.device_samples.get(device, []))

    def json_of(self, kind: str) -> list[Any]:
        return [json.loads(m.payload) for m in self.of_kind(kind)]

    def unique_samples(self) -> list[tuple[Any, ...]]:
        """Samples deduplicated by (boot, seq), first arrival order (as the recorder keeps them)."""
        seen: set[tuple[int, int]] = set()
        out = []
        with self.lock:
            samples = list(self.samples)
        for s in samples:
            key = (s[protocol.I_BOOT], s[protocol.I_SEQ])
            if key not in seen:
                seen.add(key)
                out.append(s)
        return out

    def wait_for(self, predicate: Callable[[Watcher], bool], timeout: float, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what or predicate}")
            time.sleep(0.05)


def truth_by_second(board: Board) -> dict[str, dict[int, float]]:
    """What each chip reported, per quantity and DS3231 second of its conversion (the DS3231's
    time at the conversion's simulated time, with the DS3231's current setting: compare only
    samples taken since it was last set). Conversions within one second are of one value."""
    rtc = board.chips.get("rtc")
    out: dict[str, dict[int, float]] = {"kT": {}, "aT": {}, "aH": {}}
    for role in ("thermocouple", "ambient"):
        chip = board.chips.get(role)
        if chip is None:
            continue
        for reading in list(chip.log.items):
            if reading.quantity in out:
                if rtc is None:
                    second = math.floor(reading.time)
                else:
                    second = int(rtc.now_datetime(reading.time).timestamp())
                out[reading.quantity][second] = reading.reported
    return out


def wait_sim(fleet: Fleet, until: float) -> None:
    """Sleep until the fleet's simulated clock reads `until`."""
    while True:
        left = until - fleet.clock.now()
        if left <= 0:
            return
        time.sleep(min(fleet.clock.real_delay(left), 1.0))


def hundredths(value: float) -> int:
    return protocol.to_hundredths(value)  # type: ignore[return-value]


def mismatches(samples: Iterable[tuple[Any, ...]], truth: dict[str, dict[int, float]]) -> list[str]:
    """Sample values that differ from what the chips converted in the sample's second."""
    problems = []
    for s in samples:
        t = s[protocol.I_TIME]
        for name, index in (("kT", protocol.I_KT), ("aT", protocol.I_AT), ("aH", protocol.I_AH)):
            got = s[index]
            if got is None:
                continue
            reported = truth[name].get(t)
            if reported is None or math.isnan(reported) or hundredths(reported) != got:
                problems.append(f"{name} at {t}: board {got}, chip {reported}")
    return problems
