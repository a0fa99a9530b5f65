"""Heap the board firmware needs, and its replay rate, on virtual boards (real MicroPython unix
port, simulated chips, a real mosquitto on 127.0.0.1).

The smallest `-X heapsize` at which the firmware runs without a MemoryError (every sample
delivered, and health messages coming: at least half of one per HEALTH_PERIOD_S while connected)
is searched with short runs (a few simulated minutes with a WiFi outage and its replay, so the
flash spill and the batch encoding are exercised), then confirmed with one simulated hour (again
with an outage); a failed confirmation moves one step up. Both deployment forms are measured in
the same run: romfs (a FLASH_2M_ROMFS board with the compiled modules in its ROMFS partition,
run in place: the form for 2 MB+ boards) and files (.mpy files on the filesystem, imported into
the heap: 1 MB boards). The virtual board adds its copy of the ROMFS partition to the heap it is
given and leaves it out of the ROM's figure (vboard/board.py), so heapsizes compare.
Reported per form:

  heapsize_min_bytes        the -X heapsize that ran the hour (without the partition copy)
  rom_alloc_at_boot_bytes   what the virtual board's ROM (simulated machine/network/socket... in
                            Python, on a real board in ROM/flash) had allocated before boot.py,
                            including the objects the port has static (pins, WLAN, RTC, WDT)
                            and the holes between its objects it filled (rom_holes_filled_bytes):
                            the firmware starts on a free heap in one piece, as on a board
  firmware_share_bytes      heapsize_min - rom_alloc_at_boot (the issue's goal: <= 48 KiB)
  firmware_live_heap_bytes  the firmware's largest live heap: free heap at boot minus the
                            lowest free heap the health messages reported (after gc.collect():
                            live objects, not garbage waiting for a collection)
  replay_rate               simulated seconds of backlog per simulated second of replay, after
                            the outage of the confirmation run

    .venv/bin/python bench/bench_fw_heap.py --out bench/_work/bench_fw_heap.json [--forms romfs]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from firmware import protocol  # noqa: E402
from tests.fw_board import (  # noqa: E402
    SOURCE_NAMES,
    Watcher,
    add_board,
    board_config,
    build_firmware,
    console_text,
    romfs_image,
    wait_sim,
)
from vboard.broker import Mosquitto  # noqa: E402
from vboard.fleet import Fleet  # noqa: E402
from vboard.spec import BoardSpec, LanSpec  # noqa: E402

SSID, PASSWORD = "bench-wifi", "bench-password"
KIB = 1024
FORMS = {
    "romfs": "ROMFS image + boot.py/main.py; run in place",
    "files": ".mpy + boot.py/main.py; loaded into the heap on import",
}


def run(
    build: Path,
    work: Path,
    heap_kib: int,
    speed: float,
    seconds: float,
    outage: float,
    romfs: bytes | None = None,
) -> dict[str, Any]:
    """One board for `seconds` simulated seconds with a WiFi outage of `outage` seconds in the
    middle; whether it ran without a MemoryError (or any other crash) and kept reporting, and
    what it reported."""
    name = f"heap-{heap_kib}k"
    lan = LanSpec(access_points=[{"ssid": SSID, "password": PASSWORD}])
    with Mosquitto(work / name / "broker") as broker, Fleet(work / name, speed=speed, lan=lan) as fleet:
        watcher = Watcher(broker.port, clock=fleet.clock.now).start()
        try:
            cfg = board_config(name, broker.port, SSID, PASSWORD)
            board = add_board(
                fleet, BoardSpec(name=name, rtc_set=True, heapsize=f"{heap_kib}K"), build, cfg, romfs
            )
            start = fleet.clock.now()
            ap = fleet.lan.access_points[SSID]
            down = start + (seconds - outage) / 2
            wait_sim(fleet, down)
            fleet.call(lambda: setattr(ap, "up", False))
            fleet.call(board.station.advance)
            wait_sim(fleet, down + outage)
            fleet.call(lambda: setattr(ap, "up", True))
            up = fleet.clock.now()
            wait_sim(fleet, start + seconds)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (
                watcher.samples and watcher.samples[-1][protocol.I_TIME] >= start + seconds - 5
            ):
                time.sleep(0.1)
            console = console_text(board)
            samples = watcher.unique_samples()
            arrivals: dict[tuple[int, int], float] = {}
            for s, at in zip(watcher.samples, watcher.sample_arrivals, strict=True):
                arrivals.setdefault((s[protocol.I_BOOT], s[protocol.I_SEQ]), at)
            backlog = [arrivals[(s[0], s[1])] for s in samples if down <= s[protocol.I_TIME] <= up]
            health = watcher.json_of(protocol.HEALTH)
            # a board whose heap is too tight to work in may still not raise: it collects
            # garbage so often that it falls behind (here at 120x, a collection's real
            # milliseconds are a tenth of a simulated second) and its health messages stop
            health_expected = (seconds - outage) / protocol.HEALTH_PERIOD_S
            ok = (
                "MemoryError" not in console
                and board.boot_count == 1
                and board.crashes == 0
                and not board.files().exists("crash.log")
                and bool(samples)
                and samples[-1][protocol.I_TIME] >= start + seconds - 5
                and len(health) >= health_expected / 2
            )
            replay = max(backlog) - min(backlog) if len(backlog) > 1 else 0.0
            return {
                "heapsize_kib": heap_kib,
                "ok": ok,
                "memory_error": "MemoryError" in console,
                "boots": board.boot_count,
                "samples": len(samples),
                "rom_alloc_at_boot": board.heap_at_boot[0] if board.heap_at_boot else None,
                "rom_free_at_boot": board.heap_at_boot[1] if board.heap_at_boot else None,
                "rom_holes_at_boot": board.heap_holes_at_boot,
                "min_free_heap": min((h["heap"] for h in health), default=None),
                "health_messages": len(health),
                "backlog_samples": len(backlog),
                "replay_rate": len(backlog) / replay if replay > 0 else None,
                "console_tail": console[-600:] if not ok else "",
            }
        finally:
            watcher.stop()


def search(
    build: Path, work: Path, romfs: bytes | None, args: argparse.Namespace, label: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The smallest heap (KiB steps) that ran the confirmation hour, and every run made."""
    probes: list[dict[str, Any]] = []
    low, high = args.low, args.high
    while high - low > args.step:
        mid = (low + high) // 2 // args.step * args.step
        result = run(build, work / "probe", mid, args.speed, args.probe_s, args.probe_s / 3, romfs)
        probes.append(result)
        print(f"{label}: {mid} KiB: {'ok' if result['ok'] else 'FAILED'}", flush=True)
        if result["ok"]:
            high = mid
        else:
            low = mid
    heap = high
    while True:
        result = run(build, work / "confirm", heap, args.speed, args.confirm_s, args.confirm_s / 3, romfs)
        probes.append(result)
        print(
            f"{label}: {heap} KiB for {args.confirm_s:.0f} s: {'ok' if result['ok'] else 'FAILED'}",
            flush=True,
        )
        if result["ok"]:
            return result, probes
        heap += args.step


def figures(confirmed: dict[str, Any], code_bytes: int, probes: list[dict[str, Any]]) -> dict[str, Any]:
    heapsize = confirmed["heapsize_kib"] * KIB
    rom = confirmed["rom_alloc_at_boot"]
    return {
        "heapsize_min_bytes": heapsize,
        "rom_alloc_at_boot_bytes": rom,
        "rom_holes_filled_bytes": confirmed["rom_holes_at_boot"],
        "firmware_share_bytes": heapsize - rom if rom is not None else None,
        "firmware_live_heap_bytes": (
            confirmed["rom_free_at_boot"] - confirmed["min_free_heap"] if confirmed["min_free_heap"] else None
        ),
        "firmware_code_bytes": code_bytes,
        "replay_rate": confirmed["replay_rate"],
        "replay_backlog_samples": confirmed["backlog_samples"],
        "probes": probes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--speed", type=float, default=120)
    parser.add_argument("--low", type=int, default=96, help="KiB known (or assumed) too small")
    parser.add_argument("--high", type=int, default=256, help="KiB known to be enough")
    parser.add_argument("--step", type=int, default=2, help="KiB resolution of the search")
    parser.add_argument("--probe-s", type=float, default=600, help="simulated seconds of a search run")
    parser.add_argument("--confirm-s", type=float, default=3600, help="simulated seconds of the confirmation")
    parser.add_argument(
        "--forms", default="romfs,files", help="deployment forms to measure, comma-separated: romfs, files"
    )
    args = parser.parse_args()
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    unknown = set(forms) - set(FORMS)
    if unknown or not forms:
        parser.error(f"--forms: choose from {', '.join(FORMS)} (got {args.forms!r})")

    started = time.monotonic()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fw-heap-") as tmp:
        work = Path(tmp)
        build = build_firmware(work / "build")
        image = romfs_image(build)
        for form in forms:
            romfs = image if form == "romfs" else None
            # what the board's flash holds: the ROMFS image plus boot.py/main.py, or every file
            code_bytes = sum(
                f.stat().st_size
                for f in build.rglob("*")
                if f.is_file() and (romfs is None or f.name in SOURCE_NAMES)
            ) + (len(image) if romfs is not None else 0)
            confirmed, probes = search(build, work / form, romfs, args, form)
            out[form] = figures(confirmed, code_bytes, probes)
    out.update(
        {
            "goal_firmware_share_bytes": 48 * KIB,
            "speed": args.speed,
            "confirm_simulated_s": args.confirm_s,
            "wall_s": round(time.monotonic() - started, 1),
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
    )
    out["summary"] = [row for form in forms for row in summary_rows(form, out[form])]
    out["notes"] = (
        "64-bit unix port: objects and pointers take ~1.7x the ESP8266's bytes. romfs: the "
        "FLASH_2M_ROMFS firmware with the compiled modules in its ROMFS partition, run in place "
        "(bytecode and constants stay in flash; the deployment for 2 MB+ boards). files: .mpy "
        "files on the filesystem, loaded into the heap on import (1 MB boards, which have no "
        "ROMFS variant). The firmware share includes the qstr pool the firmware's names make the "
        "VM allocate and every transient the firmware needs at its peak (boot, connect, a replay "
        "batch). romfs: the resident modules take ~18 KiB (what importing each from a ROMFS "
        "image costs in the unix port: the function, class and dict objects made for each def, "
        "and a 40-byte object for each string constant longer than 10 characters) and the qstr "
        "pool ~7 KiB (the 640-entry pool the VM allocates for the firmware's ~540 names once "
        "the ROM's last one is full; the names themselves stay in flash). "
        "The ROM's allocation at boot counts the holes between its objects, which it fills "
        "before boot.py (vboard/README.md, Heap): the firmware's free heap starts in one piece, "
        "as on a board, instead of a third of it in one- and two-block holes. "
        "The gap between the share and the largest live heap is the firmware's own "
        "fragmentation and headroom: MicroPython's GC never moves an object. One step below the "
        "minimum a run either fails at the end of boot (loading the sampler) or, with ~3 KiB "
        "free, collects garbage so often that at 120x (a collection's real milliseconds are a "
        "tenth of a simulated second) it falls behind and its health messages stop."
    )
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def summary_rows(form: str, f: dict[str, Any]) -> list[dict[str, Any]]:
    heapsize, rom, share = f["heapsize_min_bytes"], f["rom_alloc_at_boot_bytes"], f["firmware_share_bytes"]
    live, rate = f["firmware_live_heap_bytes"], f["replay_rate"]
    where = FORMS[form]
    return [
        {
            "figure": f"{form}: smallest -X heapsize for 1 simulated hour",
            "value": heapsize / KIB,
            "unit": "KiB",
        },
        {
            "figure": f"{form}: the ROM's allocation at boot (simulated hardware)",
            "value": rom / KIB,
            "unit": "KiB",
        },
        {
            "figure": f"{form}: of which holes between the ROM's objects, filled",
            "value": f["rom_holes_filled_bytes"] / KIB if f["rom_holes_filled_bytes"] is not None else None,
            "unit": "KiB",
        },
        {
            "figure": f"{form}: firmware share (heapsize - ROM at boot)",
            "value": share / KIB if share else None,
            "unit": "KiB",
            "goal": "<= 48 KiB",
            "met": share is not None and share <= 48 * KIB,
        },
        {
            "figure": f"{form}: firmware's largest live heap",
            "value": live / KIB if live else None,
            "unit": "KiB",
        },
        {
            "figure": f"{form}: the firmware on flash ({where})",
            "value": f["firmware_code_bytes"] / KIB,
            "unit": "KiB",
        },
        {
            "figure": f"{form}: replay rate after a WiFi outage",
            "value": rate,
            "unit": "x real time",
            "goal": ">= 20x",
            "met": rate is not None and rate >= 20,
        },
    ]


if __name__ == "__main__":
    main()
