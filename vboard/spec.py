"""What a virtual board is made of: its chips and wiring, its flash, its radio environment.

A `BoardSpec` comes from a scenario file (`vboard run --scenario`), from an Ansible
inventory host's `vboard:` variables (`vboard fleet inventory/demo`), or from tests. Unknown
keys are errors naming the key, so a typo never silently gives a board without its sensor.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from firmware import config as fwconfig
from vboard.esprom import ROMFS_VARIANT

ESP8266_FLASH_SIZES = {"1MB": 1 << 20, "2MB": 2 << 20, "4MB": 4 << 20, "8MB": 8 << 20, "16MB": 16 << 20}
DEFAULT_MPY_VERSION = "1.27.0"
DEFAULT_MPY_DATE = "2025-12-09"
HEAP_SIZE = re.compile(r"([1-9][0-9]*)([KkMm]?)")  # as -X heapsize takes it
HEAP_UNITS = {"": 1, "K": 1024, "M": 1024 * 1024}
FIRMWARE_VARIANTS = ("", ROMFS_VARIANT)
ROMFS_SINCE = (1, 25)  # the first release with the ESP8266 ROMFS variant


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("-")[0].split(".")[:2])


class SpecError(ValueError):
    pass


@dataclass
class BoardSpec:
    name: str
    console_port: int = 0
    thermocouple: str | None = "MAX6675"
    ambient: str | None = "SHT30"
    sht30_address: int = 0x44
    rtc: bool = True  # a DS3231 on the I2C bus
    rtc_set: bool = False  # DS3231 already set (OSF clear, correct time) instead of fresh from the factory
    rtc_drift_ppm: float = 0.0
    pins: dict[str, int] = field(default_factory=lambda: dict(fwconfig.DEFAULT_PINS))
    safe_mode_jumper: bool = False  # Pin 13 grounded at boot
    sqw_pullup: bool = True  # DS3231 modules carry a pull-up on SQW
    miso_float: int = 0x00  # what MISO reads with no chip driving it
    seed: int = 1
    signals: dict[str, dict[str, float]] = field(default_factory=dict)
    flash_size: str = "4MB"
    heapsize: str = "auto"
    mpy_version: str = DEFAULT_MPY_VERSION
    mpy_date: str = DEFAULT_MPY_DATE
    # The ESP8266_GENERIC variant a new board comes with: "" or FLASH_2M_ROMFS (MicroPython >= 1.25,
    # 2 MB+ flash), whose ROMFS partition holds the firmware's code, run in place from flash.
    firmware_variant: str = ""
    adc: int = 512
    deepsleep_wake: bool = True  # GPIO16 wired to RST
    # How many times longer the chip takes for the firmware's code than this host's interpreter
    # (0: the factor vboard/clock.py calibrates on this host)
    cpu_factor: float = 0.0

    @property
    def mac(self) -> bytes:
        # Espressif OUI 5C:CF:7F, the rest derived from the name: stable and unique per board.
        return bytes.fromhex("5ccf7f") + hashlib.sha256(self.name.encode()).digest()[:3]

    @property
    def chip_id(self) -> bytes:
        """machine.unique_id(): system_get_chip_id() (the MAC's last three bytes as a number)
        in the ESP8266's little-endian byte order."""
        return bytes((self.mac[5], self.mac[4], self.mac[3], 0))

    @property
    def flash_bytes(self) -> int:
        return ESP8266_FLASH_SIZES[self.flash_size]

    @property
    def heap_bytes(self) -> int | None:
        """The heapsize in bytes; None for "auto" (the board decides)."""
        found = HEAP_SIZE.fullmatch(self.heapsize)
        return int(found.group(1)) * HEAP_UNITS[found.group(2).upper()] if found else None

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any], where: str = "") -> BoardSpec:
        known = {f.name for f in fields(cls)}
        where = where or f"board {name!r}"
        for key in data:
            if key not in known:
                raise SpecError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        spec = cls(name=name, **{k: v for k, v in data.items() if k != "name"})
        spec.validate(where)
        return spec

    def validate(self, where: str = "") -> None:
        where = where or f"board {self.name!r}"
        if self.thermocouple not in (None, *fwconfig.THERMOCOUPLE_TYPES):
            raise SpecError(f"{where}: thermocouple must be one of {fwconfig.THERMOCOUPLE_TYPES} or null")
        if self.ambient not in (None, *fwconfig.AMBIENT_TYPES):
            raise SpecError(f"{where}: ambient must be one of {fwconfig.AMBIENT_TYPES} or null")
        if self.sht30_address not in fwconfig.SHT30_ADDRESSES:
            raise SpecError(f"{where}: sht30_address must be 0x44 or 0x45")
        if self.flash_size not in ESP8266_FLASH_SIZES:
            raise SpecError(f"{where}: flash_size must be one of {', '.join(ESP8266_FLASH_SIZES)}")
        if self.heapsize != "auto" and not HEAP_SIZE.fullmatch(self.heapsize):
            raise SpecError(f"{where}: heapsize must be auto or a size such as 148K, 1M, 200000")
        if self.firmware_variant not in FIRMWARE_VARIANTS:
            raise SpecError(f"{where}: firmware_variant must be one of {FIRMWARE_VARIANTS}")
        if self.firmware_variant == ROMFS_VARIANT and (
            self.flash_bytes < 2 << 20 or _release(self.mpy_version) < ROMFS_SINCE
        ):
            raise SpecError(f"{where}: {ROMFS_VARIANT} needs flash_size >= 2MB and mpy_version >= 1.25")
        unknown_pins = set(self.pins) - set(fwconfig.DEFAULT_PINS)
        if unknown_pins:
            raise SpecError(f"{where}: unknown pins {sorted(unknown_pins)}")
        self.pins = {**fwconfig.DEFAULT_PINS, **self.pins}
        if not 0 <= self.console_port < 65536:
            raise SpecError(f"{where}: console_port must be 0..65535")


@dataclass
class LanSpec:
    """The radio/network environment shared by a fleet."""

    access_points: list[dict[str, Any]] = field(
        default_factory=lambda: [{"ssid": "labfleet-demo", "password": "demo-password"}]
    )
    # Names the virtual LAN's DNS knows. The NTP pool resolves to a documentation address
    # (TEST-NET-3) where only the NTP responder answers, so firmware with the default
    # ntp_host gets simulated time and nothing else leaves the machine.
    hosts: dict[str, str] = field(default_factory=lambda: {"pool.ntp.org": "203.0.113.123"})
    routes: dict[str, str] = field(default_factory=dict)  # "ip:port" -> "127.0.0.1:port"


def parse_hostport(text: str, where: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"{where}: {text!r} is not host:port")
    return host, int(port)


def board_workdir(root: Path, name: str) -> Path:
    return root / name
