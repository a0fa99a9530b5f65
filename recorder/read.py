"""Reading recorded data: any set of data files (days, shards) as pandas DataFrames.

    from recorder.read import read_samples
    df = read_samples("data/", device="lab-01", start="2025-03-01", stop="2025-03-02")

Times are float64 Unix seconds (UTC) in `t` and `rx`; `time` is the same instant as a
timezone-aware pandas timestamp. Text columns are decoded to str. Rows of several files and
shards are concatenated, sorted by device and time, and duplicates of the same (device, boot,
seq) dropped (there are none within one recorder's dedupe window; across shards or restored
copies there might be).

A single table also opens directly: `pd.read_hdf("data/labfleet-20250301.h5", "samples")`
(pandas reads it as a generic table, without the `time` column or de-duplication across files),
or with PyTables, or `h5dump`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import tables

from recorder import layout

_NUMBER = re.compile(r"\d+")
PathLike: TypeAlias = str | Path
TimeLike: TypeAlias = float | int | str | dt.datetime | pd.Timestamp | None


def data_files(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The data files named or contained (not recursively) in `paths`, sorted by name."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    found: set[Path] = set()
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.update(p for p in path.glob("*" + layout.FILE_SUFFIX) if not p.name.startswith("."))
        else:
            found.add(path)
    return sorted(found, key=lambda p: (layout.period_of_file(p) or 0, p.name))


def to_unix(value: TimeLike) -> float | None:
    """Unix seconds from a number, a datetime or an ISO string; naive times are UTC."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return float(stamp.timestamp())


def _decode(frame: pd.DataFrame) -> pd.DataFrame:
    for column in frame.columns:
        if frame[column].dtype == object or frame[column].dtype.kind == "S":
            frame[column] = [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in frame[column]
            ]
    return frame


def _frame(rows: np.ndarray[Any, Any], decode: bool) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows) if len(rows) else pd.DataFrame(np.zeros(0, dtype=rows.dtype))
    return _decode(frame) if decode else frame


def read_table(path: PathLike, name: str, decode: bool = True) -> pd.DataFrame:
    """One table of one data file."""
    if name not in layout.TABLES:
        raise ValueError(f"no table {name!r} in the layout (tables: {', '.join(layout.TABLES)})")
    with tables.open_file(str(path), "r") as h5:
        return _frame(h5.get_node("/", name).read(), decode)


def read_samples(
    paths: PathLike | Iterable[PathLike],
    device: str | None = None,
    start: TimeLike = None,
    stop: TimeLike = None,
) -> pd.DataFrame:
    """Samples of one device (or all) with start <= t < stop, from every file given."""
    t0, t1 = to_unix(start), to_unix(stop)
    terms: list[str] = []
    condvars: dict[str, Any] = {}
    if device is not None:
        terms.append("(device == dev)")
        condvars["dev"] = device.encode()
    if t0 is not None:
        terms.append("(t >= t0)")
        condvars["t0"] = t0
    if t1 is not None:
        terms.append("(t < t1)")
        condvars["t1"] = t1
    parts = []
    for path in data_files(paths):
        with tables.open_file(str(path), "r") as h5:
            attrs = h5.root._v_attrs
            if t0 is not None and "t_max" in attrs and float(attrs.t_max) < t0:
                continue
            if t1 is not None and "t_min" in attrs and float(attrs.t_min) >= t1:
                continue
            samples = h5.root.samples
            # Values travel as condvars, never inside the expression: a name is only ever data.
            rows = samples.read_where(" & ".join(terms), condvars=condvars) if terms else samples.read()
            parts.append(rows)
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=layout.SAMPLES)
    frame = _frame(rows, decode=True)
    frame = frame.drop_duplicates(["device", "boot", "seq"]).sort_values(["device", "t"], kind="stable")
    frame = frame.reset_index(drop=True)
    frame["time"] = pd.to_datetime(frame["t"], unit="s", utc=True)
    return frame


def read_all(paths: PathLike | Iterable[PathLike], name: str) -> pd.DataFrame:
    """One table across files, in file order."""
    frames = [read_table(path, name) for path in data_files(paths)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return _frame(np.zeros(0, dtype=layout.TABLES[name].dtype), decode=True)
    return pd.concat(frames, ignore_index=True)


@dataclass
class DeviceSummary:
    device: str
    samples: int
    first: float
    last: float
    boots: int
    missing: int  # sequence numbers absent inside each boot's first..last
    duplicates: int
    # Whole seconds in first..last with no sample: a board's reset (the samples it still held in
    # RAM, then its reboot) or a stretch it was powered off shows up here, never silently.
    unsampled_s: int = 0


@dataclass
class Summary:
    files: list[tuple[str, str, dict[str, int]]] = field(default_factory=list)  # name, state, rows
    devices: list[DeviceSummary] = field(default_factory=list)
    rejects: list[tuple[str, int]] = field(default_factory=list)  # reason, count


def summarize(paths: PathLike | Iterable[PathLike]) -> Summary:
    """Per file: state and row counts; per device: samples, time span, boots, missing sequence
    numbers and duplicates; rejects by reason. One file in memory at a time."""
    summary = Summary()
    per_boot: list[pd.DataFrame] = []
    duplicates: dict[bytes, int] = {}
    seconds: dict[bytes, int] = {}
    rejects: dict[str, int] = {}
    for path in data_files(paths):
        with tables.open_file(str(path), "r") as h5:
            counts = {name: int(h5.get_node("/", name).nrows) for name in layout.TABLES}
            summary.files.append((path.name, str(h5.root._v_attrs.state), counts))
            samples = h5.root.samples
            frame = pd.DataFrame({name: samples.col(name) for name in ("device", "boot", "seq", "t")})
            for reason in h5.root.rejects.col("reason"):
                # "sample 3: seq must be ..." and "sample 7: ..." are one kind of reject.
                text = _NUMBER.sub("N", reason.decode("utf-8", "replace"))
                rejects[text] = rejects.get(text, 0) + 1
        if not len(frame):
            continue
        unique = frame.drop_duplicates(["device", "boot", "seq"])
        for device, extra in (frame.groupby("device").size() - unique.groupby("device").size()).items():
            duplicates[device] = duplicates.get(device, 0) + int(extra)
        distinct = unique.assign(t=np.floor(unique["t"])).drop_duplicates(["device", "t"])
        for device, count in distinct.groupby("device").size().items():
            seconds[device] = seconds.get(device, 0) + int(count)
        per_boot.append(
            unique.groupby(["device", "boot"]).agg(
                first_seq=("seq", "min"),
                last_seq=("seq", "max"),
                count=("seq", "size"),
                first=("t", "min"),
                last=("t", "max"),
            )
        )
    summary.rejects = sorted(rejects.items(), key=lambda kv: -kv[1])
    if not per_boot:
        return summary
    boots = (
        pd.concat(per_boot)
        .groupby(level=["device", "boot"])
        .agg({"first_seq": "min", "last_seq": "max", "count": "sum", "first": "min", "last": "max"})
    )
    for device, rows in boots.groupby(level="device", sort=True):
        summary.devices.append(
            DeviceSummary(
                device=device.decode("utf-8", "replace") if isinstance(device, bytes) else str(device),
                samples=int(rows["count"].sum()),
                first=float(rows["first"].min()),
                last=float(rows["last"].max()),
                boots=len(rows),
                missing=int((rows["last_seq"] - rows["first_seq"] + 1 - rows["count"]).clip(lower=0).sum()),
                duplicates=duplicates.get(device, 0),
                unsampled_s=max(
                    0, int(np.floor(rows["last"].max()) - np.floor(rows["first"].min())) + 1 - seconds[device]
                ),
            )
        )
    return summary
