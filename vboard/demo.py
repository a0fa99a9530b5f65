"""`make demo`: the whole system on this machine, in about a minute.

A local broker (mosquitto if installed, else the embedded amqtt), three virtual boards of
inventory/demo provisioned through the same build and upload path as a real lab
(`ansible-playbook site.yml --tags build,upload`, the real mpremote), the recorder writing
HDF5, and a live table of the fleet while the boards sample at accelerated simulated time. At
the end: the recorded files' summary and a PNG plot per board. Ctrl-C stops early and cleanly;
everything started here is stopped here.

    .venv/bin/python -m vboard.demo --duration 60 --speed 60
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from vboard.broker import Amqtt, Mosquitto, local_broker
from vboard.fleet import Fleet
from vboard.inventory import from_inventory, vault_password_file

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
console = Console()


class DemoError(click.ClickException):
    pass


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    with console.status(text):
        start = time.monotonic()
        yield
    console.print(f"[green]✓[/green] {text} ({time.monotonic() - start:.1f} s)")


def provision(inventory: Path, boards: list[str], broker_port: int, build_dir: Path, log: Path) -> None:
    """The users' path: build (render, validate, mpy-cross) and upload (mpremote) with site.yml."""
    cmd = [
        str(BIN / "ansible-playbook"),
        "site.yml",
        "-i",
        str(inventory),
        "--limit",
        ",".join(boards),
        "--tags",
        "build,upload",
        "-e",
        json.dumps({"mqtt_broker_port": broker_port, "labfleet_build_dir": str(build_dir)}),
    ]
    vault = vault_password_file(inventory)
    if vault is not None:
        cmd += ["--vault-password-file", str(vault)]
    with log.open("w") as out:
        result = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise DemoError(f"provisioning failed (full log: {log}):\n{tail}")


def start_recorder(port: int, data_dir: Path, log: Path, mqtt5: bool) -> subprocess.Popen[bytes]:
    # the embedded amqtt speaks MQTT 3.1.1 only
    protocol = "5" if mqtt5 else "3.1.1"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recorder", "record", "--host", "127.0.0.1", "--port", str(port),
             "--protocol", protocol, "--client-id", "demo-recorder", "--data-dir", str(data_dir),
             "--flush-s", "1"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(data_dir: Path, plots: Path, devices: list[str]) -> None:
    info = subprocess.run([sys.executable, "-m", "recorder", "info", str(data_dir)], cwd=REPO)
    if info.returncode != 0:
        raise DemoError("the recorder's files could not be summarised")
    plots.mkdir(parents=True, exist_ok=True)
    for device in devices:
        out = plots / f"{device}.png"
        subprocess.run(
            [sys.executable, "-m", "recorder", "plot", str(data_dir), "--device", device, "-o", str(out)],
            cwd=REPO,
            check=False,
        )


@click.command(help=__doc__)
@click.option(
    "--duration",
    type=click.FloatRange(min=5),
    default=60,
    show_default=True,
    help="Wall-clock seconds of recording.",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=1, max=120),
    default=60,
    show_default=True,
    help="Simulated seconds per real second (60: an hour of data in a minute).",
)
@click.option(
    "--boards",
    type=click.IntRange(1, 5),
    default=3,
    show_default=True,
    help="How many boards of the demo inventory to run.",
)
@click.option(
    "--inventory",
    type=click.Path(exists=True, path_type=Path),
    default=REPO / "inventory" / "demo",
    show_default=True,
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=REPO / "var" / "demo",
    show_default=True,
    help="Broker, boards, build, recorded data, logs and plots (emptied first).",
)
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="auto: mosquitto if installed, else the embedded amqtt.",
)
def main(
    duration: float, speed: float, boards: int, inventory: Path, workdir: Path, broker_kind: str
) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    logs = workdir / "logs"
    logs.mkdir()
    with step("reading the demo inventory"):
        specs, lan = from_inventory(inventory)
    specs = specs[:boards]
    for spec in specs:
        if spec.console_port and not port_free(spec.console_port):
            raise DemoError(
                f"port {spec.console_port} ({spec.name}'s console) is in use: is `vboard fleet` or another "
                "demo running?"
            )
    broker: Mosquitto | Amqtt
    if broker_kind == "amqtt":
        broker = Amqtt(workdir / "broker")
    elif broker_kind == "mosquitto":
        broker = Mosquitto(workdir / "broker")
    else:
        broker = local_broker(workdir / "broker")
    recorder: subprocess.Popen[bytes] | None = None
    fleet = Fleet(workdir / "boards", speed=speed, lan=lan)
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        with step(f"starting {type(broker).__name__.lower()} on 127.0.0.1:{broker.port}"):
            broker.start()
        with step(f"starting {len(specs)} virtual boards at {speed:g}x simulated time"):
            fleet.start()
            started = [fleet.add(spec) for spec in specs]
        with step("provisioning them with site.yml (build: render + mpy-cross; upload: mpremote)"):
            provision(
                inventory, [s.name for s in specs], broker.port, workdir / "build", logs / "provision.log"
            )
        with step("starting the recorder"):
            recorder = start_recorder(
                broker.port, workdir / "data", logs / "recorder.log", mqtt5=isinstance(broker, Mosquitto)
            )
        live_view(
            fleet,
            broker.port,
            duration,
            lambda: stop_requested or recorder is None or recorder.poll() is not None,
        )
        if recorder.poll() is not None:
            raise DemoError(f"the recorder stopped (exit {recorder.returncode}); see {logs / 'recorder.log'}")
    finally:
        signal.signal(signal.SIGINT, previous)
        with step("stopping the recorder, the boards and the broker"):
            if recorder is not None:
                stop_process(recorder)
            fleet.stop()
            broker.stop()
    console.rule("recorded")
    summarize(workdir / "data", workdir / "plots", [s.name for s in specs])
    console.print(f"\nplots: {workdir / 'plots'}   data: {workdir / 'data'}   logs: {logs}")
    for board in started:
        console.print(f"  {board.name}: console log {board.workdir / 'console.log'}")


def live_view(fleet: Fleet, port: int, duration: float, stopped: object) -> None:
    from recorder.fleet import Fleet as FleetView
    from recorder.fleet import watch

    view = FleetView()
    client = watch(view, "127.0.0.1", port)
    progress = Progress(
        TextColumn("recording"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[sim]}"),
        console=console,
    )
    task = progress.add_task("recording", total=duration, sim="")
    start = time.monotonic()
    sim_start = fleet.clock.now()
    assert callable(stopped)
    try:
        with Live(Group(view.table(time.time()), progress), console=console, refresh_per_second=2) as live:
            while not stopped() and (elapsed := time.monotonic() - start) < duration:
                sim = (fleet.clock.now() - sim_start) / 3600
                progress.update(task, completed=elapsed, sim=f"{sim:.2f} simulated hours (Ctrl-C stops)")
                live.update(Group(view.table(time.time()), progress))
                time.sleep(0.5)
    finally:
        client.loop_stop()
        client.disconnect()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
