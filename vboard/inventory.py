"""Virtual boards described by an Ansible inventory (`vboard fleet inventory/demo`).

Every host with a `vboard:` variable becomes a virtual board named after the host; the
WiFi networks the inventory gives the boards (`wifi_networks`, vault-encrypted passwords
included) become the virtual LAN's access points, so the boards find exactly the networks
their rendered config names. Variables are resolved by Ansible itself (a one-task playbook
with the JSON callback), so templating, group/host precedence and the vault work as they do
for `ansible-playbook site.yml`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vboard.spec import BoardSpec, LanSpec, SpecError

# Each host's resolved variables are written to <out>/<host>.json on this machine (no connection
# to the host: boards are not machines), with builtin modules only.
DUMP_PLAYBOOK = """
- name: Describe the virtual boards
  hosts: all
  gather_facts: false
  connection: local
  tasks:
    - name: Write the board description
      delegate_to: localhost
      ansible.builtin.copy:
        dest: "{{ vboard_dump_dir }}/{{ inventory_hostname }}.json"
        mode: "0600"
        content: >-
          {{ {'vboard': vboard | default(None),
              'wifi': (wifi_networks | default([])) if vboard is defined else []} | to_json }}
"""


DEMO_VAULT_PASSWORD_FILES = ("demo-vault-password.txt", "demo-vault-password")


def vault_password_file(inventory: Path) -> Path | None:
    """The same rule as provision.mk: VAULT_PASSWORD_FILE / ANSIBLE_VAULT_PASSWORD_FILE, else the
    published demo password file of the example and demo inventories."""
    for var in ("VAULT_PASSWORD_FILE", "ANSIBLE_VAULT_PASSWORD_FILE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    base = inventory if inventory.is_dir() else inventory.parent
    for name in DEMO_VAULT_PASSWORD_FILES:
        if (base / name).exists():
            return base / name
    return None


def describe(inventory: Path) -> dict[str, dict[str, Any]]:
    """host -> {"vboard": {...} | None, "wifi": [...]} as Ansible resolves them."""
    playbook_bin = Path(sys.executable).parent / "ansible-playbook"
    if not playbook_bin.exists():
        raise SpecError("ansible-playbook is not installed in this environment (`make venv` installs it)")
    with tempfile.TemporaryDirectory(prefix="vboard-inventory-") as tmp:
        playbook = Path(tmp) / "describe.yml"
        playbook.write_text(DUMP_PLAYBOOK)
        out = Path(tmp) / "hosts"
        out.mkdir()
        cmd = [
            str(playbook_bin),
            "-i",
            str(inventory),
            str(playbook),
            "-e",
            json.dumps({"vboard_dump_dir": str(out)}),
        ]
        vault = vault_password_file(inventory)
        if vault is not None:
            cmd += ["--vault-password-file", str(vault)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise SpecError(
                f"ansible-playbook could not read {inventory}:\n"
                f"{result.stdout[-3000:]}{result.stderr[-2000:]}"
            )
        return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def from_inventory(inventory: Path) -> tuple[list[BoardSpec], LanSpec]:
    described = describe(inventory)
    boards: list[BoardSpec] = []
    networks: dict[str, dict[str, Any]] = {}
    for host, info in sorted(described.items()):
        settings = info.get("vboard")
        if not settings:
            continue
        if not isinstance(settings, dict):
            raise SpecError(f"{inventory}: host {host}: vboard must be a mapping")
        boards.append(BoardSpec.from_dict(host, settings, f"{inventory}: host {host}: vboard"))
        for net in info.get("wifi") or []:
            ssid = str(net["ssid"])
            known = networks.setdefault(ssid, {"ssid": ssid, "password": str(net.get("password", ""))})
            if known["password"] != str(net.get("password", "")):
                raise SpecError(
                    f"{inventory}: host {host}: network {ssid!r} has another password than on other boards; "
                    "one access point has one password"
                )
    if not boards:
        raise SpecError(f"{inventory}: no host has a `vboard:` variable, so there is no virtual board to run")
    lan = LanSpec(access_points=list(networks.values())) if networks else LanSpec()
    return boards, lan


def looks_like_inventory(path: Path) -> bool:
    if path.is_dir():
        return True
    if path.suffix in (".ini", ".cfg") or path.name in ("hosts", "inventory"):
        return True
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception:
        return False
    return isinstance(data, dict) and "all" in data


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "vboard"
