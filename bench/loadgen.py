"""Load generator: N boards on the wire, as the firmware behaves, without N virtual boards.

Each simulated board has its own MQTT 3.1.1 connection (client id = its device name, clean
session, keepalive 60 s) with the firmware's retained last will (`offline` on its status topic,
in CONNECT); on connect it publishes the retained `online` and a retained info object, then one
data message per second holding that second's sample (what the firmware sends while it is
live: the samples pending, here one) as QoS 1, and a retained health object every
HEALTH_PERIOD_S. Topics and payload shapes come from firmware/protocol.py. Board k of n in a
process publishes at k/n of every second, so the load is even; sample t is the whole second, as
a DS3231 gives it, and the publish happens at t + k/n (what latency figures are measured from).

The boards of one process are paho-mqtt clients driven by a single selector loop (paho's
loop_read / loop_write / loop_misc), not a thread each: thousands fit in one process.

    .venv/bin/python bench/loadgen.py --port 1883 --boards 5000 --seconds 60
    .venv/bin/python bench/loadgen.py --port 1883 --boards 5000 --processes 2 --name-prefix lg

Prints one JSON line at the end: boards, connected, lost connections, samples sent and
acknowledged, seconds run.
"""

from __future__ import annotations

import argparse
import json
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from firmware import protocol  # noqa: E402

MISC_EVERY_S = 1.0  # paho's keepalive and retry housekeeping for every client


def device_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def publish_offset(index: int, first: int, boards: int) -> float:
    """When in each second board `index` of the process [first, first + boards) publishes."""
    return (index - first) / boards


def split(boards: int, processes: int) -> list[tuple[int, int]]:
    """(first index, boards) of each process."""
    per = [boards // processes + (1 if i < boards % processes else 0) for i in range(processes)]
    return [(sum(per[:i]), n) for i, n in enumerate(per)]


def publish_offsets(names: str, boards: int, processes: int) -> dict[str, float]:
    """Every simulated device's publish offset within the second, by device name."""
    return {
        device_name(names, i): publish_offset(i, first, n)
        for first, n in split(boards, processes)
        for i in range(first, first + n)
    }


@dataclass
class SimBoard:
    name: str
    offset: float
    client: mqtt.Client
    topic_prefix: str
    boot: int = 1
    seq: int = 0
    connected: bool = False
    lost: bool = False
    data_acked: int = 0
    next_health: float = 0.0

    def __post_init__(self) -> None:
        self.data_mids: set[int] = set()

    def topic(self, kind: str) -> str:
        return protocol.topic(self.topic_prefix, self.name, kind)

    def info(self, now: float) -> bytes:
        return json.dumps(
            {
                "v": protocol.PROTOCOL_VERSION,
                "device": self.name,
                "fw": "loadgen",
                "mpy": None,
                "cfg": "0" * 16,
                "boot": self.boot,
                "reset": "power",
                "mac": None,
                "sensors": {"tc": {"type": "MAX6675", "ok": True}, "amb": {"type": "SHT30", "ok": True}},
                "time": {"source": "ntp", "sync": "ok", "osf": False, "offset_ms": 0},
                "t": int(now),
                "buffer": {"ram": 120, "flash": 21600, "flush_s": 10},
            }
        ).encode()

    def health(self, now: float, up: float) -> bytes:
        values = {
            "boot": self.boot,
            "t": int(now),
            "up": int(up),
            "rssi": -60,
            "heap": 20000,
            "backlog": 0,
            "dropped": 0,
            "flash_errors": 0,
            "reconnects": 0,
            "seq": self.seq - 1,
            "drift_ms": 0,
            "paused": False,
        }
        return json.dumps({key: values[key] for key in protocol.HEALTH_KEYS}).encode()

    def sample(self, second: int) -> bytes:
        kt = 2000 + (self.seq * 7 + len(self.name)) % 500
        sample = [self.boot, self.seq, second, kt, 2150, 4500, 0]
        self.seq += 1
        return json.dumps([sample]).encode()


def make_board(name: str, offset: float, host: str, port: int, topic_prefix: str) -> SimBoard:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311, clean_session=True
    )
    board = SimBoard(name, offset, client, topic_prefix)
    client.will_set(board.topic(protocol.STATUS), protocol.OFFLINE, qos=1, retain=True)
    client.max_queued_messages_set(0)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        board.connected = True
        c.publish(board.topic(protocol.STATUS), protocol.ONLINE, qos=1, retain=True)
        c.publish(board.topic(protocol.INFO), board.info(time.time()), qos=1, retain=True)

    def on_publish(c: mqtt.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
        if mid in board.data_mids:
            board.data_mids.remove(mid)
            board.data_acked += 1

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(host, port, keepalive=60)
    return board


def run_process(
    host: str, port: int, first: int, boards: int, seconds: float, names: str, prefix: str
) -> None:
    selector = selectors.DefaultSelector()
    fleet = [
        make_board(device_name(names, i), publish_offset(i, first, boards), host, port, prefix)
        for i in range(first, first + boards)
    ]
    for board in fleet:
        sock = board.client.socket()
        if sock is None:
            raise ConnectionError(f"{board.name}: no connection to {host}:{port}")
        selector.register(sock, selectors.EVENT_READ, board)
    start = time.time()
    first_second = int(start) + 1
    for i, board in enumerate(fleet):  # health spread over its period
        board.next_health = first_second + protocol.HEALTH_PERIOD_S * i / boards
    sent = 0
    second = first_second
    order = sorted(fleet, key=lambda b: b.offset)
    position = 0
    last_misc = start
    while second < first_second + seconds:
        board = order[position]
        due = second + board.offset
        while True:
            now = time.time()
            wait = due - now
            for key, _ in selector.select(timeout=max(0.0, min(wait, 0.05))):
                reader: SimBoard = key.data
                if reader.client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    drop(selector, reader)
            if now - last_misc >= MISC_EVERY_S:
                last_misc = now
                for b in fleet:
                    if not b.lost:
                        b.client.loop_misc()
                        if b.client.want_write():
                            b.client.loop_write()
            if wait <= 0:
                break
        if board.connected and not board.lost:
            info = board.client.publish(board.topic(protocol.DATA), board.sample(second), qos=1)
            board.data_mids.add(info.mid)
            sent += 1
            if now >= board.next_health:
                board.next_health += protocol.HEALTH_PERIOD_S
                board.client.publish(
                    board.topic(protocol.HEALTH), board.health(now, now - start), qos=1, retain=True
                )
        position += 1
        if position == len(order):
            position = 0
            second += 1
    deadline = time.time() + 30  # the last acknowledgements
    while time.time() < deadline and any(b.client.want_write() or b.data_mids for b in fleet if not b.lost):
        for key, _ in selector.select(timeout=0.05):
            if key.data.client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                drop(selector, key.data)
        for b in fleet:
            if not b.lost and b.client.want_write():
                b.client.loop_write()
    for b in fleet:
        if not b.lost:
            b.client.disconnect()  # a clean disconnect: no last will
            b.client.loop_write()
    report = {
        "boards": boards,
        "connected": sum(b.connected for b in fleet),
        "lost_connections": sum(b.lost for b in fleet),
        "sent": sent,
        "acked": sum(b.data_acked for b in fleet),
        "seconds": second - first_second,
    }
    print(json.dumps(report), flush=True)


def drop(selector: selectors.BaseSelector, board: SimBoard) -> None:
    board.lost = True
    sock = board.client.socket()
    if sock is not None:
        selector.unregister(sock)
    print(f"loadgen: {board.name} lost its connection", file=sys.stderr, flush=True)


def run(
    host: str, port: int, boards: int, seconds: float, processes: int, names: str, prefix: str
) -> dict[str, Any]:
    """Every process's report added up."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--host",
                host,
                "--port",
                str(port),
                "--boards",
                str(n),
                "--first",
                str(first),
                "--seconds",
                str(seconds),
                "--processes",
                "1",
                "--name-prefix",
                names,
                "--topic-prefix",
                prefix,
            ],
            stdout=subprocess.PIPE,
        )
        for first, n in split(boards, processes)
    ]
    total: dict[str, Any] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 600)
        if proc.returncode != 0:
            raise RuntimeError(f"a load generator process failed (exit {proc.returncode})")
        report = json.loads(out.decode().strip().splitlines()[-1])
        for key, value in report.items():
            total[key] = max(total.get(key, 0), value) if key == "seconds" else total.get(key, 0) + value
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    parser.add_argument("--boards", type=int, default=100, help="simulated boards (default 100)")
    parser.add_argument("--seconds", type=float, default=30, help="seconds of publishing (default 30)")
    parser.add_argument("--processes", type=int, default=1, help="processes to spread the boards over")
    parser.add_argument("--first", type=int, default=0, help="index of the first board (names lg-00000, ...)")
    parser.add_argument("--name-prefix", default="lg", help="device names are <prefix>-<index> (default lg)")
    parser.add_argument("--topic-prefix", default=protocol.DEFAULT_PREFIX, help="the protocol's topic prefix")
    args = parser.parse_args()
    if args.boards < 1 or args.processes < 1 or args.seconds <= 0:
        parser.error("--boards, --processes and --seconds must be positive")
    if args.processes == 1:
        run_process(
            args.host, args.port, args.first, args.boards, args.seconds, args.name_prefix, args.topic_prefix
        )
    else:
        total = run(
            args.host,
            args.port,
            args.boards,
            args.seconds,
            args.processes,
            args.name_prefix,
            args.topic_prefix,
        )
        print(json.dumps(total), flush=True)


if __name__ == "__main__":
    main()
