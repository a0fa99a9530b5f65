"""Recorder benchmark: durable ingest rate against a bare subscriber and the 2017 way. A report, not a test.

One mosquitto on 127.0.0.1, in one run:

1. Backlog drain, in ROUNDS rounds. N one-sample messages wait in the broker for persistent
   sessions; then, in alternating order,
   - a bare paho subscriber that only counts (auto PUBACK), MQTT 5 with the same receive maximum;
   - the recorder (`python -m recorder record`): journal fsync before PUBACK, then HDF5 + fsync;
     rates from the recorder's stats lines, steady = between 10 % and 90 % of the backlog;
   and once the 2017 recorder's way: per message json.loads + a one-row DataFrame +
   HDFStore.append, flush every 600 rows (first SEED_MESSAGES messages).
Fleet load (thousands of boards at 1 Hz: CPU, memory, latency) is bench/bench_fleet.py.

    .venv/bin/python bench/bench_recorder.py --out bench/_work/bench_recorder.json [--quick]

Writes the JSON to --out and a markdown section next to it (same name, .md).
The broker is the test launcher's (vboard.broker) minus its save-on-every-change persistence,
which would measure the broker's disk instead of the recorder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from firmware import protocol  # noqa: E402
from vboard.broker import Mosquitto  # noqa: E402

RECEIVE_MAXIMUM = 1000
SEED_MESSAGES = 1500
DRAIN_FLUSH_S = 0.25  # a finer HDF5 flush than the default 1 s, so the measured window is not quantised
CLK_TCK = os.sysconf("SC_CLK_TCK")


def payload(seq: int, t: float, boot: int = 1) -> bytes:
    return json.dumps([[boot, seq, t, 2000 + seq % 500, 2150, 4500, 0]]).encode()


def v5_client(client_id: str) -> tuple[mqtt.Client, Properties]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return client, props


# --- child processes ----------------------------------------------------------------------------


def publish_backlog(port: int, count: int, part: int, boot: int) -> None:
    """`count` samples of 100 boards; a new `boot` for each round, or the recorder would rightly
    drop the next round's samples as duplicates of this one's."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-backlog-{part}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    # In chunks: paho's message ids wrap at 65535 and must not collide while unacknowledged.
    for start in range(0, count, 20_000):
        sent = [
            client.publish(
                protocol.topic("labfleet", f"p{part}-{i % 100:04d}", "data"),
                payload(i, 1.7e9 + i, boot),
                qos=1,
            )
            for i in range(start, min(count, start + 20_000))
        ]
        for info in sent:
            info.wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


# --- measurements -------------------------------------------------------------------------------


def create_session(port: int, client_id: str, v5: bool = True) -> None:
    if v5:
        client, props = v5_client(client_id)
        client.connect("127.0.0.1", port, clean_start=False, properties=props)
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        client.connect("127.0.0.1", port)
    done: list[bool] = []
    client.on_subscribe = lambda *a: done.append(True)
    client.subscribe("labfleet/+/data", qos=1)
    while not done:
        client.loop(0.1)
    client.disconnect()


def sustained(points: list[tuple[float, int]], total: int) -> float:
    """Messages/s between the moments 10 % and 90 % of `total` were done: the steady rate, without
    start-up and without the last flush's wait. points: (time, cumulative count), in order."""
    t10 = next(t for t, n in points if n >= 0.1 * total)
    n10 = next(n for t, n in points if n >= 0.1 * total)
    t90, n90 = next((t, n) for t, n in points if n >= 0.9 * total)
    if t90 <= t10:
        return float("nan")  # too few points (a backlog of a few batches): no steady part to measure
    return (n90 - n10) / (t90 - t10)


def drain_bare(port: int, count: int) -> dict[str, float]:
    client, props = v5_client("bench-bare")
    received = 0
    points: list[tuple[float, int]] = []

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1
        if received % 1000 == 0:
            points.append((time.time(), received))
        if received == count:
            c.disconnect()

    client.on_message = on_message
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    start, cpu = time.time(), time.process_time()
    client.loop_forever()
    wall = time.time() - start
    return {
        "messages": count,
        "rate": count / wall,
        "rate_sustained": sustained(points, count),
        "cpu_s": time.process_time() - cpu,
    }


def drain_seed_style(port: int, workdir: Path) -> dict[str, float]:
    """The 2017 recorder's way: one pandas row appended per message, flushed every 600 rows."""
    import pandas as pd

    store = pd.HDFStore(workdir / "seed.h5", mode="w")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-seed", clean_session=False)
    received = 0

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        nonlocal received
        _boot, seq, t, kt, at, ah, _flags = json.loads(m.payload)[0]
        frame = pd.DataFrame(
            {"id": [seq], "kT": [kt / 100], "aT": [at / 100], "aH": [ah / 100]},
            index=[pd.Timestamp(t, unit="s")],
        )
        store.append("data", frame, format="table")
        received += 1
        if received % 600 == 0:
            store.flush()
        if received == SEED_MESSAGES:
            c.disconnect()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    start = time.perf_counter()
    client.loop_forever()
    wall = time.perf_counter() - start
    store.close()
    return {"messages": SEED_MESSAGES, "seconds": wall, "rate": SEED_MESSAGES / wall}


def read_stats(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            lines.append(json.loads(line))
    return lines


def log_time(log: str, needle: str) -> float:
    """The time of the first log line containing needle (the log's local-time stamps)."""
    for line in log.splitlines():
        if needle in line:
            stamp, millis = line[:23].split(",")
            return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    raise RuntimeError(f"{needle!r} not in the recorder log")


class Recorder:
    def __init__(self, workdir: Path, port: int, client_id: str, *extra: str, run: int = 0) -> None:
        self.stats = workdir / f"{client_id}-{run}.stats"
        self.log = workdir / f"{client_id}.log"
        self.data = workdir / f"{client_id}-data"
        args = ["--port", str(port), "--client-id", client_id, "--data-dir", str(self.data)]
        self.args = [
            sys.executable,
            "-m",
            "recorder",
            "record",
            *args,
            "--stats-file",
            str(self.stats),
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.wait(lambda: "subscribed (" in self.log.read_text(), 30)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def hdf5_rows(self) -> int:
        return sum(s["rows"] for s in read_stats(self.stats) if s["kind"] == "hdf5")

    @staticmethod
    def wait(predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the recorder did not get there in time")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The service process and its writer child."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [self.proc.pid, *(int(p) for p in children.read_text().split())]


def drain_recorder(port: int, workdir: Path, count: int, run: int) -> dict[str, float]:
    recorder = Recorder(workdir, port, "bench-recorder", "--flush-s", str(DRAIN_FLUSH_S), run=run)
    recorder.start()
    try:
        recorder.wait(lambda: recorder.hdf5_rows() >= count, 600)
    finally:
        recorder.stop()
    connected = _connect_times(recorder.log.read_text())[-1]
    stats = read_stats(recorder.stats)
    journal = _progress(stats, "journal", "messages")
    hdf5 = _progress(stats, "hdf5", "rows")
    return {
        "messages": count,
        "rate_journal": count / (journal[-1][0] - connected),
        "rate_journal_sustained": sustained(journal, count),
        "rate_hdf5": count / (hdf5[-1][0] - connected),
        "rate_hdf5_sustained": sustained(hdf5, count),
        "journal_fsyncs": len(journal),
        "hdf5_flush_s": DRAIN_FLUSH_S,
    }


def _progress(stats: list[dict[str, Any]], kind: str, key: str) -> list[tuple[float, int]]:
    """(time, cumulative count) of one kind of stats line."""
    lines = [s for s in stats if s["kind"] == kind]
    counts = np.cumsum([s[key] for s in lines]).tolist()
    return [(s["at"], int(n)) for s, n in zip(lines, counts, strict=True)]


def clear_session(port: int, client_id: str) -> None:
    """Drop a persistent session: offline sessions would otherwise queue every fleet message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port, clean_start=True)
    client.loop(0.5)
    client.disconnect()


def _connect_times(log: str) -> list[float]:
    times = []
    for line in log.splitlines():
        if "connected to 127.0.0.1" in line:
            times.append(log_time(line, "connected to"))
    return times


def preload(port: int, messages: int, boot: int) -> None:
    """The backlog: `messages` one-sample messages, from two publisher processes."""
    halves = (messages // 2, messages - messages // 2)
    publishers = [
        subprocess.Popen(
            [sys.executable, __file__, "--publish-backlog", str(port), str(n), str(i), str(boot)], cwd=REPO
        )
        for i, n in enumerate(halves)
    ]
    if any(p.wait(600) != 0 for p in publishers):
        raise RuntimeError("a backlog publisher failed")


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The goal figures, as bench/run.py puts them in bench/REPORT.md."""
    d = result["drain"]
    ratio = 100 * d["recorder"]["rate_hdf5_sustained"] / d["bare"]["rate_sustained"]
    return [
        {
            "figure": "durable HDF5 ingest vs bare paho subscriber",
            "value": ratio,
            "unit": "%",
            "goal": ">= 80 %",
            "met": ratio >= 80,
        },
        {
            "figure": "recorder, durable in HDF5",
            "value": d["recorder"]["rate_hdf5_sustained"],
            "unit": "msg/s",
        },
        {
            "figure": "bare paho subscriber (counts only)",
            "value": d["bare"]["rate_sustained"],
            "unit": "msg/s",
        },
        {"figure": "2017-style per-message pandas append", "value": d["seed"]["rate"], "unit": "msg/s"},
        {
            "figure": "load average (1 min) at start / end",
            "value": f"{result['load_average_1min']['start']:.1f} / {result['load_average_1min']['end']:.1f}",
        },
    ]


def markdown(result: dict[str, Any]) -> str:
    d = result["drain"]
    bare, rec, seed = d["bare"], d["recorder"], d["seed"]
    ratio = rec["rate_hdf5_sustained"] / bare["rate_sustained"]

    def row(name: str, total: float, steady: float | None) -> str:
        shown = "—" if steady is None else f"{steady:,.0f} ({100 * steady / bare['rate_sustained']:.0f} %)"
        return f"| {name} | {total:,.0f} | {shown} |"

    lines = [
        "## Recorder",
        "",
        f"{result['machine']}; mosquitto on 127.0.0.1; {result['date']}; load average "
        f"{result['load_average_1min']['start']:.1f} at the start, {result['load_average_1min']['end']:.1f} "
        "at the end (other processes share the machine).",
        "",
        f"**Backlog drain**: {d['messages']:,} one-sample messages queued in the broker for each subscriber. "
        "Steady = between 10 % and 90 % done; whole = from connect to the last message done.",
        "",
        "| subscriber | whole run, msg/s | steady, msg/s (vs bare) |",
        "|---|---:|---:|",
        row("bare paho subscriber, counts only (MQTT 5, auto-ack)", bare["rate"], bare["rate_sustained"]),
        row(
            "recorder, acknowledged after the journal fsync",
            rec["rate_journal"],
            rec["rate_journal_sustained"],
        ),
        row(
            f"recorder, durable in HDF5 (flush + fsync every {rec['hdf5_flush_s']} s)",
            rec["rate_hdf5"],
            rec["rate_hdf5_sustained"],
        ),
        row(f"2017 style, a pandas row per message (first {seed['messages']:,})", seed["rate"], None),
        "",
        f"Each row is the best of {len(d['rounds'])} rounds (bare / recorder steady msg/s per round: "
        + ", ".join(
            f"{r['bare']['rate_sustained']:,.0f} / {r['recorder']['rate_hdf5_sustained']:,.0f}"
            for r in d["rounds"]
        )
        + f"). Goal ≥ 80 % of the bare subscriber, durable in HDF5: {'met' if ratio >= 0.8 else 'NOT met'} "
        f"({100 * ratio:.0f} %). The recorder's best round took {rec['journal_fsyncs']:,} journal fsyncs.",
        "",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "_work" / "bench_recorder.json")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    parser.add_argument("--workdir", type=Path, help="keep broker, logs and data here (default: a temp dir)")
    parser.add_argument("--publish-backlog", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish_backlog:
        publish_backlog(*args.publish_backlog)
        return
    if args.quick:
        args.messages, args.rounds = 20_000, 1

    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-recorder-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        broker = Mosquitto(
            workdir / "broker", extra_config=["autosave_on_changes false", "autosave_interval 600"]
        )
        broker.start()
        try:
            # The three sessions exist (offline) before the backlog is published.
            create_session(broker.port, "bench-bare")
            create_session(broker.port, "bench-seed", v5=False)
            first = Recorder(workdir, broker.port, "bench-recorder")
            first.start()
            first.stop()
            # Rounds, each with its own backlog, bare and recorder in alternating order. Other
            # processes on a shared machine slow one run or another by chance: each side is
            # reported by its best (least disturbed) round, and every round is kept in the JSON.
            rounds: list[dict[str, Any]] = []
            seed: dict[str, float] = {}
            for run in range(args.rounds):
                preload(broker.port, args.messages, boot=run + 1)
                if run % 2:
                    recorded = drain_recorder(broker.port, workdir, args.messages, run)
                    bare = drain_bare(broker.port, args.messages)
                else:
                    bare = drain_bare(broker.port, args.messages)
                    recorded = drain_recorder(broker.port, workdir, args.messages, run)
                if not seed:
                    seed = drain_seed_style(broker.port, workdir)
                    clear_session(broker.port, "bench-seed")
                rounds.append({"bare": bare, "recorder": recorded})
            drain = {
                "messages": args.messages,
                "rounds": rounds,
                "bare": max((r["bare"] for r in rounds), key=lambda b: b["rate_sustained"]),
                "recorder": max((r["recorder"] for r in rounds), key=lambda b: b["rate_hdf5_sustained"]),
                "seed": seed,
            }
            for client_id in ("bench-bare", "bench-recorder"):
                clear_session(broker.port, client_id)
            result: dict[str, Any] = {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                "drain": drain,
                # Other work on a shared machine moves every number here: this says how much.
                "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
            }
        finally:
            broker.stop()
    result["summary"] = summary(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
