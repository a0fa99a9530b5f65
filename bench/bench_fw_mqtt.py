"""Replay rate of the board firmware's store-and-forward path, on real MicroPython against mosquitto.

A 21,600-sample backlog (6 h at 1 Hz, the default flash buffer) is written to the flash buffer the
way an outage leaves it, then replayed: store.take() -> MQTTClient.publish(qos=1) -> poll() ->
store.commit(), with a window of in-flight publishes, versus window=1 (one round trip per
publish), side by side. A paho subscriber checks every sample arrived. Writes JSON to --out.

    .venv/bin/python bench/bench_fw_mqtt.py --out bench/_work/bench_fw_mqtt.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fw_run import compile_firmware, json_lines, start_script  # noqa: E402
from vboard.broker import Mosquitto  # noqa: E402

REPLAY = """
import gc, json, time, mqtt, store
PORT, BACKLOG, WINDOW, BATCH = [int(a) for a in sys.argv[1:5]]
s = store.Store(120, BACKLOG, "fifo", batch=BATCH)
start = time.ticks_ms()
for i in range(BACKLOG):
    if i and i % 10 == 0:
        s.flush()                      # an outage: the app flushes every flush_s = 10 s
    s.push(1, i, 1700000000 + i, 2000 + i % 500, 2150, 4500, 0)
s.flush()
fill_ms = time.ticks_diff(time.ticks_ms(), start)
c = mqtt.MQTTClient("bench", "127.0.0.1", PORT, keepalive=60, window=WINDOW)
c.connect()
gc.collect()
heap_min = gc.mem_free()
batches = []
publishes = 0
start = time.ticks_ms()
while s.depth():
    while c.window_free() and s.pending():
        batches.append(s.take(BATCH))
        c.publish(b"labfleet/bench/data", s.batch(), qos=1)
        publishes += 1
    for _ in range(c.poll(5)):
        s.commit(batches.pop(0))
    if publishes % 20 == 0:
        gc.collect()                   # live heap, not garbage waiting for collection
        free = gc.mem_free()
        if free < heap_min:
            heap_min = free
replay_ms = time.ticks_diff(time.ticks_ms(), start)
c.disconnect()
print(json.dumps({"fill_ms": fill_ms, "replay_ms": replay_ms, "publishes": publishes,
                  "heap_min_free_after_gc": heap_min, "dropped": s.dropped, "torn": s.torn}))
"""


class Counter:
    def __init__(self, port: int) -> None:
        self.seqs: set[int] = set()
        self.samples = 0
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("labfleet/bench/data", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rc, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the counting subscriber could not subscribe")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        batch = json.loads(msg.payload)
        with self.lock:
            self.samples += len(batch)
            self.seqs.update(sample[1] for sample in batch)

    def complete(self, expected: int, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.seqs) >= expected:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_case(
    micropython: str, lib: Path, work: Path, port: int, backlog: int, window: int, batch: int, heap: str
) -> dict[str, Any]:
    counter = Counter(port)
    try:
        proc = start_script(
            micropython, lib, REPLAY, work, heap=heap, args=(str(port), str(backlog), str(window), str(batch))
        )
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"replay failed:\n{out[-2000:]}\n{err[-2000:]}")
        result: dict[str, Any] = json_lines(out)[-1]
        delivered = counter.complete(backlog)
        with counter.lock:
            result["received_samples"] = counter.samples
            result["received_unique"] = len(counter.seqs)
    finally:
        counter.close()
    replay_s = result["replay_ms"] / 1000
    result.update(
        window=window,
        batch=batch,
        backlog=backlog,
        all_delivered=delivered,
        replay_samples_per_s=round(backlog / replay_s, 1) if replay_s else None,
        realtime_factor=round(backlog / replay_s, 1) if replay_s else None,  # samples are 1 Hz
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--backlog", type=int, default=21_600)
    parser.add_argument("--batch", type=int, default=60, help="samples per publish (config buffer.batch)")
    parser.add_argument("--windows", default="16,1", help="comma-separated QoS 1 windows to compare")
    parser.add_argument("--heap", default="64K", help="MicroPython -X heapsize")
    args = parser.parse_args()
    micropython = str(Path(sys.executable).parent / "micropython")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_fw_mqtt_") as tmp:
        root = Path(tmp)
        lib = compile_firmware(root / "lib")
        with Mosquitto(root / "broker") as broker:
            for window in (int(w) for w in args.windows.split(",")):
                case = run_case(
                    micropython,
                    lib,
                    root / f"w{window}",
                    broker.port,
                    args.backlog,
                    window,
                    args.batch,
                    args.heap,
                )
                print(
                    f"window={window:>3} batch={args.batch}: {case['replay_samples_per_s']} samples/s "
                    f"({case['realtime_factor']}x real time), {case['publishes']} publishes, "
                    f"delivered={case['all_delivered']}, "
                    f"heap free after GC >= {case['heap_min_free_after_gc']} B",
                    flush=True,
                )
                results.append(case)
    report = {
        "benchmark": "fw_mqtt_replay",
        "description": "store -> batches -> QoS 1 window replay of a flash backlog, real MicroPython unix "
        "port against mosquitto on 127.0.0.1 (loopback: no WiFi latency, so the window's gain here is a "
        "lower bound of its gain over a real link)",
        "host": platform.node(),
        "python": platform.python_version(),
        "results": results,
        "summary": [
            {
                "figure": f"replay of {c['backlog']:,} samples, window {c['window']}, batch {c['batch']}",
                "value": c["replay_samples_per_s"],
                "unit": "samples/s (x real time at 1 Hz)",
                "goal": ">= 20x",
                "met": bool(c["all_delivered"]) and c["replay_samples_per_s"] >= 20,
            }
            for c in results
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
