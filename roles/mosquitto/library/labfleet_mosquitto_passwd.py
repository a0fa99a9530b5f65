#!/usr/bin/python
"""Ansible module: a mosquitto password file with exactly the given users, rewritten only on change."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: labfleet_mosquitto_passwd
short_description: Manage a mosquitto password file idempotently
description:
  - C(mosquitto_passwd) draws a new salt every time it runs, so running it on every deploy
    changes the file (and reloads the broker) each time. This module checks each user's
    password against the hash already in the file (PBKDF2-SHA512 C($7$), or salted SHA512 C($6$))
    and rewrites the file only when a user was added, removed or changed its password.
  - New hashes are written in mosquitto 2's default format, C($7$101$<salt>$<hash>).
  - The file ends up with exactly the users given. Passwords never appear in the diff.
options:
  path: {description: The password file., type: path, required: true}
  users:
    description: C({name, password}) for every user; names must be unique and contain no colon.
    type: list
    elements: dict
    required: true
  iterations:
    description: PBKDF2 iterations for new hashes (mosquitto's default is 101).
    type: int
    default: 101
extends_documentation_fragment: [files]
"""

SALT_BYTES = 12


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, iterations: int = 101, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def verify(password: str, stored: str) -> bool:
    """Does password match a mosquitto hash ($7$ PBKDF2-SHA512 or $6$ salted SHA512)?"""
    parts = stored.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            computed = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        elif len(parts) == 4 and parts[1] == "6":
            salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            computed = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, digest)


def parse(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            name, stored = line.split(":", 1)
            entries[name] = stored.strip()
    return entries


def reconcile(
    existing: dict[str, str], users: list[dict[str, Any]], iterations: int
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(the entries the file should hold, {users_added, users_removed, passwords_changed})."""
    wanted: dict[str, str] = {}
    report: dict[str, list[str]] = {"users_added": [], "users_removed": [], "passwords_changed": []}
    for user in users:
        name, password = str(user["name"]), str(user["password"])
        if name in existing and verify(password, existing[name]):
            wanted[name] = existing[name]  # keep the old salt: nothing changed
            continue
        report["passwords_changed" if name in existing else "users_added"].append(name)
        wanted[name] = hash_password(password, iterations)
    report["users_removed"] = sorted(set(existing) - set(wanted))
    return wanted, report


def render(entries: dict[str, str]) -> str:
    return "".join(f"{name}:{stored}\n" for name, stored in sorted(entries.items()))


def validate_users(users: list[dict[str, Any]]) -> list[str]:
    problems, seen = [], set()
    for user in users:
        name, password = user.get("name"), user.get("password")
        if not name or ":" in str(name) or any(c.isspace() for c in str(name)):
            problems.append(f"user name {name!r} must be non-empty without ':' or spaces")
        if not password:
            problems.append(f"user {name!r} has no password (inventory: its vault entry)")
        if name in seen:
            problems.append(f"user {name!r} is listed twice")
        seen.add(name)
    return problems


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "users": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "name": {"type": "str", "required": True},
                    "password": {"type": "str", "no_log": True},
                    # Carried by the role's user lists for the ACL; not used here.
                    "device": {"type": "str"},
                    "topics": {"type": "list", "elements": "str"},
                },
            },
            "iterations": {"type": "int", "default": 101},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    path, users = module.params["path"], module.params["users"]
    problems = validate_users(users)
    if problems:
        module.fail_json(msg="; ".join(problems))
    try:
        with open(path) as f:
            existing = parse(f.read())
    except FileNotFoundError:
        existing = {}
    wanted, report = reconcile(existing, users, module.params["iterations"])
    changed = any(report.values())
    diff = {
        "before": "".join(f"{name}\n" for name in sorted(existing)),
        "after": "".join(
            f"{name}{' (new password)' if name in report['passwords_changed'] else ''}\n"
            for name in sorted(wanted)
        ),
        "before_header": path,
        "after_header": path,
    }
    if changed and not module.check_mode:
        directory = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".passwd.")
        with os.fdopen(fd, "w") as f:
            f.write(render(wanted))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    file_args = module.load_file_common_arguments(module.params)
    if os.path.exists(path):
        changed = module.set_fs_attributes_if_different(file_args, changed)
    module.exit_json(changed=changed, users=sorted(wanted), diff=diff, **report)


if __name__ == "__main__":
    main()
