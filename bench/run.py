"""`make bench`: run every benchmark, then write bench/results.json and bench/REPORT.md.

Each benchmark is a standalone script in bench/ that takes `--out FILE.json` and measures what
it compares side by side in one run (machines here are shared and noisy: ratios measured
together are what mean something). A script's JSON may carry a `summary` list of
{"figure", "value", "unit", "goal", "met"} rows for the report; everything else it writes is
kept in results.json as it is. Every figure in the report comes with the command that
reproduces it.

    .venv/bin/python bench/run.py                 # all benchmarks
    .venv/bin/python bench/run.py --only recorder # those whose name contains "recorder"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "_work"


def benchmarks() -> list[Path]:
    return sorted(p for p in BENCH.glob("bench_*.py"))


def command_for(script: Path) -> str:
    return f".venv/bin/python bench/{script.name} --out bench/_work/{script.stem}.json"


def run_one(script: Path) -> dict[str, Any]:
    out = WORK / f"{script.stem}.json"
    out.unlink(missing_ok=True)
    start = time.monotonic()
    print(f"== {script.name}", flush=True)
    proc = subprocess.run([sys.executable, str(script), "--out", str(out)], cwd=REPO)
    elapsed = time.monotonic() - start
    entry: dict[str, Any] = {
        "command": command_for(script),
        "seconds": round(elapsed, 1),
        "exit": proc.returncode,
    }
    if proc.returncode == 0 and out.exists():
        entry["results"] = json.loads(out.read_text())
    else:
        entry["error"] = f"exit status {proc.returncode}" + ("" if out.exists() else ", no results written")
    return entry


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def flatten(prefix: str, value: Any, rows: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), sub, rows)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, sub in enumerate(value):
            flatten(f"{prefix}[{i}]", sub, rows)
    else:
        rows.append((prefix, value))


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Benchmark report",
        "",
        f"Generated {report['generated']} on {report['machine']} by `make bench` (bench/run.py).",
        "Figures compared with each other were measured side by side in the same run.",
        "",
    ]
    for name, entry in report["benchmarks"].items():
        lines += [f"## {name}", "", f"Reproduce: `{entry['command']}` ({entry['seconds']} s)", ""]
        if "error" in entry:
            lines += [f"**Failed**: {entry['error']}", ""]
            continue
        results = entry["results"]
        summary = results.get("summary")
        prose = WORK / f"bench_{name}.md"
        if summary:
            lines += ["| Figure | Value | Goal | Met |", "| --- | --- | --- | --- |"]
            for row in summary:
                value = f"{fmt(row.get('value'))} {row.get('unit', '')}".strip()
                met = {True: "yes", False: "**no**", None: ""}[row.get("met")]
                lines.append(f"| {row['figure']} | {value} | {row.get('goal', '')} | {met} |")
            lines.append("")
        elif not prose.exists():
            rows: list[tuple[str, Any]] = []
            flatten("", {k: v for k, v in results.items() if k != "summary"}, rows)
            lines += ["| Measurement | Value |", "| --- | --- |"]
            lines += [f"| {key} | {fmt(value)} |" for key, value in rows[:60]]
            lines.append("")
        if results.get("notes"):
            lines += [str(results["notes"]), ""]
        if prose.exists():  # the benchmark's own account of what it measured, in full
            lines += [prose.read_text().replace("\n## ", "\n### ").removeprefix("## ").strip(), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run only benchmarks whose name contains this"
    )
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    results_path = BENCH / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    selected = [s for s in benchmarks() if not args.only or any(o in s.stem for o in args.only)]
    if not selected:
        print(f"no benchmark matches {args.only}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        # a partial run (--only) keeps the other benchmarks' last results
        "benchmarks": dict(previous.get("benchmarks", {})) if args.only else {},
    }
    for script in selected:
        report["benchmarks"][script.stem.removeprefix("bench_")] = run_one(script)
    results_path.write_text(json.dumps(report, indent=2) + "\n")
    (BENCH / "REPORT.md").write_text(render(report))
    print(f"wrote {results_path.relative_to(REPO)} and bench/REPORT.md")
    failed = [n for n, e in report["benchmarks"].items() if "error" in e]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
