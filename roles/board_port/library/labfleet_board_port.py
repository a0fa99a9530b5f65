#!/usr/bin/python
"""Ansible module: find a board's serial port on its USB host and check that the board is there."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.labfleet_board import (
    INFO_SCRIPT,
    BoardError,
    BoardNotConnected,
    board_exec,
    find_by_usb_path,
    find_by_usb_serial,
    host_lock,
    port_present,
    restart_app,
    scan_candidates,
)

DOCUMENTATION = r"""
module: labfleet_board_port
short_description: Find a board's serial port (by port, USB serial number, USB location or MAC)
description:
  - Runs on the USB host. Tries, in order, C(port) (a device such as /dev/ttyUSB0, a
    /dev/serial/by-path/... link, or a pyserial URL such as socket://127.0.0.1:7101),
    C(usb_serial) (matched in /dev/serial/by-id and sysfs; CH340 adapters have none),
    C(usb_path) (a /dev/serial/by-path name or part of one) and C(mac) (asks each unclaimed
    port's board for its WiFi MAC with mpremote; the ports found are remembered on the USB host).
  - Fails with C(not_connected=true) when nothing is there, so a bulk run can tell an unplugged
    board from a broken one. Never changes anything.
options:
  host: {description: The board's inventory name (for messages)., type: str, required: true}
  port: {description: Serial port or pyserial URL., type: str}
  usb_serial: {description: USB serial number of the board's adapter., type: str}
  usb_path: {description: /dev/serial/by-path link or a part of its name., type: str}
  mac: {description: The board's WiFi station MAC (aa:bb:cc:dd:ee:ff)., type: str}
  scan_ports: {description: Ports to ask for their MAC (default /dev/ttyUSB* and /dev/ttyACM*)., type: list}
  claimed_ports: {description: Ports of other boards, never scanned for a MAC., type: list}
  mpremote: {description: The mpremote executable., type: path, default: mpremote}
"""

MAC_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "labfleet", "mac-ports.json")


def _mac_of(mpremote: str, port: str) -> str | None:
    try:
        info = board_exec(mpremote, port, INFO_SCRIPT, timeout=20)
    except BoardError:
        return None
    finally:
        # Asking interrupted whatever application ran there: start it again.
        with contextlib.suppress(BoardError):
            restart_app(port, watch_s=0)
    mac = info.get("mac") if isinstance(info, dict) else None
    return mac.lower() if isinstance(mac, str) else None


def find_by_mac(mac: str, mpremote: str, candidates: list[str], claimed: set[str]) -> str | None:
    mac = mac.lower().replace("-", ":")
    with host_lock("mac-scan"):
        try:
            with open(MAC_CACHE) as f:
                cache: dict[str, str] = json.load(f)
        except (OSError, ValueError):
            cache = {}
        remembered = cache.get(mac)
        if remembered and port_present(remembered) and _mac_of(mpremote, remembered) == mac:
            return remembered
        for port in candidates:
            if port in claimed or port == remembered or not port_present(port):
                continue
            found = _mac_of(mpremote, port)
            if found:
                cache[found] = port
            if found == mac:
                break
        else:
            port = None
        os.makedirs(os.path.dirname(MAC_CACHE), exist_ok=True)
        with open(MAC_CACHE, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        return port


def resolve(params: dict[str, Any], dev_root: str = "/dev", sys_root: str = "/sys") -> tuple[str, str]:
    """(port, the inventory variable that found it). BoardNotConnected if nothing is there."""
    host = params["host"]
    if params.get("port"):
        port = params["port"]
        if not port_present(port):
            raise BoardNotConnected(f"board {host} is not connected: nothing at {port} (board_port)")
        return port, "board_port"
    for field, variable in (("usb_serial", "board_usb_serial"), ("usb_path", "board_usb_path")):
        value = params.get(field)
        if not value:
            continue
        if field == "usb_serial":
            ports = find_by_usb_serial(str(value), dev_root, sys_root)
        else:
            ports = find_by_usb_path(str(value), dev_root)
        if len(ports) > 1:
            raise BoardError(
                f"board {host}: {variable}={value!r} matches {len(ports)} ports: {', '.join(ports)}"
            )
        if not ports:
            raise BoardNotConnected(
                f"board {host} is not connected: no serial port with {variable}={value!r}"
            )
        return ports[0], variable
    if params.get("mac"):
        candidates = params.get("scan_ports") or scan_candidates(dev_root)
        port = find_by_mac(
            params["mac"], params["mpremote"], candidates, set(params.get("claimed_ports") or [])
        )
        if not port:
            raise BoardNotConnected(
                f"board {host} is not connected: no board with board_mac={params['mac']} on "
                f"{', '.join(candidates) or 'any serial port'}"
            )
        return port, "board_mac"
    raise BoardError(f"board {host}: set board_port, board_usb_serial, board_usb_path or board_mac")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "host": {"type": "str", "required": True},
            "port": {"type": "str"},
            "usb_serial": {"type": "str"},
            "usb_path": {"type": "str"},
            "mac": {"type": "str"},
            "scan_ports": {"type": "list", "elements": "str", "default": []},
            "claimed_ports": {"type": "list", "elements": "str", "default": []},
            "mpremote": {"type": "path", "default": "mpremote"},
        },
        supports_check_mode=True,
    )
    try:
        port, found_by = resolve(module.params)
    except BoardNotConnected as e:
        module.fail_json(msg=str(e), not_connected=True)
    except BoardError as e:
        module.fail_json(msg=str(e), not_connected=False)
    module.exit_json(changed=False, port=port, found_by=found_by)


if __name__ == "__main__":
    main()
