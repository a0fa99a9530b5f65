"""The live view of the fleet behind `status`: retained status/info/health plus the data stream.

Watches with its own clean, throwaway MQTT session at QoS 0: it never touches the recorder's
durable session and keeps nothing.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from rich.table import Table

from firmware import protocol


@dataclass
class Board:
    device: str
    online: bool | None = None
    fw: str = ""
    last_sample_rx: float | None = None
    last_sample_t: float | None = None
    kT: float | None = None
    aT: float | None = None
    aH: float | None = None
    backlog: int | None = None
    rssi: int | None = None
    dropped: int | None = None
    health_rx: float | None = None


def _value(sample: list[Any], index: int) -> float | None:
    raw = sample[index]
    return raw / protocol.VALUE_SCALE if type(raw) is int else None


def _int_or_none(value: object) -> int | None:
    return value if type(value) is int else None


class Fleet:
    def __init__(self, prefix: str = protocol.DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.boards: dict[str, Board] = {}
        self.lock = threading.Lock()

    def board(self, device: str) -> Board:
        found = self.boards.get(device)
        if found is None:
            found = self.boards[device] = Board(device)
        return found

    def update(self, topic: str, payload: bytes, now: float) -> None:
        """Fold one message into the view; anything malformed is simply not shown."""
        parsed = protocol.parse_topic(self.prefix, topic)
        if parsed is None:
            return
        device, kind = parsed
        with self.lock:
            board = self.board(device)
            try:
                if kind == protocol.STATUS:
                    board.online = payload == protocol.ONLINE
                    return
                obj = json.loads(payload)
            except ValueError:
                return
            if kind == protocol.DATA and isinstance(obj, list) and obj:
                newest = obj[-1]
                if isinstance(newest, list) and len(newest) == len(protocol.SAMPLE_FIELDS):
                    board.last_sample_rx = now
                    t = newest[protocol.I_TIME]
                    board.last_sample_t = (
                        float(t) if isinstance(t, int | float) and math.isfinite(t) else None
                    )
                    board.kT = _value(newest, protocol.I_KT)
                    board.aT = _value(newest, protocol.I_AT)
                    board.aH = _value(newest, protocol.I_AH)
            elif kind == protocol.HEALTH and isinstance(obj, dict):
                board.backlog = _int_or_none(obj.get("backlog"))
                board.rssi = _int_or_none(obj.get("rssi"))
                board.dropped = _int_or_none(obj.get("dropped"))
                board.health_rx = now
            elif kind == protocol.INFO and isinstance(obj, dict):
                board.fw = str(obj.get("fw") or "")

    def table(self, now: float) -> Table:
        table = Table(title=f"labfleet — {len(self.boards)} boards under {self.prefix}/")
        for name in (
            "device",
            "state",
            "last sample",
            "kT °C",
            "aT °C",
            "aH %RH",
            "backlog",
            "RSSI dBm",
            "fw",
        ):
            table.add_column(name, justify="left" if name in ("device", "state", "fw") else "right")
        with self.lock:
            boards = sorted(self.boards.values(), key=lambda b: b.device)
        for b in boards:
            state = {True: "[green]online", False: "[red]offline", None: "[yellow]?"}[b.online]
            age = "—" if b.last_sample_rx is None else f"{now - b.last_sample_rx:.0f} s ago"
            table.add_row(
                b.device,
                state,
                age,
                *("—" if v is None else f"{v:.2f}" for v in (b.kT, b.aT, b.aH)),
                "—" if b.backlog is None else str(b.backlog),
                "—" if b.rssi is None else str(b.rssi),
                b.fw,
            )
        return table


def watch(
    fleet: Fleet,
    host: str,
    port: int,
    username: str | None = None,
    password: str | None = None,
    tls: bool = False,
    ca_file: str | None = None,
) -> mqtt.Client:
    """Start feeding `fleet` from the broker (a background paho thread); returns the client."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"labfleet-status-{uuid.uuid4().hex[:8]}")
    if username is not None:
        client.username_pw_set(username, password)
    if tls:
        client.tls_set(ca_certs=ca_file)

    def on_connect(c: mqtt.Client, u: object, flags: Any, reason: Any, props: Any) -> None:
        c.subscribe([(f, 0) for f in protocol.subscriptions(fleet.prefix)])

    def on_message(c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        fleet.update(topic, bytes(message.payload), time.time())

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port, 30)
    client.loop_start()
    return client
