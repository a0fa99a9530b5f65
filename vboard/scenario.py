"""Scenario files: a fleet of virtual boards, their radio environment, and timed faults.

    speed: 60                      # simulated seconds per real second
    start: 2026-01-01T00:00:00Z    # simulated time at start (default: now)
    lan:
      access_points: [{ssid: lab, password: lab-password, rssi: -60}]
      hosts: {broker.lab: 127.0.0.1}
      routes: {"192.168.1.10:1883": "127.0.0.1:1883"}
    boards:
      lab-01: {console_port: 7001, thermocouple: MAX31855, ambient: SHT20, seed: 7}
    events:                        # at: simulated seconds after start
      - {at: 600, board: lab-01, action: wifi_drop, seconds: 3600}
      - {at: 900, board: lab-01, action: unplug, chip: ambient}
      - {at: 1200, board: lab-01, action: replug, chip: ambient}

The actions are the ones the control socket offers (vboard/control.py: ACTIONS).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vboard.spec import BoardSpec, LanSpec, SpecError

SCENARIO_KEYS = ("speed", "start", "lan", "boards", "events")
LAN_KEYS = ("access_points", "hosts", "routes")


@dataclass
class Event:
    at: float
    action: str
    args: dict[str, Any]


@dataclass
class Scenario:
    speed: float = 1.0
    start: float | None = None
    lan: LanSpec = field(default_factory=LanSpec)
    boards: list[BoardSpec] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def parse_start(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return stamp.timestamp()
    if isinstance(value, int | float):
        return float(value)
    try:
        stamp = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(f"{where}: start must be an ISO 8601 time or Unix seconds, got {value!r}") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).timestamp()


def parse_lan(data: Any, where: str) -> LanSpec:
    if data is None:
        return LanSpec()
    if not isinstance(data, dict):
        raise SpecError(f"{where}: lan must be a mapping")
    for key in data:
        if key not in LAN_KEYS:
            raise SpecError(f"{where}: lan: unknown key {key!r} (known: {', '.join(LAN_KEYS)})")
    lan = LanSpec()
    if "access_points" in data:
        aps = data["access_points"]
        if not isinstance(aps, list) or not all(isinstance(a, dict) and "ssid" in a for a in aps):
            raise SpecError(f"{where}: lan.access_points must be a list of {{ssid, password, rssi}}")
        lan.access_points = aps
    lan.hosts.update(data.get("hosts") or {})
    lan.routes = {str(k): str(v) for k, v in (data.get("routes") or {}).items()}
    return lan


def parse_scenario(data: Any, where: str) -> Scenario:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a scenario is a mapping with keys {', '.join(SCENARIO_KEYS)}")
    for key in data:
        if key not in SCENARIO_KEYS:
            raise SpecError(f"{where}: unknown key {key!r} (known: {', '.join(SCENARIO_KEYS)})")
    scenario = Scenario(
        speed=float(data.get("speed", 1.0)),
        start=parse_start(data.get("start"), where),
        lan=parse_lan(data.get("lan"), where),
    )
    if scenario.speed <= 0:
        raise SpecError(f"{where}: speed must be positive")
    boards = data.get("boards") or {}
    if not isinstance(boards, dict):
        raise SpecError(f"{where}: boards must map board names to their settings")
    for name, settings in boards.items():
        scenario.boards.append(BoardSpec.from_dict(str(name), settings or {}, f"{where}: board {name!r}"))
    from vboard.control import ACTIONS

    for i, raw in enumerate(data.get("events") or []):
        if not isinstance(raw, dict) or "at" not in raw or "action" not in raw:
            raise SpecError(f"{where}: events[{i}] needs `at` and `action`")
        if raw["action"] not in ACTIONS:
            raise SpecError(
                f"{where}: events[{i}]: unknown action {raw['action']!r} (known: {', '.join(ACTIONS)})"
            )
        args = {k: v for k, v in raw.items() if k not in ("at", "action")}
        scenario.events.append(Event(float(raw["at"]), str(raw["action"]), args))
    scenario.events.sort(key=lambda e: e.at)
    return scenario


def load_scenario(path: Path) -> Scenario:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"cannot read scenario {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return parse_scenario(data, str(path))
