#!/usr/bin/python
"""Ansible module: fleet-wide inventory checks no single board's config can see."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: labfleet_fleet_check
short_description: Check the whole board inventory for clashes before anything is built
description:
  - Two boards with the same device name would share an MQTT client id (the broker disconnects
    one whenever the other connects) and one build folder; two boards on the same serial port,
    USB serial number, by-path location or MAC would receive each other's files.
  - Every board needs one way to find its serial port.
  - Each error names the boards and the inventory variable. Never changes anything.
options:
  boards:
    description: >-
      One entry per board in the inventory (not only the ones being provisioned):
      C({host, device, port, usb_serial, usb_path, mac, usb_host}).
    type: list
    elements: dict
    required: true
  reserved_client_ids:
    description: MQTT client ids used by other programs (the recorder's), which no board may take.
    type: list
    elements: str
"""

# The inventory variables that locate a board's serial port, in the order they are tried.
PORT_VARIABLES = ("board_port", "board_usb_serial", "board_usb_path", "board_mac")
_FIELD_OF = {
    "board_port": "port",
    "board_usb_serial": "usb_serial",
    "board_usb_path": "usb_path",
    "board_mac": "mac",
}
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def normalise_mac(mac: str) -> str:
    return mac.strip().lower().replace("-", ":")


def check_fleet(boards: list[dict[str, Any]], reserved_client_ids: list[str] | None = None) -> list[str]:
    errors: list[str] = []
    by_device: dict[str, list[str]] = defaultdict(list)
    for board in boards:
        by_device[str(board.get("device") or board["host"])].append(board["host"])
    for device, hosts in sorted(by_device.items()):
        if len(hosts) > 1:
            errors.append(
                f"boards {', '.join(sorted(hosts))} share the device name {device!r}, which is also their "
                "MQTT client id and build folder (inventory variable: board_device)"
            )
    for client_id in reserved_client_ids or []:
        if client_id in by_device:
            errors.append(
                f"board {', '.join(by_device[client_id])} uses the device name {client_id!r}, the MQTT "
                "client id of the recorder (inventory variable: board_device)"
            )
    for board in boards:
        if not any(board.get(_FIELD_OF[v]) for v in PORT_VARIABLES):
            errors.append(
                f"board {board['host']}: no way to find its serial port; set one of "
                f"{', '.join(PORT_VARIABLES)} (inventory variable: board_port)"
            )
        mac = board.get("mac")
        if mac and not _MAC.match(normalise_mac(str(mac))):
            errors.append(
                f"board {board['host']}: {mac!r} is not a MAC address like aa:bb:cc:dd:ee:ff "
                "(inventory variable: board_mac)"
            )
    for variable in PORT_VARIABLES:
        field = _FIELD_OF[variable]
        owners: dict[tuple[str, str], list[str]] = defaultdict(list)
        for board in boards:
            value = board.get(field)
            if not value:
                continue
            value = normalise_mac(str(value)) if field == "mac" else str(value)
            # A port name is only unique on its own USB host; serial numbers and MACs everywhere.
            scope = str(board.get("usb_host") or "localhost") if field in ("port", "usb_path") else ""
            owners[(scope, value)].append(board["host"])
        for (scope, value), hosts in sorted(owners.items()):
            if len(hosts) > 1:
                on = f" on {scope}" if scope else ""
                errors.append(
                    f"boards {', '.join(sorted(hosts))} have the same {value!r}{on} "
                    f"(inventory variable: {variable})"
                )
    return errors


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "boards": {"type": "list", "elements": "dict", "required": True},
            "reserved_client_ids": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    errors = check_fleet(module.params["boards"], module.params["reserved_client_ids"])
    if errors:
        module.fail_json(msg="; ".join(errors), errors=errors)
    module.exit_json(changed=False, boards=len(module.params["boards"]))


if __name__ == "__main__":
    main()
