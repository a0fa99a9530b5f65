#!/usr/bin/python
"""Ansible module: put the configured MicroPython release on an ESP8266 with esptool, if needed."""

from __future__ import annotations

import hashlib
import re
import subprocess
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.labfleet_board import (
    INFO_SCRIPT,
    ROMFS_VARIANT,
    BoardError,
    BoardNotConnected,
    board_exec,
    restart_app,
)

DOCUMENTATION = r"""
module: labfleet_flash
short_description: Erase and write the MicroPython firmware image when the board runs another release
description:
  - Asks the board for its MicroPython release over mpremote. A board that does not answer
    (blank, or not MicroPython) counts as a different release.
  - A board that should run the C(FLASH_2M_ROMFS) variant (C(variant)) and has no ROMFS
    partition is flashed too: C(image) must then be that variant's build.
  - When the release differs from C(version), or C(force) is set, verifies the image's sha256
    against C(image_sha256), then runs C(esptool --chip esp8266 erase-flash) and
    C(write-flash --flash-size detect [--flash-mode dio] 0 IMAGE), and asks the board again.
  - The board's files are gone after flashing: run the upload (board_files) next.
  - Check mode reports whether it would flash.
options:
  port: {description: The board's serial port or pyserial URL., type: str, required: true}
  version: {description: The MicroPython release wanted, e.g. 1.27.0., type: str, required: true}
  variant:
    description: The ESP8266_GENERIC variant wanted, C("") or C(FLASH_2M_ROMFS) (a ROMFS partition).
    type: str
    default: ""
  image: {description: Path of the firmware .bin on the USB host., type: path}
  image_sha256: {description: Pinned sha256 of the image., type: str}
  force: {description: Flash even when the release matches., type: bool, default: false}
  installed_release:
    description: The release the board reported earlier (an earlier probe), for the diff and result.
    type: str
  restart_app:
    description: After only asking the board (no flashing), restart its application (the question stopped it).
    type: bool
    default: true
  probe_only:
    description: Only say whether flashing is needed (C(needs_flash)); never changes anything.
    type: bool
    default: false
  chip: {description: esptool --chip., type: str, default: esp8266}
  baud: {description: esptool --baud., type: int, default: 460800}
  flash_mode:
    description: "--flash-mode (dio for some NodeMCU variants); keep = esptool's choice."
    type: str
  flash_size: {description: --flash-size., type: str, default: detect}
  erase: {description: Erase the whole flash first (the filesystem too)., type: bool, default: true}
  esptool: {description: The esptool executable., type: path, default: esptool}
  mpremote: {description: The mpremote executable., type: path, default: mpremote}
"""

_ESPTOOL_VERSION = re.compile(r"(\d+)\.(\d+)")


def installed_release(mpremote: str, port: str) -> dict[str, Any] | None:
    """The board's {release, version, machine, mac}, or None if no MicroPython answers."""
    try:
        info = board_exec(mpremote, port, INFO_SCRIPT, timeout=30)
    except BoardNotConnected:
        raise
    except BoardError:
        return None
    return info if isinstance(info, dict) else None


def needs_flash(
    installed: dict[str, Any] | None, version: str, force: bool, variant: str = ""
) -> tuple[bool, str]:
    if force:
        return True, "forced"
    if installed is None:
        return True, "no MicroPython answers on the console"
    if installed.get("release") != version:
        return True, f"the board runs MicroPython {installed.get('release')}, not {version}"
    if variant == ROMFS_VARIANT and not installed.get("romfs"):
        return True, (
            f"the board runs MicroPython {version} without a ROMFS partition: micropython_variant "
            f"{ROMFS_VARIANT} needs the {ROMFS_VARIANT} build"
        )
    return False, f"the board already runs MicroPython {version}" + (f" {variant}" if variant else "")


def describe(release: str, romfs: bool) -> str:
    """How the diff shows a board's MicroPython."""
    return f"MicroPython {release}" + (f" {ROMFS_VARIANT}" if romfs else "") + "\n"


def verify_image(image: str, sha256: str) -> None:
    digest = hashlib.sha256()
    with open(image, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256.lower():
        raise BoardError(
            f"the firmware image {image} has sha256 {digest.hexdigest()}, not the pinned {sha256} "
            "(board_flash_image_sha256): wrong or corrupted download"
        )


def esptool_major(esptool: str) -> int:
    out = subprocess.run([esptool, "version"], capture_output=True, text=True).stdout
    found = _ESPTOOL_VERSION.findall(out)
    return int(found[-1][0]) if found else 4


def esptool_commands(p: dict[str, Any], major: int) -> list[list[str]]:
    """erase + write, spelled for the installed esptool (5.x: dashes; 4.x: underscores)."""

    def name(option: str) -> str:
        if major >= 5:
            return option
        dashes = len(option) - len(option.lstrip("-"))
        return option[:dashes] + option[dashes:].replace("-", "_")

    base = [p["esptool"], "--chip", p["chip"], "--port", p["port"], "--baud", str(p["baud"])]
    write = [*base, name("write-flash"), name("--flash-size"), p["flash_size"]]
    if p.get("flash_mode") and p["flash_mode"] != "keep":
        write += [name("--flash-mode"), p["flash_mode"]]
    write += ["0x0", p["image"]]
    return ([[*base, name("erase-flash")]] if p["erase"] else []) + [write]


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "port": {"type": "str", "required": True},
            "version": {"type": "str", "required": True},
            "variant": {"type": "str", "default": "", "choices": ["", ROMFS_VARIANT]},
            "image": {"type": "path"},
            "image_sha256": {"type": "str"},
            "force": {"type": "bool", "default": False},
            "probe_only": {"type": "bool", "default": False},
            "restart_app": {"type": "bool", "default": True},
            "installed_release": {"type": "str"},
            "chip": {"type": "str", "default": "esp8266"},
            "baud": {"type": "int", "default": 460800},
            "flash_mode": {"type": "str"},
            "flash_size": {"type": "str", "default": "detect"},
            "erase": {"type": "bool", "default": True},
            "esptool": {"type": "path", "default": "esptool"},
            "mpremote": {"type": "path", "default": "mpremote"},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        installed = None if p["force"] else installed_release(p["mpremote"], p["port"])
    except BoardNotConnected as e:
        module.fail_json(msg=str(e), not_connected=True)
    flash, reason = needs_flash(installed, p["version"], p["force"], p["variant"])
    result: dict[str, Any] = {
        "installed": installed,
        "reason": reason,
        "needs_flash": flash,
        "flashed": False,
    }
    if not flash or p["probe_only"]:
        if installed is not None and p["restart_app"] and not flash:
            try:
                restart_app(p["port"])
            except BoardError as e:
                module.fail_json(msg=str(e), **result)
        module.exit_json(changed=False, **result)
    before = (installed or {}).get("release") or p["installed_release"] or "unknown"
    diff = {
        "before": describe(before, bool((installed or {}).get("romfs"))),
        "after": describe(p["version"], p["variant"] == ROMFS_VARIANT),
    }
    if module.check_mode:
        module.exit_json(changed=True, diff=diff, **result)
    if not p["image"] or not p["image_sha256"]:
        module.fail_json(
            msg="flashing needs board_flash_image (path or URL) and board_flash_image_sha256", **result
        )
    try:
        verify_image(p["image"], p["image_sha256"])
    except (OSError, BoardError) as e:
        module.fail_json(msg=str(e), **result)
    log = []
    for command in esptool_commands(p, esptool_major(p["esptool"])):
        run = subprocess.run(command, capture_output=True, text=True)
        log.append("$ " + " ".join(command) + "\n" + run.stdout[-2000:] + run.stderr[-2000:])
        if run.returncode != 0:
            module.fail_json(msg=f"esptool failed on {p['port']}", esptool=log, **result)
    result["flashed"] = True
    try:
        after = installed_release(p["mpremote"], p["port"])
    except BoardError as e:
        module.fail_json(msg=f"flashed, but the board did not answer afterwards: {e}", esptool=log, **result)
    result["installed"] = after
    if not after or after.get("release") != p["version"]:
        module.fail_json(
            msg=f"flashed, but the board reports {(after or {}).get('release')} instead of {p['version']}",
            esptool=log,
            **result,
        )
    if p["variant"] == ROMFS_VARIANT and not after.get("romfs"):
        module.fail_json(
            msg=f"flashed, but the board has no ROMFS partition: micropython_firmware must be the "
            f"ESP8266_GENERIC-{ROMFS_VARIANT} build of MicroPython {p['version']} (micropython_variant is "
            f"{ROMFS_VARIANT})",
            esptool=log,
            **result,
        )
    module.exit_json(changed=True, diff=diff, esptool=log, **result)


if __name__ == "__main__":
    main()
