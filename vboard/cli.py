"""`vboard`: run virtual ESP8266 boards that execute real MicroPython firmware.

\b
    vboard run --name lab-01 --port 7001 --speed 60        one board, console on socket://127.0.0.1:7001
    vboard fleet inventory/demo                              every board of an Ansible inventory
    vboard fleet scenario.yml                                a scenario file (boards, LAN, timed faults)
    vboard ctl wifi_drop board=lab-01 seconds=3600           fault injection into a running fleet
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from vboard import control, flashfs
from vboard.board import prepare_flash
from vboard.fleet import Fleet
from vboard.inventory import default_workdir, from_inventory, looks_like_inventory
from vboard.scenario import Scenario, load_scenario
from vboard.spec import BoardSpec, SpecError, board_workdir

WORKDIR_HELP = (
    "Directory for the boards' flash, logs and control socket (default: $TMPDIR/vboard). "
    "A board's flash survives restarts of vboard in the same directory."
)


async def _serve_fleet(scenario: Scenario, workdir: Path, flash_from: dict[str, Path]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(workdir, speed=scenario.speed, start_time=scenario.start, lan=scenario.lan)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await fleet.astart()
    server = await control.serve(fleet, workdir / control.CONTROL_SOCKET)
    try:
        for spec in scenario.boards:
            source = flash_from.get(spec.name)
            if source is not None:
                prepare_flash(board_workdir(workdir, spec.name) / "flash.bin", spec, _host_tree(source))
            board = await fleet.aadd(spec)
            click.echo(f"{board.name:<16} {board.url:<28} log {board.workdir / 'console.log'}")
        (workdir / "fleet.json").write_text(
            json.dumps(
                {b.name: {"url": b.url, "port": b.console.port} for b in fleet.boards.values()}, indent=2
            )
        )
        click.echo(
            f"{len(fleet.boards)} board(s) at {fleet.clock.speed:g}x simulated time; "
            f"control: vboard ctl --workdir {workdir} ...; Ctrl-C stops",
        )
        events = asyncio.ensure_future(control.run_events(fleet, scenario.events))
        await stop.wait()
        events.cancel()
    finally:
        server.close()
        await fleet.astop()
        with contextlib.suppress(FileNotFoundError):
            (workdir / control.CONTROL_SOCKET).unlink()
        click.echo("stopped")


def _host_tree(source: Path) -> dict[str, bytes]:
    if not source.is_dir():
        raise click.BadParameter(f"{source} is not a directory", param_hint="--flash-from")
    return flashfs.tree(source)


def _run(scenario: Scenario, workdir: Path, flash_from: dict[str, Path] | None = None) -> None:
    try:
        asyncio.run(_serve_fleet(scenario, workdir, flash_from or {}))
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot start the boards: {e}") from None


@click.group(help=__doc__)
def main() -> None:
    pass


@main.command()
@click.option("--name", required=True, help="Board name (also its directory under --workdir).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="TCP port of the serial console (0: any free port).",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0.001),
    default=None,
    help="Simulated seconds per real second (default: the scenario's, else 1).",
)
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Scenario file: the LAN, timed events, and this board's settings if it lists it.",
)
@click.option(
    "--thermocouple",
    type=click.Choice(["MAX6675", "MAX31855", "none"]),
    default=None,
    help="Thermocouple converter on SPI(1) (default MAX6675).",
)
@click.option(
    "--ambient",
    type=click.Choice(["SHT30", "SHT20", "none"]),
    default=None,
    help="Ambient T/RH sensor on I2C (default SHT30).",
)
@click.option("--seed", type=int, default=None, help="Seed of the simulated physical signals.")
@click.option("--heapsize", default=None, help="MicroPython -X heapsize (e.g. 96K; default auto).")
@click.option(
    "--firmware-variant",
    type=click.Choice(["default", "FLASH_2M_ROMFS"]),
    default=None,
    help="ESP8266_GENERIC variant a new board comes with; FLASH_2M_ROMFS maps a ROMFS partition "
    "(mpremote romfs deploy) at /rom.",
)
@click.option(
    "--flash-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Copy this directory's files into the board's filesystem before it starts (e.g. build/lab-01).",
)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None, help=WORKDIR_HELP)
def run(
    name: str,
    port: int,
    speed: float | None,
    scenario: Path | None,
    thermocouple: str | None,
    ambient: str | None,
    seed: int | None,
    heapsize: str | None,
    firmware_variant: str | None,
    flash_from: Path | None,
    workdir: Path | None,
) -> None:
    """Run one virtual board until Ctrl-C."""
    try:
        loaded = load_scenario(scenario) if scenario else Scenario()
        listed = {b.name: b for b in loaded.boards}
        spec = listed.get(name) or BoardSpec(name=name)
        overrides: dict[str, Any] = {}
        if port:
            overrides["console_port"] = port
        if thermocouple is not None:
            overrides["thermocouple"] = None if thermocouple == "none" else thermocouple
        if ambient is not None:
            overrides["ambient"] = None if ambient == "none" else ambient
        if seed is not None:
            overrides["seed"] = seed
        if heapsize is not None:
            overrides["heapsize"] = heapsize
        if firmware_variant is not None:
            overrides["firmware_variant"] = "" if firmware_variant == "default" else firmware_variant
        for key, value in overrides.items():
            setattr(spec, key, value)
        spec.validate()
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    loaded.boards = [spec]
    loaded.events = [e for e in loaded.events if e.args.get("board") in (None, name)]
    if speed is not None:
        loaded.speed = speed
    _run(loaded, workdir or default_workdir(), {name: flash_from} if flash_from else None)


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--speed",
    type=click.FloatRange(min=0.001),
    default=None,
    help="Simulated seconds per real second (default: the scenario's, else 1).",
)
@click.option("--limit", multiple=True, help="Only these boards (repeatable).")
@click.option(
    "--flash-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A build directory with one subdirectory per board (build/<name>/) to copy onto each flash.",
)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None, help=WORKDIR_HELP)
def fleet(
    source: Path, speed: float | None, limit: tuple[str, ...], flash_from: Path | None, workdir: Path | None
) -> None:
    """Run the boards of an Ansible inventory (hosts with a `vboard:` variable) or of a scenario file."""
    try:
        if looks_like_inventory(source):
            boards, lan = from_inventory(source)
            scenario = Scenario(boards=boards, lan=lan)
        else:
            scenario = load_scenario(source)
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    if limit:
        unknown = set(limit) - {b.name for b in scenario.boards}
        if unknown:
            raise click.ClickException(f"--limit names unknown boards: {', '.join(sorted(unknown))}")
        scenario.boards = [b for b in scenario.boards if b.name in limit]
    if speed is not None:
        scenario.speed = speed
    sources: dict[str, Path] = {}
    if flash_from is not None:
        sources = {b.name: flash_from / b.name for b in scenario.boards if (flash_from / b.name).is_dir()}
    _run(scenario, workdir or default_workdir(), sources)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("action", type=click.Choice(sorted(control.ACTIONS)))
@click.argument("args", nargs=-1)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None, help=WORKDIR_HELP)
def ctl(action: str, args: tuple[str, ...], workdir: Path | None) -> None:
    """Act on a running fleet: ACTION key=value ...

    \b
    Actions:
    """
    parsed: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise click.BadParameter(f"{arg!r} is not key=value", param_hint="ARGS")
        parsed[key] = value
    path = (workdir or default_workdir()) / control.CONTROL_SOCKET
    try:
        result = control.request(path, action, parsed)
    except (ConnectionError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    if result is not None:
        click.echo(json.dumps(result, indent=2, default=str))


assert ctl.help is not None
ctl.help += "\n".join(f"      {name:<15} {text}" for name, text in control.ACTIONS.items())


if __name__ == "__main__":
    sys.exit(main())
