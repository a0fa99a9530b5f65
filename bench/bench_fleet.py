"""Fleet load: thousands of boards at 1 Hz through mosquitto into the recorder. A report, not a test.

Two phases, side by side in one run, each on a fresh mosquitto (the deployed role's persistence:
saved every 5 s) and a fresh recorder (default settings):

1. BOARDS simulated boards (bench/loadgen.py: one MQTT connection each, the firmware's last
   will, online/info/health and one QoS 1 data message per second);
2. the same plus VBOARDS virtual boards running the real firmware at real time (vboard, real
   MicroPython, simulated chips) on the same broker and recorder.

Measured in each: the recorder's CPU (service + writer, % of one core) and peak memory (VmHWM of
both processes), mosquitto's CPU, every sample recorded exactly once, and for the load
generator's samples the latency from publish to the HDF5 flush + fsync that holds it; in phase 2
also whether every virtual board's every second is in the files.

    .venv/bin/python bench/bench_fleet.py --out bench/_work/bench_fleet.json [--boards 5000]
        [--vboards 20] [--seconds 40] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
from bench_recorder import CLK_TCK, Recorder, read_stats  # noqa: E402

from tests.fw_board import add_board, board_config, build_firmware  # noqa: E402
from vboard.broker import Mosquitto  # noqa: E402
from vboard.fleet import Fleet  # noqa: E402
from vboard.spec import BoardSpec, LanSpec  # noqa: E402

SSID, PASSWORD = "bench-wifi", "bench-password"
BROKER_CONFIG = ["autosave_on_changes false", "autosave_interval 5"]  # as roles/mosquitto deploys it
NAMES = "lg"
VBOARD_HEAP = "168K"


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def peak_rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def durable_times(recorder: Recorder, rx: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """When each received sample became durable: the first HDF5 flush + fsync that covered it."""
    flushes = [s for s in read_stats(recorder.stats) if s["kind"] == "hdf5"]
    flush_at = np.array([s["at"] for s in flushes])
    covered = np.maximum.accumulate(np.array([s["max_rx"] for s in flushes]))
    index = np.minimum(np.searchsorted(covered, rx, side="left"), len(flush_at) - 1)
    return flush_at[index]


def start_vboards(workdir: Path, port: int, count: int) -> tuple[Fleet, list[str]]:
    build = build_firmware(workdir / "firmware")
    lan = LanSpec(access_points=[{"ssid": SSID, "password": PASSWORD}])
    fleet = Fleet(workdir / "vboards", speed=1, lan=lan).start()
    names = [f"vb-{i:02d}" for i in range(1, count + 1)]
    for i, name in enumerate(names):
        spec = BoardSpec(name=name, rtc_set=True, heapsize=VBOARD_HEAP, seed=i + 1)
        add_board(fleet, spec, build, board_config(name, port, SSID, PASSWORD))
    return fleet, names


def phase(workdir: Path, boards: int, vboards: int, seconds: float, processes: int) -> dict[str, Any]:
    import tables

    workdir.mkdir(parents=True)
    broker = Mosquitto(workdir / "broker", extra_config=BROKER_CONFIG)
    broker.start()
    recorder = Recorder(workdir, broker.port, "bench-fleet")
    fleet: Fleet | None = None
    vboard_names: list[str] = []
    try:
        recorder.start()
        if vboards:
            fleet, vboard_names = start_vboards(workdir, broker.port, vboards)
        report: dict[str, Any] = {}

        def generate() -> None:
            report.update(
                loadgen.run("127.0.0.1", broker.port, boards, seconds, processes, NAMES, "labfleet")
            )

        generator = threading.Thread(target=generate)
        generator.start()
        warmup = min(5.0, seconds / 4)
        time.sleep(warmup)
        assert broker.proc is not None
        pids = recorder.pids()
        ticks0, broker0, wall0 = cpu_ticks(pids), cpu_ticks([broker.proc.pid]), time.monotonic()
        time.sleep(max(1.0, seconds - 2 * warmup))
        ticks1, broker1, wall1 = cpu_ticks(pids), cpu_ticks([broker.proc.pid]), time.monotonic()
        generator.join()
        vboard_end = time.time()
        if fleet is not None:
            fleet.stop()
            fleet = None
        recorder.wait(lambda: recorder.hdf5_rows() >= report["sent"], 300)
        settled = -1
        while settled != recorder.hdf5_rows():  # the virtual boards' last samples too
            settled = recorder.hdf5_rows()
            time.sleep(3)
        memory = peak_rss_mib(recorder.pids())
    finally:
        if fleet is not None:
            fleet.stop()
        recorder.stop()
        broker.stop()
    device, t, rx, seq, boot = [], [], [], [], []
    for path in sorted(recorder.data.glob("*.h5")):
        with tables.open_file(str(path)) as h5:
            rows = h5.root.samples.read()
            device.append(rows["device"])
            t.append(rows["t"])
            rx.append(rows["rx"])
            seq.append(rows["seq"])
            boot.append(rows["boot"])
    devices, t_all, rx_all = np.concatenate(device), np.concatenate(t), np.concatenate(rx)
    seq_all, boot_all = np.concatenate(seq), np.concatenate(boot)
    ids = np.rec.fromarrays([devices, boot_all, seq_all])
    generated = np.char.startswith(devices, f"{NAMES}-".encode())
    offsets = loadgen.publish_offsets(NAMES, boards, processes)
    published = t_all[generated] + np.array([offsets[d.decode()] for d in devices[generated]])
    latency = durable_times(recorder, rx_all[generated]) - published
    result: dict[str, Any] = {
        "boards": boards,
        "vboards": vboards,
        "seconds": seconds,
        "loadgen": report,
        "recorded": int(generated.sum()),
        "unique": len(np.unique(ids[generated])),
        "recorder_cpu_percent_of_one_core": 100 * (ticks1 - ticks0) / CLK_TCK / (wall1 - wall0),
        "broker_cpu_percent_of_one_core": 100 * (broker1 - broker0) / CLK_TCK / (wall1 - wall0),
        "recorder_peak_rss_mib": memory,
        "latency_publish_to_hdf5_fsync_s": {
            "p50": float(np.percentile(latency, 50)),
            "p99": float(np.percentile(latency, 99)),
            "max": float(latency.max()),
        },
    }
    if vboards:
        complete = 0
        vboard_samples = 0
        for name in vboard_names:
            mine = devices == name.encode()
            seconds_seen = np.sort(t_all[mine])
            vboard_samples += int(mine.sum())
            whole = len(seconds_seen) > 0 and len(np.unique(seconds_seen)) == len(seconds_seen)
            whole = whole and seconds_seen[-1] - seconds_seen[0] + 1 == len(seconds_seen)
            whole = whole and seconds_seen[-1] >= vboard_end - 15  # up to the end of the run
            complete += int(whole)
        result["vboard_samples"] = vboard_samples
        result["vboards_complete"] = complete
    return result


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key in ("alone", "with_vboards"):
        p = result[key]
        label = f"{p['boards']:,} boards" + (f" + {p['vboards']} virtual boards" if p["vboards"] else "")
        cpu, p99 = p["recorder_cpu_percent_of_one_core"], p["latency_publish_to_hdf5_fsync_s"]["p99"]
        lost = p["loadgen"]["sent"] - p["unique"]
        rows += [
            {
                "figure": f"{label}: recorder CPU (service + writer)",
                "value": cpu,
                "unit": "% of one core",
                "goal": "< 50 %",
                "met": cpu < 50,
            },
            {
                "figure": f"{label}: publish -> HDF5 fsync latency p99",
                "value": p99,
                "unit": f"s (p50 {p['latency_publish_to_hdf5_fsync_s']['p50']:.2f} s)",
                "goal": "< 2 s",
                "met": p99 < 2,
            },
            {
                "figure": f"{label}: samples lost / recorded twice",
                "value": f"{lost} / {p['recorded'] - p['unique']}",
                "unit": f"of {p['loadgen']['sent']:,}",
                "goal": "0 / 0",
                "met": lost == 0 and p["recorded"] == p["unique"],
            },
            {"figure": f"{label}: recorder peak memory", "value": p["recorder_peak_rss_mib"], "unit": "MiB"},
            {
                "figure": f"{label}: mosquitto CPU",
                "value": p["broker_cpu_percent_of_one_core"],
                "unit": "% of one core",
            },
        ]
        if p["vboards"]:
            rows.append(
                {
                    "figure": f"{label}: virtual boards with every second recorded once",
                    "value": f"{p['vboards_complete']} of {p['vboards']}",
                    "unit": f"({p['vboard_samples']:,} samples)",
                    "goal": "all",
                    "met": p["vboards_complete"] == p["vboards"],
                }
            )
    rows.append(
        {
            "figure": "load average (1 min) at start / end",
            "value": f"{result['load_average_1min']['start']:.1f} / {result['load_average_1min']['end']:.1f}",
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=BENCH / "_work" / "bench_fleet.json")
    parser.add_argument("--boards", type=int, default=5000, help="simulated boards (default 5000)")
    parser.add_argument("--vboards", type=int, default=20, help="virtual boards in phase 2 (default 20)")
    parser.add_argument("--seconds", type=float, default=40, help="seconds of load per phase (default 40)")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.boards, args.vboards, args.seconds = 300, 3, 12
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        alone = phase(Path(tmp) / "alone", args.boards, 0, args.seconds, args.processes)
        print(json.dumps(alone), flush=True)
        with_vboards = phase(Path(tmp) / "vboards", args.boards, args.vboards, args.seconds, args.processes)
        print(json.dumps(with_vboards), flush=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "alone": alone,
        "with_vboards": with_vboards,
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    result["summary"] = summary(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
