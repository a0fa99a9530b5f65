#!/usr/bin/env python3
"""The per-board summary of a provisioning run, and the retry file for the boards that need another.

    fleet_summary.py --run-dir build/provision [--retry-file build/provision/retry]

site.yml writes, under the run folder, `targets.json` (every board the run was meant to touch),
`status.json` (what happened to each board that reached the flash/upload play: changed /
unchanged / failed / not_connected, files and bytes sent) and `status/<board>.json` for a board
whose build failed. A board without a status file never got that far (its build failed, or
the run was interrupted) and counts as failed. Prints one table row per board and a totals line,
writes the boards that failed or were not connected to the retry file (`make reprovision RETRY=1`
passes it to --limit), and exits 0 only if every board is changed or unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("changed", "unchanged", "failed", "not_connected")
NEEDS_RETRY = ("failed", "not_connected")


@dataclass
class BoardResult:
    host: str
    status: str
    sent_files: list[str] = field(default_factory=list)
    sent_bytes: int = 0
    removed: list[str] = field(default_factory=list)
    flashed: bool = False
    config_hash: str | None = None
    message: str = ""

    @classmethod
    def from_status(cls, host: str, data: dict[str, Any]) -> BoardResult:
        status = data.get("status")
        return cls(
            host=host,
            status=status if status in STATUSES else "failed",
            sent_files=list(data.get("sent_files") or []),
            sent_bytes=int(data.get("sent_bytes") or 0),
            removed=list(data.get("removed") or []),
            flashed=bool(data.get("flashed")),
            config_hash=data.get("config_hash"),
            message=str(data.get("message") or ""),
        )


def collect(run_dir: Path) -> list[BoardResult]:
    targets_file = run_dir / "targets.json"
    targets: list[str] = json.loads(targets_file.read_text()) if targets_file.exists() else []
    found: dict[str, dict[str, Any]] = {}
    status_dir = run_dir / "status"  # one file per board whose build failed
    for path in sorted(status_dir.glob("*.json")) if status_dir.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            found[path.stem] = json.loads(path.read_text())
    combined = run_dir / "status.json"  # every board that reached the flash/upload play
    if combined.exists():
        with contextlib.suppress(ValueError):
            found.update(json.loads(combined.read_text()))
    results = []
    for host in sorted(set(targets) | set(found)):
        if isinstance(found.get(host), dict):
            results.append(BoardResult.from_status(host, found[host]))
        else:
            results.append(
                BoardResult(host, "failed", message="no result: it failed before the upload (see above)")
            )
    return results


def counts(results: list[BoardResult]) -> dict[str, int]:
    return {status: sum(1 for r in results if r.status == status) for status in STATUSES}


def table(results: list[BoardResult]) -> str:
    header = ("board", "status", "files", "bytes", "flashed", "config", "detail")
    rows = [header]
    for r in results:
        touched = r.status in ("changed", "unchanged")
        rows.append(
            (
                r.host,
                r.status.replace("_", " "),
                str(len(r.sent_files) + len(r.removed)) if touched else "-",
                str(r.sent_bytes) if touched else "-",
                ("yes" if r.flashed else "no") if touched else "-",
                (r.config_hash or "-") if touched else "-",
                (
                    ", ".join(r.sent_files + [f"-{name}" for name in r.removed]) if touched else r.message
                ).replace("\n", " ")[:100],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def totals(results: list[BoardResult]) -> str:
    c = counts(results)
    return (
        " ".join(f"{status}={c[status]}" for status in STATUSES)
        + f" bytes_sent={sum(r.sent_bytes for r in results)}"
    )


def retry_hosts(results: list[BoardResult]) -> list[str]:
    return [r.host for r in results if r.status in NEEDS_RETRY]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("build/provision"))
    parser.add_argument("--retry-file", type=Path)
    args = parser.parse_args(argv)
    results = collect(args.run_dir)
    if not results:
        print("no board was targeted (check the inventory and DEVICE=)")
        return 1
    print(table(results))
    print(totals(results))
    retry = retry_hosts(results)
    retry_file = args.retry_file or args.run_dir / "retry"
    retry_file.parent.mkdir(parents=True, exist_ok=True)
    retry_file.write_text("".join(host + "\n" for host in retry))
    if retry:
        print(f"{len(retry)} board(s) to retry, listed in {retry_file}: make reprovision RETRY=1")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
