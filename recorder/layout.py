"""The HDF5 layout, defined once: table dtypes, units, file names and rotation periods.

Documented for people in recorder/LAYOUT.md; the writer, the readers and the tests all use these
definitions. Strings are fixed-width bytes (UTF-8): whatever a device or a topic is called, it is
only ever a value in a column, never the name of a node.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware import protocol

LAYOUT_VERSION = 1

DEVICE_WIDTH = protocol.DEVICE_NAME_MAX
TOPIC_WIDTH = 256
REJECT_PAYLOAD_WIDTH = 1024
REASON_WIDTH = 128
JSON_WIDTH = 2048
TEXT_WIDTH = 256

UTC_SECONDS = "s since 1970-01-01T00:00:00Z (UTC, float64)"

# NaN stands for a null on the wire wherever a column is float.
SAMPLES = np.dtype(
    [
        ("device", f"S{DEVICE_WIDTH}"),
        ("boot", "<i8"),
        ("seq", "<i8"),
        ("t", "<f8"),
        ("rx", "<f8"),
        ("kT", "<f4"),
        ("aT", "<f4"),
        ("aH", "<f4"),
        ("flags", "<u4"),
    ]
)
INFO = np.dtype(
    [
        ("device", f"S{DEVICE_WIDTH}"),
        ("rx", "<f8"),
        ("t", "<f8"),
        ("boot", "<i8"),
        ("v", "<i8"),
        ("fw", "S32"),
        ("mpy", "S64"),
        ("cfg", "S16"),
        ("reset", "S16"),
        ("mac", "S17"),
        ("retained", "?"),
        ("json", f"S{JSON_WIDTH}"),
    ]
)
STATUS = np.dtype([("device", f"S{DEVICE_WIDTH}"), ("rx", "<f8"), ("online", "?"), ("retained", "?")])
# Every health value is nullable on the wire, hence float64 (exact for integers below 2**53).
HEALTH_NUMBERS = ("up", "rssi", "heap", "backlog", "dropped", "reconnects", "seq", "drift_ms")
HEALTH = np.dtype(
    [
        ("device", f"S{DEVICE_WIDTH}"),
        ("rx", "<f8"),
        ("t", "<f8"),
        ("boot", "<i8"),
        *((name, "<f8") for name in HEALTH_NUMBERS),
        ("paused", "i1"),  # 1, 0, or -1 for null
        ("retained", "?"),
    ]
)
REJECTS = np.dtype(
    [
        ("rx", "<f8"),
        ("topic", f"S{TOPIC_WIDTH}"),
        ("topic_len", "<i8"),
        ("payload", f"S{REJECT_PAYLOAD_WIDTH}"),
        ("payload_len", "<i8"),
        ("reason", f"S{REASON_WIDTH}"),
    ]
)
LEGACY_INIT = np.dtype(
    [("device", f"S{DEVICE_WIDTH}"), ("rx", "<f8"), ("base", "<f8"), ("json", f"S{JSON_WIDTH}")]
)
LEGACY_LOG = np.dtype(
    [("rx", "<f8"), ("topic", f"S{TOPIC_WIDTH}"), ("text", f"S{TEXT_WIDTH}"), ("text_len", "<i8")]
)


@dataclass(frozen=True)
class TableSpec:
    name: str
    dtype: np.dtype[np.void]
    title: str
    units: dict[str, str]


FLAG_DOC = ", ".join(f"0x{bit:02x}={name}" for bit, name in protocol.FLAG_NAMES)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec(
            "samples",
            SAMPLES,
            "one row per sample: identity (device, boot, seq), never duplicated",
            {
                "t": UTC_SECONDS + ", the DS3231 second of the sample",
                "rx": UTC_SECONDS + ", when the recorder received it",
                "kT": "degC",
                "aT": "degC",
                "aH": "%RH",
                "flags": "bitmask: " + FLAG_DOC,
            },
        ),
        TableSpec(
            "info",
            INFO,
            "board info messages (retained, one per connect)",
            {"t": UTC_SECONDS, "rx": UTC_SECONDS, "json": "the whole info object as received"},
        ),
        TableSpec("status", STATUS, "online/offline changes", {"rx": UTC_SECONDS}),
        TableSpec(
            "health",
            HEALTH,
            "board health messages",
            {
                "t": UTC_SECONDS,
                "rx": UTC_SECONDS,
                "rssi": "dBm",
                "heap": "bytes",
                "up": "s",
                "drift_ms": "ms",
            },
        ),
        TableSpec(
            "rejects",
            REJECTS,
            "messages not recorded elsewhere, with why (topic and payload truncated)",
            {"rx": UTC_SECONDS, "topic_len": "bytes", "payload_len": "bytes"},
        ),
        TableSpec(
            "legacy_init",
            LEGACY_INIT,
            "2017 firmware ESP_init messages; device is the announced DATA_topic",
            {"rx": UTC_SECONDS, "base": UTC_SECONDS + ", the init 'Time'; a sample's t = base + id"},
        ),
        TableSpec(
            "legacy_log",
            LEGACY_LOG,
            "2017 firmware plain-text log lines and markers such as <Data_begin>",
            {"rx": UTC_SECONDS, "text_len": "bytes"},
        ),
    )
}

ROTATIONS = ("daily", "hourly")
_PERIOD_FORMAT = {"daily": "%Y%m%d", "hourly": "%Y%m%dT%H"}
_PERIOD_SECONDS = {"daily": 86400, "hourly": 3600}
FILE_SUFFIX = ".h5"


def period_start(rx: float, rotation: str) -> int:
    """The Unix time at which the rotation period holding `rx` starts (UTC)."""
    length = _PERIOD_SECONDS[rotation]
    return int(rx // length) * length


def period_length(rotation: str) -> int:
    return _PERIOD_SECONDS[rotation]


def file_stem(base: str, shard: str) -> str:
    return f"{base}-{shard}" if shard else base


def file_name(base: str, shard: str, rotation: str, start: int) -> str:
    stamp = time.strftime(_PERIOD_FORMAT[rotation], time.gmtime(start))
    return f"{file_stem(base, shard)}-{stamp}{FILE_SUFFIX}"


_STAMP = re.compile(r"-(\d{8})(?:T(\d{2}))?\.h5$")


def period_of_file(path: Path) -> int | None:
    """The period start encoded in a data file's name, or None for other files."""
    match = _STAMP.search(path.name)
    if match is None:
        return None
    day = time.strptime(match.group(1), "%Y%m%d")
    return calendar.timegm(day) + 3600 * int(match.group(2) or 0)


def shard_files(data_dir: Path, base: str, shard: str) -> list[Path]:
    """This recorder's data files in data_dir, oldest period first."""
    stem = file_stem(base, shard)
    found: list[tuple[int, Path]] = []
    for path in data_dir.glob(f"{stem}-*{FILE_SUFFIX}"):
        start = period_of_file(path)
        # `stem-` also prefixes other shards' names (labfleet-a-… vs labfleet-a-b-…): the
        # remainder must be the period stamp alone.
        if start is not None and _STAMP.fullmatch("-" + path.name[len(stem) + 1 :]):
            found.append((start, path))
    return [path for _, path in sorted(found)]
