#!/usr/bin/python
"""Ansible module: upload a board's built files with mpremote, only those that differ on the board."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.labfleet_board import (
    DEFAULT_BOOT_FAILURE,
    ROMFS_VARIANT,
    BoardError,
    BoardNotConnected,
    BoardSession,
    InfoWatcher,
    enter_safe_mode,
    hash_script,
    install_script,
    leave_safe_mode,
    mkdirs_script,
    restart_app,
    romfs_sha256_script,
)

DOCUMENTATION = r"""
module: labfleet_board_files
short_description: Put build/<device>/ on a board, sending only files whose hash differs
description:
  - Drives the board with mpremote's own transport (C(mpremote.transport_serial)) in the
    module's Python, which must have mpremote (the USB host's labfleet_venv python): after the
    reboot into safe mode, one raw-REPL session reads the hashes and uploads.
  - Reads the sha256 of every file of the build's manifest back from the board (hashlib on the
    board, as C(mpremote exec) runs it), and the manifest of the previous upload.
  - Sends only the files that differ, each to C(<name>.new); then, on the board, checks every
    staged file's sha256 and only if all match renames them into place (a board unplugged
    mid-upload keeps its old, complete file set), removes files the previous upload put there
    that the build no longer has, and a stale C(x.py) next to a new C(x.mpy) (MicroPython would
    import the .py first).
  - A build in the ROMFS form (its manifest has C(romfs)) also has an image for the board's ROMFS
    partition: the same session reads the sha256 of the partition's first C(size) bytes and, only
    when it differs, writes the image with C(vfs.rom_ioctl) as C(mpremote romfs deploy) does
    (unmount /rom, erase, write deflated chunks), then checks its sha256 on the board, before the
    staged files are renamed into place. It removes any firmware module (C(x.mpy) or C(x.py) of a
    module in the image) from the filesystem, which MicroPython would import instead of the one in
    /rom. A board without a ROMFS partition fails, and keeps running what it had.
  - Restarts the application (soft reset from the friendly REPL, so main.py runs) and watches
    the console for a traceback or safe mode. Optionally waits for the board's info message on
    the broker to show the new config hash.
  - C(changed) is true only when a file was sent or removed. Reading the hashes interrupts the
    running application, so it is restarted even when nothing changed.
  - Check mode reads the hashes and reports what would be sent.
options:
  port: {description: The board's serial port or pyserial URL., type: str, required: true}
  host: {description: "The board's inventory name, for messages (default: its device name).", type: str}
  src:
    description: The board's build folder (build/<device>/ with manifest.json).
    type: path
    required: true
  restart: {description: Restart the application afterwards., type: bool, default: true}
  boot_watch_s: {description: Seconds to watch the console after the restart., type: float, default: 2}
  boot_failure_regex: {description: Console output that means the application did not start., type: str}
  confirm:
    description: Wait for the board's info message with the new config hash.
    type: bool
    default: false
  confirm_timeout_s: {description: How long to wait for it., type: float, default: 60}
  mqtt_host: {description: Broker for the confirmation., type: str}
  mqtt_port: {description: Broker port., type: int, default: 1883}
  mqtt_user: {description: A user allowed to read the board's topics (the recorder's)., type: str}
  mqtt_password: {description: Its password., type: str}
  mqtt_tls: {description: Use TLS., type: bool, default: false}
  mqtt_ca_file: {description: CA certificate for TLS., type: path}
  info_topic: {description: The board's info topic (protocol.topic(prefix, device, "info"))., type: str}
"""

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_build(src: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(manifest, {board path: sha256}) of everything to put on the board's filesystem, manifest
    included; the ROMFS image, if the manifest has one, is checked too."""
    manifest = json.loads((src / MANIFEST).read_text())
    wanted = dict(manifest["files"])
    wanted[MANIFEST] = sha256_file(src / MANIFEST)
    romfs = manifest.get("romfs")
    checks = {name: digest for name, digest in wanted.items() if name != MANIFEST}
    if romfs:
        checks[romfs["file"]] = romfs["sha256"]
    for name, digest in checks.items():
        if sha256_file(src / name) != digest:
            raise BoardError(f"{src / name} does not match its manifest: run the build again")
    return manifest, wanted


def shadowing(wanted: dict[str, str], romfs_modules: list[str]) -> list[str]:
    """Files on the board's filesystem that MicroPython would import instead of the build's
    modules: x.py next to a wanted x.mpy (.py is tried first), and x.py or x.mpy of a module in
    the ROMFS image (the filesystem, "" on sys.path, comes before /rom)."""
    names = {name[: -len(".mpy")] + ".py" for name in wanted if name.endswith(".mpy")}
    for module in romfs_modules:
        names.update((module, module[: -len(".mpy")] + ".py"))
    return sorted(names - set(wanted))


def plan(
    wanted: dict[str, str],
    on_board: dict[str, str | None],
    previous_present: list[str],
    shadows_present: list[str],
) -> tuple[list[str], list[str]]:
    """(files to send, files to remove) to turn what is on the board into `wanted`.

    on_board: sha256 (None = absent) of every wanted file; previous_present: files the previous
    upload's manifest lists that are still on the board; shadows_present: the shadowing() files
    that are on the board.
    """
    send = [name for name, digest in sorted(wanted.items()) if on_board.get(name) != digest]
    remove = {name for name in previous_present if name not in wanted} | set(shadows_present)
    return send, sorted(remove - set(wanted))


def romfs_problem(romfs: dict[str, Any], on_board: dict[str, Any], host: str) -> str | None:
    """Why the board cannot take the build's ROMFS image, if it cannot."""
    if not on_board["partition"]:
        return (
            f"the board has no ROMFS partition (its MicroPython is not the {ROMFS_VARIANT} variant), which "
            f"micropython_variant {ROMFS_VARIANT} needs: flash the {ROMFS_VARIANT} variant: make flash "
            f"DEVICE={host} (micropython_firmware: the ESP8266_GENERIC-{ROMFS_VARIANT} image); nothing "
            "was changed on the board"
        )
    if on_board["partition"] < romfs["size"]:
        return (
            f"the board's ROMFS partition has {on_board['partition']} bytes, the image {romfs['size']}: "
            "nothing was changed on the board"
        )
    return None


def upload(
    board: BoardSession,
    src: Path,
    send: list[str],
    remove: list[str],
    wanted: dict[str, str],
    romfs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the ROMFS image (if given), stage, verify and install in the session that read the
    hashes; returns {sent_bytes: of the files and the image, and for the image romfs_wire_bytes:
    the code it took on the line, romfs_s: the seconds it took to write and check}.
    (That read soft-reset the board and left it idle at its REPL: no second reset is needed.)
    The image goes in before the files are renamed into place: if it fails, the board keeps its
    old files, and a module the files form left on the filesystem still hides the broken /rom."""
    figures: dict[str, Any] = {}
    sent = 0
    if romfs is not None:
        started = time.monotonic()
        image = (src / romfs["file"]).read_bytes()
        # The hash read's globals stay in the raw REPL and split an ESP8266-sized heap: the
        # image's chunks get a fresh one (the board stays in raw REPL, main.py does not run).
        board.soft_reset()
        figures["romfs_wire_bytes"] = board.deploy_romfs(image)
        sent += len(image)
        written = board.exec(romfs_sha256_script(len(image)), timeout=60)
        if written != romfs["sha256"]:
            raise BoardError(
                f"{board.port}: after writing the ROMFS image, its sha256 on the board is {written}, not "
                f"{romfs['sha256']}; the files were not replaced (run the upload again)"
            )
        figures["romfs_s"] = round(time.monotonic() - started, 2)
    directories = sorted({str(Path(name).parent) for name in send if str(Path(name).parent) != "."})
    if directories:
        board.run(mkdirs_script(directories))
    sent += sum(board.put(str(src / name), f"{name}.new") for name in send)
    result = board.exec(install_script({name: wanted[name] for name in send}, remove), timeout=60)
    if result["bad"]:
        raise BoardError(
            f"{board.port}: after upload, the board's copies of {', '.join(sorted(result['bad']))} have "
            "the wrong sha256; nothing was replaced (the old files are still in place)"
        )
    return {**figures, "sent_bytes": sent}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "port": {"type": "str", "required": True},
            "host": {"type": "str"},
            "src": {"type": "path", "required": True},
            "restart": {"type": "bool", "default": True},
            "boot_watch_s": {"type": "float", "default": 2.0},
            "boot_failure_regex": {"type": "str", "default": DEFAULT_BOOT_FAILURE},
            "confirm": {"type": "bool", "default": False},
            "confirm_timeout_s": {"type": "float", "default": 60.0},
            "mqtt_host": {"type": "str"},
            "mqtt_port": {"type": "int", "default": 1883},
            "mqtt_user": {"type": "str"},
            "mqtt_password": {"type": "str", "no_log": True},
            "mqtt_tls": {"type": "bool", "default": False},
            "mqtt_ca_file": {"type": "path"},
            "info_topic": {"type": "str"},
        },
        supports_check_mode=True,
    )
    p = module.params
    port, src = p["port"], Path(p["src"])
    result: dict[str, Any] = {"port": port, "sent_files": [], "sent_bytes": 0, "removed": []}
    try:
        manifest, wanted = load_build(src)
    except (OSError, ValueError, KeyError, BoardError) as e:
        module.fail_json(msg=f"cannot read the build in {src}: {e}", **result)
    result["config_hash"] = manifest.get("config_hash")
    romfs: dict[str, Any] | None = manifest.get("romfs")
    host = p["host"] or manifest.get("device") or src.name
    problem = None
    started = time.monotonic()
    try:
        # Maintenance first: a running app's watchdog would reset the board mid-upload.
        enter_safe_mode(None, port)
        left_safe_mode = False
        try:
            shadows = shadowing(wanted, romfs["modules"] if romfs else [])
            # One session for the rest: the hash read also removes the maintenance file (the
            # board stays at its REPL until restarted), then the upload, without a reset.
            with BoardSession(port) as board:
                read = hash_script(
                    sorted(wanted), True, romfs_size=romfs["size"] if romfs else None, exists=shadows
                )
                state = board.exec(read, timeout=60)
                left_safe_mode = True
                on_board: dict[str, str | None] = state["hashes"]
                send, remove = plan(wanted, on_board, state.get("previous") or [], state["present"])
                image: list[str] = []  # the ROMFS image, when the board's differs
                before = {name: on_board.get(name) for name in send + remove}
                after = {name: wanted[name] for name in send}
                if romfs is not None:
                    problem = romfs_problem(romfs, state["romfs"], host)
                    if state["romfs"]["sha256"] != romfs["sha256"]:
                        image = [romfs["file"]]
                        before[romfs["file"]] = state["romfs"]["sha256"]
                        after[romfs["file"]] = romfs["sha256"]
                result["diff"] = {
                    "before": "".join(f"{name} {str(digest)[:12]}\n" for name, digest in before.items()),
                    "after": "".join(f"{name} {digest[:12]}\n" for name, digest in after.items()),
                }
                changed = bool(send or remove or image) and problem is None
                if changed and not module.check_mode:
                    result.update(upload(board, src, send, remove, wanted, romfs if image else None))
                    result["sent_files"] = send + image
                    result["removed"] = remove
                elif module.check_mode:
                    result["would_send"] = send + image
                    result["would_remove"] = remove
        finally:
            if not left_safe_mode:
                leave_safe_mode(None, port)
        result["upload_s"] = round(time.monotonic() - started, 2)
        watcher = None
        if p["confirm"] and p["restart"] and not module.check_mode and problem is None:
            if not (p["mqtt_host"] and p["info_topic"]):
                module.fail_json(msg="confirm needs mqtt_host and info_topic", **result)
            watcher = InfoWatcher(
                p["mqtt_host"],
                p["mqtt_port"],
                p["info_topic"],
                p["mqtt_user"],
                p["mqtt_password"],
                p["mqtt_tls"],
                p["mqtt_ca_file"],
            )
        try:
            if p["restart"]:
                try:
                    result["console"] = restart_app(
                        port, watch_s=p["boot_watch_s"], failure_regex=p["boot_failure_regex"]
                    )
                except BoardError as e:
                    if problem is None:
                        raise
                    problem += f" (restarting what it had failed too: {e})"
            if watcher is not None:
                expected = manifest.get("config_hash")
                info = watcher.wait(lambda i: i.get("cfg") == expected, p["confirm_timeout_s"])
                if info is None:
                    module.fail_json(
                        msg=f"the board restarted but published no info with config hash {expected} on "
                        f"{p['info_topic']} within {p['confirm_timeout_s']:.0f} s",
                        **result,
                    )
                result["info"] = info
        finally:
            if watcher is not None:
                watcher.close()
    except BoardNotConnected as e:
        module.fail_json(msg=str(e), not_connected=True, **result)
    except (BoardError, OSError, KeyError, ValueError) as e:
        module.fail_json(msg=str(e), not_connected=False, **result)
    result["elapsed_s"] = round(time.monotonic() - started, 2)
    if problem is not None:  # nothing was written; the board runs what it had, restarted above
        module.fail_json(msg=f"{port}: {problem}", not_connected=False, **result)
    diff = result.pop("diff")
    module.exit_json(changed=changed, diff=diff, **result)


if __name__ == "__main__":
    main()
