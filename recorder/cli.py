"""labfleet-recorder: record the fleet to HDF5, and look at what was recorded.

labfleet-recorder record --config recorder.toml
labfleet-recorder info data/
labfleet-recorder export data/ --device lab-01 --start 2025-03-01 --stop 2025-03-02 -o lab01.csv
labfleet-recorder plot data/ --device lab-01 --start 2025-03-01T08:00 -o lab01.png
labfleet-recorder status --host 192.168.1.10
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from firmware import protocol

EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Record a labfleet (every board, nothing lost) to HDF5 and read it back."""


@cli.command()
@click.option("-c", "--config", "config_path", type=EXISTING_FILE)
@click.option("--host")
@click.option("--port", type=int)
@click.option("--protocol", "protocol_", type=click.Choice(["5", "3.1.1"]))
@click.option("--client-id")
@click.option("--username")
@click.option("--password", envvar="LABFLEET_MQTT_PASSWORD", help="or $LABFLEET_MQTT_PASSWORD")
@click.option("--tls/--no-tls", default=None)
@click.option("--ca-file")
@click.option("--prefix")
@click.option("--share-group", help="MQTT shared subscription group ($share/GROUP/...) for scale-out")
@click.option("--legacy/--no-legacy", default=None, help="also record 2017-firmware boards")
@click.option("--data-dir")
@click.option("--shard", help="name part of this recorder's files (each recorder of a group its own)")
@click.option("--rotation", type=click.Choice(["daily", "hourly"]))
@click.option("--flush-s", type=float)
@click.option("--stats-file", help="append one JSON line per HDF5 flush (for benchmarks)")
@click.option("--log-level")
def record(config_path: Path | None, protocol_: str | None, **flags: Any) -> None:
    """Run the recorder service until SIGTERM/SIGINT."""
    from recorder.config import ConfigError, load
    from recorder.service import Service, configure_logging

    flags["protocol"] = protocol_
    try:
        settings = load(config_path, flags)
    except (ConfigError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(settings.log_level, "recorder")
    sys.exit(Service(settings).run())


@cli.command(hidden=True)
@click.option("--settings", "settings_json", required=True)
def writer(settings_json: str) -> None:
    """The HDF5 writer process (started by `record`)."""
    # HDF5's own lock on a file open for writing would keep people (info, export, h5dump) out of
    # today's file all day; the writer lock in the state directory already keeps a second writer
    # out. HDF5 reads this once, when the library loads: before the first `import tables`.
    os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"
    from recorder import writer as writer_module
    from recorder.config import Settings
    from recorder.service import configure_logging

    settings = Settings.from_json(settings_json)
    configure_logging(settings.log_level, "writer")
    sys.exit(writer_module.run(settings))


@cli.command()
@click.argument("files", nargs=-1, required=True, type=EXISTING_FILE)
def compact(files: tuple[Path, ...]) -> None:
    """Compress and index closed data files (the writer does this after each rotation)."""
    from recorder.store import compact as compact_file

    for path in files:
        done = compact_file(path)
        click.echo(f"{path}: {'compressed' if done else 'already closed or busy'}")


def _span(first: float, last: float) -> str:
    def fmt(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))

    return f"{fmt(first)} … {fmt(last)} UTC"


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def info(paths: tuple[Path, ...]) -> None:
    """Devices, time spans, counts, gaps and rejects of data files or directories."""
    from rich.console import Console
    from rich.table import Table

    from recorder import layout
    from recorder.read import summarize

    summary = summarize(paths)
    console = Console()
    files = Table(title="files")
    files.add_column("file")
    files.add_column("state")
    for table_name in layout.TABLES:
        files.add_column(table_name, justify="right")
    for name, state, counts in summary.files:
        files.add_row(name, state, *(str(counts[table_name]) for table_name in layout.TABLES))
    console.print(files)
    devices = Table(title="devices")
    for name in ("device", "samples", "span (t)", "boots", "missing seq", "s without sample", "duplicates"):
        devices.add_column(name, justify="left" if name in ("device", "span (t)") else "right")
    for d in summary.devices:
        devices.add_row(
            d.device,
            str(d.samples),
            _span(d.first, d.last),
            str(d.boots),
            str(d.missing),
            str(d.unsampled_s),
            str(d.duplicates),
        )
    console.print(devices)
    if summary.rejects:
        rejects = Table(title="rejects by reason")
        rejects.add_column("reason")
        rejects.add_column("count", justify="right")
        for reason, count in summary.rejects:
            rejects.add_row(reason, str(count))
        console.print(rejects)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--device", help="one device (default: all)")
@click.option("--start", help="UTC time or date, inclusive (ISO 8601 or Unix seconds)")
@click.option("--stop", help="UTC time or date, exclusive")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "parquet"]), help="default: from the file extension"
)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def export(
    paths: tuple[Path, ...],
    device: str | None,
    start: str | None,
    stop: str | None,
    fmt: str | None,
    out: Path,
) -> None:
    """Samples of a device and time range to CSV or Parquet."""
    from recorder.read import read_samples

    frame = read_samples(paths, device=device, start=_time_arg(start), stop=_time_arg(stop))
    fmt = fmt or ("parquet" if out.suffix == ".parquet" else "csv")
    if fmt == "parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)
    click.echo(f"{len(frame)} samples -> {out}")


def _time_arg(value: str | None) -> float | str | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--device", required=True)
@click.option("--start", help="UTC time or date, inclusive")
@click.option("--stop", help="UTC time or date, exclusive")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def plot(paths: tuple[Path, ...], device: str, start: str | None, stop: str | None, out: Path) -> None:
    """A device's temperatures and humidity over a time range, to PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recorder.read import read_samples

    frame = read_samples(paths, device=device, start=_time_arg(start), stop=_time_arg(stop))
    if frame.empty:
        raise click.ClickException(f"no samples of {device!r} in that range")
    fig, (temps, humidity) = plt.subplots(2, 1, sharex=True, figsize=(11, 6))
    temps.plot(frame["time"], frame["kT"], label="kT (thermocouple)", linewidth=0.8)
    temps.plot(frame["time"], frame["aT"], label="aT (ambient)", linewidth=0.8)
    temps.set_ylabel("°C")
    temps.legend(loc="upper right")
    humidity.plot(frame["time"], frame["aH"], color="tab:green", linewidth=0.8)
    humidity.set_ylabel("%RH")
    humidity.set_xlabel("time (UTC)")
    fig.suptitle(f"{device}: {len(frame)} samples")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    click.echo(f"{len(frame)} samples -> {out}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=1883, show_default=True)
@click.option("--prefix", default=protocol.DEFAULT_PREFIX, show_default=True)
@click.option("--username")
@click.option("--password", envvar="LABFLEET_MQTT_PASSWORD")
@click.option("--tls/--no-tls", default=False)
@click.option("--ca-file")
@click.option("--once", is_flag=True, help="collect for --wait seconds, print one table, exit")
@click.option("--wait", type=float, default=2.0, show_default=True)
def status(
    host: str,
    port: int,
    prefix: str,
    username: str | None,
    password: str | None,
    tls: bool,
    ca_file: str | None,
    once: bool,
    wait: float,
) -> None:
    """A live table of the fleet: online/offline, last sample age, values, backlog, RSSI."""
    from rich.console import Console
    from rich.live import Live

    from recorder.fleet import Fleet, watch

    fleet = Fleet(prefix)
    try:
        client = watch(fleet, host, port, username, password, tls, ca_file)
    except OSError as exc:
        raise click.ClickException(f"cannot connect to {host}:{port}: {exc}") from None
    console = Console()
    try:
        if once:
            time.sleep(wait)
            console.print(fleet.table(time.time()))
            return
        with Live(fleet.table(time.time()), console=console, refresh_per_second=2) as live:
            while True:
                time.sleep(1)
                live.update(fleet.table(time.time()))
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()


def main() -> None:
    cli()
