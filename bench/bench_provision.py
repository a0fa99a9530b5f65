"""Reprovisioning time for 1 board vs 20 boards, and the bytes a config-only change sends.

A copy of the demo inventory with 20 virtual boards (`vboard fleet`, consoles on
socket://127.0.0.1:7301..7320) is provisioned once with `make provision` (every file travels),
then a config-only change (`board_health_s`, which only config.json holds) is pushed with
`make reprovision`, alternately to one board (`--limit vb-01`) and to all 20, ROUNDS times each:
the same make target, playbook and real mpremote users run. Then one more run of all 20 with
nothing changed (what a second run costs). The boards need no broker for this.

    .venv/bin/python bench/bench_provision.py --out bench/_work/bench_provision.json [--boards 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vboard.broker import wait_for_port  # noqa: E402
from vboard.procs import stop_process  # noqa: E402

DEMO = REPO / "inventory" / "demo"
VENV_BIN = REPO / ".venv" / "bin"
FIRST_PORT = 7301
ROUNDS = 3
TOTALS = re.compile(r"changed=(\d+) unchanged=(\d+) failed=(\d+) not_connected=(\d+) bytes_sent=(\d+)")


def inventory_of(boards: int, dest: Path) -> list[str]:
    """The demo inventory with `boards` virtual boards instead of five (the boards beyond the
    vault's five get a throwaway MQTT password in this scratch copy: nothing here reaches git)."""
    shutil.copytree(DEMO, dest)
    hosts_file = dest / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    template = hosts["all"]["children"]["boards"]["hosts"]["vb-01"]["vboard"]
    names = [f"vb-{i:02d}" for i in range(1, boards + 1)]
    hosts["all"]["children"]["boards"]["hosts"] = {
        name: {
            "vboard": {**template, "console_port": FIRST_PORT + i, "seed": i + 1},
            **({} if i < 5 else {"board_mqtt_password": f"bench-{name}"}),
        }
        for i, name in enumerate(names)
    }
    hosts_file.write_text(yaml.safe_dump(hosts, sort_keys=False))
    return names


def group_cpu_s(pgid: int) -> float:
    """CPU seconds used so far by the processes of a process group (the virtual boards'), with
    their waited-for children."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CPU: dict[str, float] = {}  # CPU seconds of the last make() run: make's tree, and the boards'
FLEET_PGID = 0


def make(
    target: str, root: Path, inventory: Path, extra: dict[str, Any], *playbook_args: str
) -> tuple[float, str]:
    extra_file = root / f"extra-{time.monotonic_ns()}.json"
    extra_file.write_text(json.dumps(extra))
    command = [
        "make",
        "--no-print-directory",
        "-C",
        str(REPO),
        target,
        f"INVENTORY={inventory}",
        f"BUILD_DIR={root / 'build'}",
        f"VAULT_PASSWORD_FILE={DEMO / 'demo-vault-password.txt'}",
        "PLAYBOOK_ARGS=" + " ".join([f"-e @{extra_file}", *playbook_args]),
    ]
    start, cpu, boards_cpu = time.monotonic(), children_cpu_s(), group_cpu_s(FLEET_PGID)
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    elapsed = time.monotonic() - start
    CPU["controller"] = children_cpu_s() - cpu
    CPU["boards"] = group_cpu_s(FLEET_PGID) - boards_cpu
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    return elapsed, result.stdout


def totals(output: str) -> dict[str, int]:
    found = TOTALS.findall(output)
    if not found:
        raise RuntimeError(f"no totals line in:\n{output[-2000:]}")
    changed, unchanged, failed, not_connected, sent = (int(v) for v in found[-1])
    return {
        "changed": changed,
        "unchanged": unchanged,
        "failed": failed,
        "not_connected": not_connected,
        "bytes_sent": sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--boards", type=int, default=20, help="boards of the large run (default 20)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-provision-"))
    inventory = root / "inventory"
    names = inventory_of(args.boards, inventory)
    log = (root / "fleet.log").open("wb")
    fleet = subprocess.Popen(
        [str(VENV_BIN / "vboard"), "fleet", str(inventory), "--workdir", str(root / "fleet")],
        stdout=log,
        stderr=log,
        start_new_session=True,
        env=dict(os.environ, VAULT_PASSWORD_FILE=str(DEMO / "demo-vault-password.txt")),
    )
    global FLEET_PGID
    FLEET_PGID = fleet.pid
    try:
        for i in range(len(names)):
            wait_for_port(FIRST_PORT + i, 180)
        time.sleep(1.0)
        first_s, out = make("provision", root, inventory, {})
        first = totals(out)
        print(f"first provision of {len(names)} boards: {first_s:.1f} s, {first}", flush=True)
        one: list[float] = []
        many: list[float] = []
        one_totals: list[dict[str, int]] = []
        many_totals: list[dict[str, int]] = []
        one_cpu: list[dict[str, float]] = []
        many_cpu: list[dict[str, float]] = []
        health = 40
        for _ in range(ROUNDS):
            health += 1
            seconds, out = make(
                "reprovision", root, inventory, {"board_health_s": health}, "--limit", names[0]
            )
            one.append(seconds)
            one_totals.append(totals(out))
            one_cpu.append(dict(CPU))
            health += 1
            seconds, out = make("reprovision", root, inventory, {"board_health_s": health})
            many.append(seconds)
            many_totals.append(totals(out))
            many_cpu.append(dict(CPU))
            print(f"1 board {one[-1]:.1f} s {one_totals[-1]} CPU {one_cpu[-1]}", flush=True)
            print(f"{len(names)} boards {many[-1]:.1f} s {many_totals[-1]} CPU {many_cpu[-1]}", flush=True)
        idle_s, out = make("reprovision", root, inventory, {"board_health_s": health})
        idle = totals(out)
        print(f"second run, nothing changed: {idle_s:.1f} s {idle}")
    finally:
        stop_process(fleet, 60, group=True)
        log.close()
    for run in [*one_totals, *many_totals]:
        if run["failed"] or run["not_connected"]:
            raise SystemExit(f"a board failed: {run}")
    if any(r["changed"] != 1 for r in one_totals) or any(r["changed"] != len(names) for r in many_totals):
        raise SystemExit(f"unexpected changes: {one_totals} {many_totals}")
    ratio = statistics.median(many) / statistics.median(one)
    per_board = statistics.median(r["bytes_sent"] / r["changed"] for r in many_totals)
    first_per_board = first["bytes_sent"] / len(names)
    many_cpu_controller = statistics.median(c["controller"] for c in many_cpu)
    many_cpu_boards = statistics.median(c["boards"] for c in many_cpu)
    one_cpu_controller = statistics.median(c["controller"] for c in one_cpu)
    one_cpu_boards = statistics.median(c["boards"] for c in one_cpu)
    shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "provision",
        "boards": len(names),
        "rounds": ROUNDS,
        "first_provision_s": round(first_s, 1),
        "first_provision": first,
        "reprovision_1_board_s": [round(s, 1) for s in one],
        f"reprovision_{len(names)}_boards_s": [round(s, 1) for s in many],
        "cpu_s_1_board": one_cpu,
        f"cpu_s_{len(names)}_boards": many_cpu,
        "cpus": os.cpu_count(),
        "second_run_nothing_changed_s": round(idle_s, 1),
        "second_run": idle,
        "summary": [
            {
                "figure": f"reprovision, config-only change: {len(names)} boards vs 1 (median of {ROUNDS})",
                "value": round(ratio, 2),
                "unit": f"x ({statistics.median(many):.1f} s vs {statistics.median(one):.1f} s)",
                "goal": "<= 2x",
                "met": ratio <= 2,
            },
            {
                "figure": f"CPU of a {len(names)}-board reprovision (median): Ansible + mpremote / boards",
                "value": f"{many_cpu_controller:.0f} / {many_cpu_boards:.0f}",
                "unit": f"CPU-s on {os.cpu_count()} CPUs "
                f"(1 board: {one_cpu_controller:.0f} / {one_cpu_boards:.0f})",
            },
            {
                "figure": "bytes sent per board on a config-only change",
                "value": round(per_board),
                "unit": "B (config.json + manifest.json)",
            },
            {
                "figure": "bytes sent per board on the first provision",
                "value": round(first_per_board),
                "unit": "B",
            },
            {
                "figure": f"second run, nothing changed ({len(names)} boards)",
                "value": round(idle_s, 1),
                "unit": f"s, {idle['bytes_sent']} B sent, changed={idle['changed']}",
            },
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
