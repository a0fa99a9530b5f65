"""Shared pieces of the recorder suites: the recorder as a real process, boards as real MQTT
clients, and readers that wait for the data files to say what they must. No tests here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pandas as pd
import tables
from paho.mqtt.enums import CallbackAPIVersion

from firmware import protocol
from recorder.read import data_files, read_samples

T = TypeVar("T")
T_BASE = 1_740_000_000


class RecorderProcess:
    """`python -m recorder record` in its own process group (service + writer child)."""

    def __init__(self, workdir: Path, port: int, *extra: str, data_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.data_dir = data_dir or workdir / "data"
        self.log_path = workdir / f"recorder-{id(self)}.log"
        self.args = [
            sys.executable,
            "-m",
            "recorder",
            "record",
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            "--flush-s",
            "0.2",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: list[int] = []  # every start's process group, to reap orphaned writers
        self.preexec: Callable[[], None] | None = None

    def start(self, wait_subscribed: bool = True) -> RecorderProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=self.preexec,
            )
        self.groups.append(self.proc.pid)
        if wait_subscribed:
            wait_for(lambda: "subscribed (" in self.log(offset), 30, "the recorder to subscribe")
        return self

    def log(self, offset: int = 0) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def writer_pids(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill9(self, which: str = "all") -> None:
        """SIGKILL: the whole recorder (service and writer, like a power cut or the OOM killer),
        or only the service, or only the writer."""
        assert self.proc is not None
        if which == "writer":
            for pid in self.writer_pids():
                os.kill(pid, signal.SIGKILL)
            return
        if which == "all":
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the service commits, acknowledges, and waits for its writer."""
        assert self.proc is not None
        group = self.proc.pid
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        wait_for(lambda: not _group_alive(group), 30, "the writer to exit")
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        deadline = time.monotonic() + 30
        for group in self.groups:
            while _group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(group):
                os.killpg(group, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies of the group still count for killpg; they are gone for our purpose.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_for(predicate: Callable[[], T], timeout: float, what: str, period: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, tables.HDF5ExtError, ValueError, KeyError, AttributeError, tables.NoSuchNodeError):
            pass  # a file read that raced a flush: try again
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)


def samples(data_dir: Path) -> pd.DataFrame:
    return read_samples(data_dir) if data_files(data_dir) else pd.DataFrame(columns=["device", "boot", "seq"])


def raw_sample_ids(data_dir: Path) -> list[tuple[str, int, int]]:
    """Every (device, boot, seq) row in every file, duplicates included (read_samples drops them)."""
    found = []
    for path in data_files(data_dir):
        with tables.open_file(str(path), "r") as h5:
            rows = h5.root.samples.read()
            ids = zip(rows["device"].tolist(), rows["boot"].tolist(), rows["seq"].tolist(), strict=True)
            found += [(d.decode(), b, s) for d, b, s in ids]
    return found


def all_files_open(data_dir: Path) -> int:
    """Open every data file and read every table; the number of files."""
    count = 0
    for path in data_files(data_dir):
        with tables.open_file(str(path), "r") as h5:
            for table in h5.root:
                table.read()
        count += 1
    return count


def sample(
    boot: int, seq: int, kt: int | None = 2500, at: int | None = 2200, ah: int | None = 4000
) -> list[Any]:
    return [boot, seq, T_BASE + seq, kt, at, ah, 0 if None not in (kt, at, ah) else protocol.FLAG_AMB_FAULT]


class Board:
    """A board as the broker sees it: its own client id, a persistent session, QoS 1 data and
    retained status/info/health, paho's own reconnect and resend of unacknowledged messages."""

    def __init__(self, port: int, device: str, boot: int = 1, prefix: str = protocol.DEFAULT_PREFIX) -> None:
        self.device, self.boot, self.prefix = device, boot, prefix
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, clean_session=False)
        self.client.max_inflight_messages_set(50)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.will_set(self.topic(protocol.STATUS), protocol.OFFLINE, qos=1, retain=True)
        # PUBACKs by message id; unlike MQTTMessageInfo.is_published this also covers messages
        # published while disconnected, which paho queues and sends after reconnecting.
        self.acked: set[int] = set()
        self.client.on_publish = lambda c, u, mid, rc, props: self.acked.add(mid)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        self.sent: list[mqtt.MQTTMessageInfo] = []

    def topic(self, kind: str) -> str:
        return protocol.topic(self.prefix, self.device, kind)

    def announce(self) -> None:
        info: dict[str, object] = {key: None for key in protocol.INFO_KEYS}
        info |= {"v": protocol.PROTOCOL_VERSION, "device": self.device, "fw": "test", "boot": self.boot}
        info |= {"t": T_BASE}
        self.publish(protocol.STATUS, protocol.ONLINE, retain=True)
        self.publish(protocol.INFO, json.dumps(info).encode(), retain=True)

    def health(self, seq: int) -> None:
        health: dict[str, object] = {key: 0 for key in protocol.HEALTH_KEYS}
        health |= {"boot": self.boot, "t": T_BASE + seq, "rssi": -60, "drift_ms": None, "paused": False}
        self.publish(protocol.HEALTH, json.dumps(health).encode(), retain=True)

    def data(self, seqs: Iterable[int]) -> None:
        self.publish(protocol.DATA, json.dumps([sample(self.boot, s) for s in seqs]).encode())

    def publish(self, kind: str, payload: bytes, retain: bool = False) -> None:
        self.sent.append(self.client.publish(self.topic(kind), payload, qos=1, retain=retain))

    def all_published(self) -> bool:
        assert len(self.sent) < 65535, "message ids would repeat"
        return all(info.mid in self.acked for info in self.sent)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class LegacyBoard:
    """A 2017-firmware board: umqtt.simple at QoS 0, init on esp001log, data on its own topic."""

    INIT = (
        '{{"ESP_init":{{"DATA_topic":"{topic}","DS3231 SetTime":"OK","NTP & RTC SyncTime":"OK",'
        '"Time":"{time}","Day_W":0,"Day_Y":345,"Sensor SHT30":"OK","Sensor MAX6675":"OK"}}}}'
    )

    def __init__(self, port: int, mac: str) -> None:
        self.data_topic = f"data-esp-{mac}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"esp-{mac}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def init(self, when: str, garbage: bytes = b"") -> None:
        payload = self.INIT.format(topic=self.data_topic, time=when).encode() + garbage
        self.client.publish("esp001log", payload).wait_for_publish(5)

    def marker(self, text: str) -> None:
        self.client.publish("esp001log", text).wait_for_publish(5)

    def data(self, seq: int, kt: float | None, at: float | None, ah: float | None) -> None:
        values = ("null" if v is None else f"{v:.6f}" for v in (kt, at, ah))
        payload = '[{{"id":{},"kT":{},"aT":{},"aH":{}}}]'.format(seq, *values)
        self.client.publish(self.data_topic, payload).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
