"""Helpers shared by the provisioning suites (tests/test_provision_*.py): running site.yml with
the real ansible-playbook against throw-away inventories, reading its recap, and loading the
roles' Python modules. No tests here."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ROLES = REPO / "roles"
DEMO_VAULT_PASSWORD = REPO / "inventory" / "demo" / "demo-vault-password.txt"

_RECAP = re.compile(
    r"^(\S+)\s*: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
    r"\s+rescued=(\d+)\s+ignored=(\d+)",
    re.M,
)


@dataclass
class PlaybookRun:
    rc: int
    output: str

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
        return {
            m.group(1): dict(zip(keys, map(int, m.groups()[1:]), strict=True))
            for m in _RECAP.finditer(self.output)
        }

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]

    def total_changed(self) -> int:
        return sum(stats["changed"] for stats in self.recap.values())


def run_playbook(
    inventory: Path,
    *args: str,
    extra_vars: dict[str, Any] | None = None,
    vault_password_file: Path | None = None,
    timeout: float = 600,
) -> PlaybookRun:
    """`ansible-playbook site.yml` from the repository root, as the make targets run it."""
    command = [str(VENV_BIN / "ansible-playbook"), "site.yml", "-i", str(inventory), *args]
    if vault_password_file:
        command += ["--vault-password-file", str(vault_password_file)]
    if extra_vars:
        import json

        command += ["-e", json.dumps(extra_vars)]
    env = dict(
        os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"
    )
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return PlaybookRun(result.returncode, result.stdout + result.stderr)


def write_inventory(
    root: Path, data: dict[str, Any], group_vars: dict[str, dict[str, Any]] | None = None
) -> Path:
    """An inventory folder: hosts.yml plus group_vars/<group>.yml (plain text: test secrets only)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "hosts.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    if group_vars:
        (root / "group_vars").mkdir(exist_ok=True)
        for group, variables in group_vars.items():
            (root / "group_vars" / f"{group}.yml").write_text(yaml.safe_dump(variables, sort_keys=False))
    return root


def local_vars() -> dict[str, Any]:
    """Connection settings for hosts whose tasks all run on this machine."""
    return {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}


def load_role_module(role: str, name: str) -> ModuleType:
    """A role's Ansible module (roles/<role>/library/<name>.py) imported for its pure functions.
    The labfleet module_utils they import are registered under ansible.module_utils first."""
    for util in sorted(ROLES.glob("*/module_utils/*.py")):
        qualified = f"ansible.module_utils.{util.stem}"
        if qualified not in sys.modules:
            spec = importlib.util.spec_from_file_location(qualified, util)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[qualified] = module
            spec.loader.exec_module(module)
    path = ROLES / role / "library" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"labfleet_test_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def vboard_command() -> str:
    """The virtual board's CLI (`vboard fleet <inventory>`); LABFLEET_TEST_VBOARD names another."""
    return os.environ.get("LABFLEET_TEST_VBOARD") or str(VENV_BIN / "vboard")


def vboard_available() -> bool:
    """The virtual board (vboard/cli.py, `vboard fleet <inventory>`) is not in every checkout yet."""
    return bool(os.environ.get("LABFLEET_TEST_VBOARD")) or (REPO / "vboard" / "cli.py").exists()
