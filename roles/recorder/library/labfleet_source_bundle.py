#!/usr/bin/python
"""Ansible module: a reproducible tarball of the project source the recorder is installed from."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: labfleet_source_bundle
short_description: Pack the parts of the checkout the recorder needs into a byte-for-byte reproducible tar.gz
description:
  - Same source, same bytes (sorted entries, fixed times and owners, no __pycache__), so the
    copy to the lab server and the install there happen only when the source really changed.
  - Runs on the controller. Rewrites C(dest) only when its content changes.
options:
  src: {description: The checkout., type: path, required: true}
  paths:
    description: Files and folders of the checkout to include.
    type: list
    elements: str
    required: true
  dest: {description: The tar.gz to write., type: path, required: true}
"""

SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")


def bundle_bytes(src: Path, paths: list[str]) -> bytes:
    files: list[Path] = []
    for name in paths:
        top = src / name
        if top.is_file():
            files.append(top)
        elif top.is_dir():
            for root, dirs, names in os.walk(top):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
                files.extend(Path(root) / n for n in names if not n.endswith(SKIP_SUFFIXES))
        else:
            raise FileNotFoundError(f"{top} is not in the checkout")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(set(files)):
            data = path.read_bytes()
            info = tarfile.TarInfo("labfleet/" + path.relative_to(src).as_posix())
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "path", "required": True},
            "paths": {"type": "list", "elements": "str", "required": True},
            "dest": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        data = bundle_bytes(Path(p["src"]), p["paths"])
    except OSError as e:
        module.fail_json(msg=str(e))
    dest = Path(p["dest"])
    changed = not dest.exists() or dest.read_bytes() != data
    if changed and not module.check_mode:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    module.exit_json(changed=changed, dest=str(dest), sha256=hashlib.sha256(data).hexdigest(), size=len(data))


if __name__ == "__main__":
    main()
