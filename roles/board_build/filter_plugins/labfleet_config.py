"""Ansible filter `labfleet_config_errors`: what is wrong with one board's rendered config.json.

    {{ rendered | labfleet_config_errors(inventory_hostname, firmware_dir, virtual, require_credentials) }}

Runs the firmware's own check (firmware.config.validate: the board would refuse what it refuses)
plus the checks only the lab knows (a broker address a board can reach, MQTT credentials when
the broker allows no anonymous clients). Every message names the board and the inventory
variable that set the offending key (templates/config.json.j2 lists them). A filter, not a
module: it runs inside the controller's Ansible process, one per board costs no process start.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# Where each config key comes from: the table in templates/config.json.j2, read right to left.
KEY_SOURCES = {
    "device": "board_device",
    "wifi": "wifi_networks",
    "broker.host": "mqtt_broker_host",
    "broker.port": "mqtt_broker_port",
    "broker.user": "board_mqtt_user",
    "broker.password": "board_mqtt_password",
    "broker.tls": "mqtt_broker_tls",
    "broker.keepalive": "mqtt_keepalive",
    "broker": "mqtt_broker_host",
    "ntp_host": "ntp_host",
    "topic_prefix": "mqtt_topic_prefix",
    "sensors": "board_sensors",
    "pins": "board_pins",
    "buffer": "board_buffer",
    "health_s": "board_health_s",
    "resync_s": "board_resync_s",
    "schema": "templates/config.json.j2 (the schema version is fixed there)",
}
# A config key as the firmware's messages spell it: wifi[1].password, pins.spi_cs, 'wifi', ...
_KEY_IN_MESSAGE = re.compile(
    r"(?<![\w.])(wifi(?:\[\d+\])?(?:\.\w+)?|(?:broker|sensors|pins|buffer)(?:\.\w+)?"
    r"|device|ntp_host|topic_prefix|health_s|resync_s|schema)(?![\w\[])"
)
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def inventory_variable(config_key: str) -> str:
    """The inventory variable (with the sub-key, if any) that sets config_key."""
    if config_key in KEY_SOURCES:
        return KEY_SOURCES[config_key]
    head, _, rest = config_key.partition(".")
    wifi = re.match(r"wifi(\[\d+\])?$", head)
    if wifi:
        return "wifi_networks" + (wifi.group(1) or "") + ("." + rest if rest else "")
    return KEY_SOURCES.get(head, head) + ("." + rest if rest else "")


def explain(host: str, error: str) -> str:
    """One firmware validation error, with the board and the inventory variable(s) named."""
    keys = []
    for match in _KEY_IN_MESSAGE.finditer(error):
        variable = inventory_variable(match.group(1))
        if variable not in keys:
            keys.append(variable)
    where = ", ".join(keys) if keys else "see templates/config.json.j2"
    return f"board {host}: {error} (inventory variable: {where})"


def broker_host_problem(host: str, virtual: bool) -> str | None:
    """Why a board could not reach a broker at this address, or None."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        if not host or "://" in host or not all(_HOSTNAME_LABEL.match(label) for label in labels):
            return f"{host!r} is neither an IP address nor a host name"
        if host == "localhost" and not virtual:
            return "'localhost' on a board is the board itself, not the lab server"
        return None
    if address.is_loopback and not virtual:
        return f"{host} on a board is the board itself, not the lab server"
    if address.is_unspecified or address.is_multicast:
        return f"{host} is not a host address"
    return None


def lab_checks(cfg: dict[str, Any], virtual: bool, require_credentials: bool) -> list[tuple[str, str]]:
    """(message, inventory variable) for what the firmware accepts but the lab cannot work with."""
    problems: list[tuple[str, str]] = []
    broker = cfg.get("broker")
    if isinstance(broker, dict):
        host = broker.get("host")
        if isinstance(host, str):
            why = broker_host_problem(host, virtual)
            if why:
                problems.append((f"bad broker address: {why}", "mqtt_broker_host"))
        if require_credentials and (broker.get("user") is None or broker.get("password") is None):
            problems.append(
                (
                    "the broker allows no anonymous clients but the board has no MQTT user/password"
                    " (add its password to the vault's vault_mqtt_passwords)",
                    "board_mqtt_password",
                )
            )
    return problems


def load_firmware_config(firmware_dir: Path) -> ModuleType:
    sys.path.insert(0, str(firmware_dir.resolve().parent))
    import firmware.config as config_module

    return config_module


def check(
    text: str, host: str, firmware_dir: Path, virtual: bool = False, require_credentials: bool = False
) -> list[str]:
    """Every problem with the rendered config text, each naming host and variable."""
    try:
        cfg = json.loads(text)
    except ValueError as e:
        return [f"board {host}: the template rendered invalid JSON ({e}); see templates/config.json.j2"]
    config_module = load_firmware_config(firmware_dir)
    messages = [explain(host, error) for error in config_module.validate(cfg)]
    if isinstance(cfg, dict):
        for message, variable in lab_checks(cfg, virtual, require_credentials):
            messages.append(f"board {host}: {message} (inventory variable: {variable})")
    return messages


def labfleet_config_errors(
    text: str, host: str, firmware_dir: str, virtual: bool = False, require_credentials: bool = False
) -> list[str]:
    return check(str(text), str(host), Path(firmware_dir), bool(virtual), bool(require_credentials))


class FilterModule:
    def filters(self) -> dict[str, Callable[..., list[str]]]:
        return {"labfleet_config_errors": labfleet_config_errors}
