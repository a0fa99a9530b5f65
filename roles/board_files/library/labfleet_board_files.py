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
  - Restarts the application (soft reset from the friendly REPL, so main.py runs) and watches
    the console for a traceback or safe mode. Optionally waits for the board's info message on
    the broker to show the new config hash.
  - C(changed) is true only when a file was sent or removed. Reading the hashes interrupts the
    running application, so it is restarted even when nothing changed.
  - Check mode reads the hashes and reports what would be sent.
options:
  port: {description: The board's serial port or pyserial URL., type: str, required: true}
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
    """(manifest, {board path: sha256}) of everything to put on the board, manifest included."""
    manifest = json.loads((src / MANIFEST).read_text())
    wanted = dict(manifest["files"])
    wanted[MANIFEST] = sha256_file(src / MANIFEST)
    for name, digest in wanted.items():
        if name != MANIFEST and sha256_file(src / name) != digest:
            raise BoardError(f"{src / name} does not match its manifest: run the build again")
    return manifest, wanted


def shadowed_sources(wanted: dict[str, str]) -> list[str]:
    """x.py files that would shadow a wanted x.mpy (MicroPython imports the .py first)."""
    return sorted(name[: -len(".mpy")] + ".py" for name in wanted if name.endswith(".mpy"))


def plan(
    wanted: dict[str, str], on_board: dict[str, str | None], previous_present: list[str]
) -> tuple[list[str], list[str]]:
    """(files to send, files to remove) to turn what is on the board into `wanted`.

    on_board: sha256 (None = absent) of every wanted file and every shadowing .py candidate;
    previous_present: files the previous upload's manifest lists that are still on the board.
    """
    send = [name for name, digest in sorted(wanted.items()) if on_board.get(name) != digest]
    remove = {name for name in previous_present if name not in wanted}
    remove.update(name for name in shadowed_sources(wanted) if on_board.get(name) is not None)
    return send, sorted(remove - set(wanted))


def upload(board: BoardSession, src: Path, send: list[str], remove: list[str], wanted: dict[str, str]) -> int:
    """Stage, verify and install in the session that read the hashes; returns the bytes sent.
    (That read soft-reset the board and left it idle at its REPL: no second reset is needed.)"""
    directories = sorted({str(Path(name).parent) for name in send if str(Path(name).parent) != "."})
    if directories:
        board.run(mkdirs_script(directories))
    sent = sum(board.put(str(src / name), f"{name}.new") for name in send)
    result = board.exec(install_script({name: wanted[name] for name in send}, remove), timeout=60)
    if result["bad"]:
        raise BoardError(
            f"{board.port}: after upload, the board's copies of {', '.join(sorted(result['bad']))} have "
            "the wrong sha256; nothing was replaced (the old files are still in place)"
        )
    return sent


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "port": {"type": "str", "required": True},
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
    started = time.monotonic()
    try:
        # Maintenance first: a running app's watchdog would reset the board mid-upload.
        enter_safe_mode(None, port)
        left_safe_mode = False
        try:
            probe = sorted(set(wanted) | set(shadowed_sources(wanted)))
            # One session for the rest: the hash read also removes the maintenance file (the
            # board stays at its REPL until restarted), then the upload, without a reset.
            with BoardSession(port) as board:
                state = board.exec(hash_script(probe, leave_safe_mode=True), timeout=60)
                left_safe_mode = True
                on_board: dict[str, str | None] = state["hashes"]
                send, remove = plan(wanted, on_board, state.get("previous") or [])
                result["diff"] = {
                    "before": "".join(f"{n} {str(on_board.get(n))[:12]}\n" for n in send + remove),
                    "after": "".join(f"{n} {wanted[n][:12]}\n" for n in send),
                }
                changed = bool(send or remove)
                if changed and not module.check_mode:
                    result["sent_bytes"] = upload(board, src, send, remove, wanted)
                    result["sent_files"] = send
                    result["removed"] = remove
                elif module.check_mode:
                    result["would_send"] = send
                    result["would_remove"] = remove
        finally:
            if not left_safe_mode:
                leave_safe_mode(None, port)
        result["upload_s"] = round(time.monotonic() - started, 2)
        watcher = None
        if p["confirm"] and p["restart"] and not module.check_mode:
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
                result["console"] = restart_app(
                    port, watch_s=p["boot_watch_s"], failure_regex=p["boot_failure_regex"]
                )
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
    diff = result.pop("diff")
    module.exit_json(changed=changed, diff=diff, **result)


if __name__ == "__main__":
    main()
