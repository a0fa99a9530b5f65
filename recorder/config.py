"""The recorder's settings: a TOML file, overridden by command-line flags.

[broker]
host = "127.0.0.1"
port = 1883
protocol = "5"            # "5" (default) or "3.1.1"
client_id = "labfleet-recorder"
username = "recorder"     # optional, with password
password = "..."
tls = false               # with optional ca_file, cert_file, key_file
keepalive = 30
receive_maximum = 2000    # MQTT 5: unacknowledged messages the broker may send us; memory
                          # use is at most about receive_maximum * max_payload
session_expiry_s = 4294967295

[topics]
prefix = "labfleet"
share_group = ""          # set on every recorder of a scaled-out group (each its own shard)
legacy = true             # also record 2017-firmware boards
legacy_log_topic = "esp001log"

[storage]
data_dir = "data"
shard = ""                # part of the file names; required to differ between shared recorders
rotation = "daily"        # or "hourly"
flush_s = 1.0             # HDF5 flush + fsync period
dedupe_hours = 48
min_free_mb = 64          # stop writing (and acknowledging) before the disk is this full

[commit]
commit_delay_s = 0.05     # longest a received message waits for its journal fsync
max_batch = 0             # 0: receive_maximum // 2 (MQTT 5) or 20 (MQTT 3.1.1)
max_writer_lag_s = 30     # stop acknowledging when the HDF5 writer is this far behind
max_payload = 16384       # larger messages are rejected (their head is kept in rejects)
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from firmware.protocol import DEFAULT_PREFIX, subscriptions
from recorder import layout

SECTIONS: dict[str, tuple[str, ...]] = {
    "broker": (
        "host",
        "port",
        "protocol",
        "client_id",
        "username",
        "password",
        "tls",
        "ca_file",
        "cert_file",
        "key_file",
        "keepalive",
        "receive_maximum",
        "session_expiry_s",
    ),
    "topics": ("prefix", "share_group", "legacy", "legacy_log_topic"),
    "storage": (
        "data_dir",
        "journal_dir",
        "base_name",
        "shard",
        "rotation",
        "flush_s",
        "dedupe_hours",
        "min_free_mb",
        "stats_file",
    ),
    "commit": ("commit_delay_s", "max_batch", "max_writer_lag_s", "max_payload", "segment_s"),
    "log": ("log_level",),
}

PROTOCOLS = ("5", "3.1.1")
# mosquitto's default max_inflight_messages: with MQTT 3.1.1 the broker sends no more than this
# many unacknowledged messages, so a batch must not wait for more.
MQTT311_INFLIGHT = 20
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class ConfigError(ValueError):
    pass


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    client_id: str = "labfleet-recorder"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    receive_maximum: int = 2000
    session_expiry_s: int = 0xFFFFFFFF
    prefix: str = DEFAULT_PREFIX
    share_group: str = ""
    legacy: bool = True
    legacy_log_topic: str = "esp001log"
    data_dir: str = "data"
    journal_dir: str = ""
    base_name: str = "labfleet"
    shard: str = ""
    rotation: str = "daily"
    flush_s: float = 1.0
    dedupe_hours: float = 48.0
    min_free_mb: float = 64.0
    stats_file: str = ""
    commit_delay_s: float = 0.05
    max_batch: int = 0
    max_writer_lag_s: float = 30.0
    max_payload: int = 16384
    segment_s: float = 30.0
    log_level: str = "INFO"

    @property
    def state_dir(self) -> Path:
        return Path(self.data_dir) / ".recorder" / (self.shard or "main")

    @property
    def journal_path(self) -> Path:
        return Path(self.journal_dir) if self.journal_dir else self.state_dir / "journal"

    @property
    def batch_limit(self) -> int:
        if self.max_batch > 0:
            return self.max_batch
        return max(1, self.receive_maximum // 2) if self.protocol == "5" else MQTT311_INFLIGHT

    def filters(self) -> list[str]:
        """Topic filters the recorder subscribes to (legacy data topics come as announced)."""
        found = subscriptions(self.prefix)
        if self.share_group:
            found = [f"$share/{self.share_group}/{f}" for f in found]
        if self.legacy:
            # Never shared: the recorder that sees a board's init must also get its data.
            found.append(self.legacy_log_topic)
        return found

    def validate(self) -> Settings:
        problems = []
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol must be one of {PROTOCOLS}")
        if self.rotation not in layout.ROTATIONS:
            problems.append(f"rotation must be one of {layout.ROTATIONS}")
        for name in ("shard", "share_group"):
            value = getattr(self, name)
            if value and not _NAME.match(value):
                problems.append(f"{name} must match {_NAME.pattern}")
        if not _NAME.match(self.base_name):
            problems.append(f"base_name must match {_NAME.pattern}")
        for name in ("prefix", "legacy_log_topic"):
            value = getattr(self, name)
            if not value or any(c in value for c in "+#") or value.startswith("$"):
                problems.append(f"{name} must be a topic without wildcards")
        if not 0 < self.port < 65536:
            problems.append("port must be 1..65535")
        if not 1 <= self.receive_maximum <= 65535:
            problems.append("receive_maximum must be 1..65535")
        for name in ("flush_s", "commit_delay_s", "max_writer_lag_s", "segment_s", "dedupe_hours"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.max_payload < 1:
            problems.append("max_payload must be >= 1")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text)).validate()


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from a TOML file (sections as in this module's docstring) and flag overrides
    (None values are ignored)."""
    values: dict[str, Any] = {}
    if path is not None:
        with Path(path).open("rb") as f:
            document = tomllib.load(f)
        for section, table in document.items():
            allowed = SECTIONS.get(section)
            if allowed is None or not isinstance(table, dict):
                raise ConfigError(f"unknown section [{section}]")
            for key, value in table.items():
                if key not in allowed:
                    raise ConfigError(f"unknown key {key!r} in [{section}]")
                values[key] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    known = {f.name for f in fields(Settings)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}")
    if "protocol" in values:
        values["protocol"] = str(values["protocol"])
    defaults = Settings()
    for key, value in values.items():
        default = getattr(defaults, key)
        expected: tuple[type, ...] = (str,) if default is None else (type(default),)
        if isinstance(default, float):
            expected = (int, float)
        if (default is None and value is None) or (
            isinstance(value, expected) and not (isinstance(value, bool) and not isinstance(default, bool))
        ):
            continue
        raise ConfigError(f"{key} must be of type {expected[0].__name__}")
    try:
        return Settings(**values).validate()
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
