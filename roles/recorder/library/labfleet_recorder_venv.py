#!/usr/bin/python
"""Ansible module: the recorder's virtualenv, with pinned dependencies and the project, kept current."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: labfleet_recorder_venv
short_description: Create the recorder's virtualenv and install pinned requirements and the project
description:
  - Creates the virtualenv if it is missing.
  - Installs C(requirements) (exact pins) when that file differs from what was installed last
    (a stamp in the virtualenv holds its sha256), and the project from C(bundle) (a source
    tar.gz) with C(--no-deps) when the bundle differs. C(changed) only when pip ran or the
    virtualenv was created; check mode says what would happen.
options:
  venv: {description: The virtualenv folder., type: path, required: true}
  python: {description: The Python that creates it., type: str, default: python3}
  requirements: {description: Pinned requirements file on this host., type: path}
  bundle: {description: The project source tar.gz on this host., type: path}
  pip_args:
    description: Extra pip arguments, e.g. C(--no-index --find-links /srv/wheels) for an offline lab.
    type: list
    elements: str
"""

REQUIREMENTS_STAMP = ".labfleet-requirements.sha256"
BUNDLE_STAMP = ".labfleet-bundle.sha256"


def sha256_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stamp_differs(venv: Path, stamp: str, digest: str) -> bool:
    try:
        return (venv / stamp).read_text().strip() != digest
    except OSError:
        return True


def run(module: AnsibleModule, command: list[str], log: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    log.append("$ " + " ".join(command) + "\n" + (result.stdout + result.stderr)[-3000:])
    if result.returncode != 0:
        module.fail_json(msg=f"{command[0]} failed (exit {result.returncode})", log=log)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "venv": {"type": "path", "required": True},
            "python": {"type": "str", "default": "python3"},
            "requirements": {"type": "path"},
            "bundle": {"type": "path"},
            "pip_args": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    p = module.params
    venv = Path(p["venv"])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    actions: list[str] = []
    log: list[str] = []
    result: dict[str, Any] = {"venv": str(venv)}

    fresh = not (venv / "bin" / "python").exists()
    if fresh:
        actions.append("create the virtualenv")
        if not module.check_mode:
            run(module, [p["python"], "-m", "venv", str(venv)], log)

    if p["requirements"]:
        digest = sha256_file(p["requirements"])
        if fresh or stamp_differs(venv, REQUIREMENTS_STAMP, digest):
            actions.append("install the pinned requirements")
            if not module.check_mode:
                run(
                    module,
                    [*pip, "install", "--require-virtualenv", *p["pip_args"], "-r", p["requirements"]],
                    log,
                )
                (venv / REQUIREMENTS_STAMP).write_text(digest + "\n")

    if p["bundle"]:
        digest = sha256_file(p["bundle"])
        if fresh or stamp_differs(venv, BUNDLE_STAMP, digest):
            actions.append("install the recorder from the source bundle")
            if not module.check_mode:
                with tempfile.TemporaryDirectory() as tmp:
                    with tarfile.open(p["bundle"]) as tar:
                        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                            tar.extractall(tmp, filter="data")
                        else:  # our own bundle: plain files under labfleet/
                            tar.extractall(tmp)
                    source = os.path.join(tmp, "labfleet")
                    # --no-deps: the pins above are the dependencies; nothing else is pulled in.
                    run(
                        module,
                        [*pip, "install", "--no-deps", "--force-reinstall", *p["pip_args"], source],
                        log,
                    )
                (venv / BUNDLE_STAMP).write_text(digest + "\n")

    result["actions"] = actions
    diff = {"before": "", "after": "".join(a + "\n" for a in actions)}
    module.exit_json(changed=bool(actions), diff=diff, log=log, **result)


if __name__ == "__main__":
    main()
