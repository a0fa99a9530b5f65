"""Provisioning boards: the board-side scripts on the real MicroPython, the broker check, and
whole fleets of virtual boards provisioned through the make targets and site.yml with the real
mpremote.

The fleet tests need the virtual board's CLI (`vboard fleet <inventory>`: every board of the
inventory, console on socket://127.0.0.1:<console_port>, in the foreground until SIGTERM); they
are skipped until vboard/cli.py is in the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tests.test_provision_support import (
    DEMO_VAULT_PASSWORD,
    REPO,
    VENV_BIN,
    load_role_module,
    run_playbook,
    vboard_available,
    vboard_command,
)
from vboard import esprom, flashfs
from vboard.broker import Mosquitto, find_mosquitto, free_port, wait_for_port
from vboard.procs import stop_process

load_role_module("board_files", "labfleet_board_files")
board_utils = sys.modules["ansible.module_utils.labfleet_board"]  # registered by the load above

DEMO = REPO / "inventory" / "demo"
DEMO_BOARDS = ["vb-01", "vb-02", "vb-03", "vb-04", "vb-05"]
needs_vboard = pytest.mark.skipif(
    not vboard_available(), reason="the virtual board CLI (vboard/cli.py) is not here yet"
)


# ---------------------------------------------------------------- board-side code, real MicroPython


def run_on_micropython(micropython: str, cwd: Path, code: str) -> Any:
    result = subprocess.run([micropython, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    return board_utils.parse_result(result.stdout)


def test_board_reads_back_hashes_and_its_previous_manifest(tmp_path: Path, micropython_bin: str) -> None:
    (tmp_path / "drivers").mkdir()
    (tmp_path / "config.json").write_bytes(b'{"device": "x"}')
    (tmp_path / "drivers" / "sht3x.mpy").write_bytes(bytes(range(256)) * 9)  # > one 512-byte read
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"config.json": "", "gone.mpy": ""}}))
    paths = ["config.json", "drivers/sht3x.mpy", "missing.mpy"]
    state = run_on_micropython(micropython_bin, tmp_path, board_utils.hash_script(paths))
    assert state["hashes"] == {
        "config.json": hashlib.sha256(b'{"device": "x"}').hexdigest(),
        "drivers/sht3x.mpy": hashlib.sha256(bytes(range(256)) * 9).hexdigest(),
        "missing.mpy": None,
    }
    assert state["previous"] == ["config.json"]  # gone.mpy is listed but no longer there
    assert json.loads(state["manifest"])["files"]["gone.mpy"] == ""
    # The ROMFS form's read: files looked up only, and the partition (none in the unix port).
    (tmp_path / "app.py").write_text("X = 1\n")
    code = board_utils.hash_script(
        ["config.json"], romfs_size=4096, exists=["app.mpy", "app.py", "drivers/sht3x.mpy"]
    )
    state = run_on_micropython(micropython_bin, tmp_path, code)
    assert state["present"] == ["app.py", "drivers/sht3x.mpy"]
    assert state["romfs"] == {"partition": 0, "sha256": None}
    assert list(state["hashes"]) == ["config.json"]


def test_board_installs_staged_files_only_when_all_verify(tmp_path: Path, micropython_bin: str) -> None:
    (tmp_path / "config.json").write_bytes(b"old config")
    (tmp_path / "old.mpy").write_bytes(b"stale")
    (tmp_path / "drivers").mkdir()  # a package the ROMFS image now has: the folder would hide it
    (tmp_path / "drivers" / "sht3x.mpy").write_bytes(b"stale")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "old.mpy").write_bytes(b"stale")
    (tmp_path / "lib" / "mine.py").write_bytes(b"kept")
    (tmp_path / "config.json.new").write_bytes(b"new config")
    (tmp_path / "app.mpy.new").write_bytes(b"app")
    good = {
        "config.json": hashlib.sha256(b"new config").hexdigest(),
        "app.mpy": hashlib.sha256(b"app").hexdigest(),
    }
    bad = dict(good, **{"app.mpy": "0" * 64})  # as if a byte got lost on the line
    result = run_on_micropython(micropython_bin, tmp_path, board_utils.install_script(bad, ["old.mpy"]))
    assert list(result["bad"]) == ["app.mpy"] and result["removed"] == []
    assert (tmp_path / "config.json").read_bytes() == b"old config" and (tmp_path / "old.mpy").exists()
    stale = ["old.mpy", "drivers/sht3x.mpy", "lib/old.mpy"]
    result = run_on_micropython(micropython_bin, tmp_path, board_utils.install_script(good, stale))
    assert result == {"bad": {}, "removed": stale}
    assert (tmp_path / "config.json").read_bytes() == b"new config"
    assert (tmp_path / "app.mpy").read_bytes() == b"app"
    assert not (tmp_path / "old.mpy").exists() and not (tmp_path / "config.json.new").exists()
    # a folder left empty goes; one with other files stays
    assert not (tmp_path / "drivers").exists() and (tmp_path / "lib" / "mine.py").exists()


def test_board_reports_its_micropython_release(tmp_path: Path, micropython_bin: str) -> None:
    info = run_on_micropython(micropython_bin, tmp_path, board_utils.INFO_SCRIPT)
    version = subprocess.run(
        [micropython_bin, "-c", "import sys; print(sys.implementation.version)"],
        capture_output=True,
        text=True,
    ).stdout
    assert info["release"] == ".".join(version.strip("()\n").split(", ")[:3])
    assert info["romfs"] == 0  # the unix port has no ROMFS partition


def test_info_watcher_takes_only_a_live_info_with_the_new_config(mosquitto: Mosquitto) -> None:
    """The upload's optional confirmation, against the real broker: the retained info from
    before the restart is ignored; the one the board publishes after it is taken."""
    topic = "labfleet/vb-01/info"
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="board")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    pub.publish(topic, json.dumps({"cfg": "aaaa", "boot": 4}), qos=1, retain=True).wait_for_publish(5)
    watcher = board_utils.InfoWatcher("127.0.0.1", mosquitto.port, topic, None, None)
    try:
        assert watcher.wait(lambda info: info.get("cfg") == "aaaa", timeout=1.0) is None  # retained: stale
        threading.Timer(
            0.3, lambda: pub.publish(topic, json.dumps({"cfg": "bbbb", "boot": 5}), qos=1, retain=True)
        ).start()
        info = watcher.wait(lambda info: info.get("cfg") == "bbbb", timeout=10)
        assert info == {"cfg": "bbbb", "boot": 5}
    finally:
        watcher.close()
        pub.loop_stop()
        pub.disconnect()


# ---------------------------------------------------------------- fleets of virtual boards


class VirtualFleet:
    """`vboard fleet inventory/demo` in the background, one process per group of boards (its
    --limit) so a board can be unplugged (its process stopped) and plugged back (started again
    on the same work folder, so with the same flash)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, boards: list[str]) -> None:
        workdir = self.root / f"fleet-{name}"
        workdir.mkdir(exist_ok=True)
        limits = [arg for board in boards for arg in ("--limit", board)]
        log = (workdir.parent / f"vboard-{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [vboard_command(), "fleet", str(DEMO), "--workdir", str(workdir), *limits],
            cwd=self.root,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=dict(os.environ, VAULT_PASSWORD_FILE=str(DEMO_VAULT_PASSWORD)),
        )
        log.close()
        for host in boards:
            wait_for_port(7100 + int(host[-2:]), 120)
        time.sleep(0.5)  # the probe connections above hang up before mpremote connects

    def stop(self, name: str) -> None:
        stop_process(self.procs.pop(name), 30, group=True)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def make(
    target: str,
    lab: dict[str, Any],
    *variables: str,
    extra: dict[str, Any] | None = None,
    inventory: Path = DEMO,
) -> subprocess.CompletedProcess[str]:
    """A provision.mk target, as `make <target>` runs it, on the demo inventory in the test's prefix."""
    extra_file = lab["root"] / f"extra-{time.monotonic_ns()}.json"
    extra_file.write_text(json.dumps({**lab["extra"], **(extra or {})}))
    makefile = lab["root"] / "test.mk"
    makefile.write_text(
        f"VENV := {VENV_BIN.parent}\nPY := $(VENV)/bin/python\n"
        f".PHONY: venv\nvenv: ;\ninclude {REPO}/provision.mk\n"
    )
    command = [
        "make",
        "--no-print-directory",
        "-f",
        str(makefile),
        target,
        f"BUILD_DIR={lab['build']}",
        f"INVENTORY={inventory}",
        f"PLAYBOOK_ARGS=-e @{extra_file}",
        *variables,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def summary_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] in DEMO_BOARDS and len(cells) >= 2:
            rows[cells[0]] = cells
    return rows


def read_board_files(port: str, names: list[str], dest: Path, restart: bool = True) -> dict[str, bytes]:
    """The files as they are on the board, copied back with mpremote (in safe mode, as the
    provisioning does: the running app's watchdog would reset the board mid-copy); then the app
    is restarted, or with restart=False the board left at its REPL."""
    dest.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    for i, name in enumerate(names):
        args += ["fs", "cp", f":{name}", str(dest / f"{i}.bin"), "+"]
    mpremote = str(VENV_BIN / "mpremote")
    board_utils.enter_safe_mode(mpremote, port)
    try:
        subprocess.run([mpremote, "connect", port, *args[:-1]], check=True, capture_output=True, timeout=120)
    finally:
        board_utils.leave_safe_mode(mpremote, port)
        if restart:
            board_utils.restart_app(port)
    return {name: (dest / f"{i}.bin").read_bytes() for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The demo lab in a scratch prefix: its broker deployed by the servers play and started,
    its five virtual boards running (vb-05 in a process of its own, to unplug it)."""
    if not vboard_available():
        pytest.skip("the virtual board CLI (vboard/cli.py) is not here yet")
    root = tmp_path_factory.mktemp("demo")
    port = free_port()
    extra = {
        "labfleet_build_dir": str(root / "build"),
        "mosquitto_root": str(root / "srv"),
        "recorder_root": str(root / "srv"),
        "mqtt_broker_port": port,
        "recorder_venv_manage": False,
        "recorder_command": [
            str(VENV_BIN / "python"),
            "-m",
            "recorder",
            "record",
            "--config",
            str(root / "srv/etc/labfleet/recorder.toml"),
        ],
    }
    deploy = run_playbook(
        DEMO, "--tags", "servers", extra_vars=extra, vault_password_file=DEMO_VAULT_PASSWORD
    )
    assert deploy.rc == 0, deploy.output[-3000:]
    log = (root / "mosquitto.log").open("wb")
    broker = subprocess.Popen(
        [find_mosquitto(), "-c", str(root / "srv/etc/mosquitto/mosquitto.conf")],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    wait_for_port(port, 10)
    fleet = VirtualFleet(root)
    try:
        fleet.start("main", DEMO_BOARDS[:4])
        fleet.start("vb-05", ["vb-05"])
        vault = subprocess.run(
            [
                str(VENV_BIN / "ansible-vault"),
                "view",
                "--vault-password-file",
                str(DEMO_VAULT_PASSWORD),
                str(DEMO / "group_vars/all/vault.yml"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        secrets = yaml.safe_load(vault.stdout)
        yield {
            "root": root,
            "build": root / "build",
            "extra": extra,
            "port": port,
            "fleet": fleet,
            "recorder_password": secrets["vault_mqtt_passwords"]["recorder"],
        }
    finally:
        fleet.stop_all()
        broker.terminate()
        broker.wait(10)
        log.close()


def flash_image(lab: dict[str, Any], name: str) -> Path:
    """The virtual board's flash (vboard: <workdir>/<board>/flash.bin), its filesystem inside."""
    group = "vb-05" if name == "vb-05" else "main"
    return Path(lab["root"]) / f"fleet-{group}" / name / "flash.bin"


def console_tail(lab: dict[str, Any], name: str, chars: int = 3000) -> str:
    log = flash_image(lab, name).with_name("console.log")
    return log.read_text(errors="replace")[-chars:] if log.exists() else f"(no {log})"


STORE_DIR = "fifo"  # firmware/app.py SAMPLES_DIR: the flash buffer's data, not modules


def firmware_modules_on_the_filesystem(lab: dict[str, Any], name: str) -> list[str]:
    files = flashfs.FlashFilesystem(flash_image(lab, name)).mount()
    return sorted(
        p for p in files.walk_files() if p.endswith((".mpy", ".py")) and p not in ("boot.py", "main.py")
    ) + [d + "/" for d in files.dirs() if d != STORE_DIR]


def app_module_file(port: str) -> str:
    """Where the running app was imported from: read at the REPL after Ctrl-C stopped it (its
    watchdog resets the board a few seconds later, and the app starts again)."""
    console = board_utils.Console(port)
    try:
        console.write(b"\r\x03")
        _, stopped = console.read_until(b">>> ", 10)
        assert stopped, f"{port}: no REPL after Ctrl-C"
        console.write(b"import sys; print('APP', sys.modules['app'].__file__, 'END')\r")
        out, seen = console.read_until(b" END", 5)
        assert seen, out[-300:]
    finally:
        console.close()
    found = re.search(r"APP (\S+) END", out.decode("utf-8", "replace"))
    assert found, out[-300:]
    return found.group(1)


@needs_vboard
def test_provision_the_demo_fleet_byte_for_byte(lab: dict[str, Any]) -> None:
    """The demo lab is in the ROMFS form: config.json, boot.py, main.py and the manifest on each
    board's filesystem, the compiled modules as one image in its ROMFS partition. vb-05 was
    provisioned in the files form before (every .mpy on its filesystem, and a stray source
    module no manifest lists): the ROMFS provisioning removes them, or they would hide /rom."""
    files_form = make(
        "upload", lab, "DEVICE=vb-05", extra={"micropython_variant": "", "board_files_restart": False}
    )
    assert files_form.returncode == 0, files_form.stdout[-4000:]
    assert {"app.mpy", "drivers/", "drivers/sht3x.mpy"} <= set(
        firmware_modules_on_the_filesystem(lab, "vb-05")
    )
    # (the board idles at its REPL: restart False)
    flashfs.FlashFilesystem.open(flash_image(lab, "vb-05")).write_bytes(
        "store.py", "raise ImportError('the stale copy ran')\n"
    )

    result = make("provision", lab)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = summary_rows(result.stdout)
    assert sorted(rows) == DEMO_BOARDS and all(rows[b][1] == "changed" for b in DEMO_BOARDS), result.stdout[
        -2000:
    ]
    assert " ".join(rows["vb-01"][6:]) == "boot.py, config.json, main.py, manifest.json, firmware.romfs"
    assert " ".join(rows["vb-05"][6:]).startswith("manifest.json, firmware.romfs, -app.mpy, ")

    def compare(name: str) -> None:
        folder = lab["build"] / name
        manifest = json.loads((folder / "manifest.json").read_text())
        names = [*manifest["files"], "manifest.json"]
        port = f"socket://127.0.0.1:{7100 + int(name[-2:])}"
        on_board = read_board_files(port, names, lab["root"] / "readback" / name)
        for file_name in names:
            assert on_board[file_name] == (folder / file_name).read_bytes(), (name, file_name)
        # the image is in the board's flash where the port maps the partition
        image = (folder / manifest["romfs"]["file"]).read_bytes()
        with flash_image(lab, name).open("rb") as f:
            f.seek(esprom.ROMFS_OFFSET)
            assert f.read(len(image)) == image, name
        assert firmware_modules_on_the_filesystem(lab, name) == [], name

    with ThreadPoolExecutor(len(DEMO_BOARDS)) as pool:
        list(pool.map(compare, DEMO_BOARDS))


@needs_vboard
@pytest.mark.skipif(
    not (REPO / "firmware" / "main.py").exists(), reason="the firmware application is not here yet"
)
def test_every_board_publishes_with_its_new_config(lab: dict[str, Any]) -> None:
    expected = {
        name: json.loads((lab["build"] / name / "manifest.json").read_text())["config_hash"]
        for name in DEMO_BOARDS
    }
    seen: dict[str, Any] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="provision-test")
    client.username_pw_set("recorder", lab["recorder_password"])
    client.on_message = lambda c, u, m: seen.__setitem__(m.topic.split("/")[1], json.loads(m.payload))
    client.connect("127.0.0.1", lab["port"])
    client.subscribe("labfleet/+/info", qos=1)
    client.loop_start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
            seen.get(n, {}).get("cfg") != h for n, h in expected.items()
        ):
            time.sleep(0.2)
    finally:
        client.loop_stop()
        client.disconnect()
    got = {n: seen.get(n, {}).get("cfg") for n in DEMO_BOARDS}
    silent = [n for n in DEMO_BOARDS if got[n] != expected[n]]
    assert got == expected, "\n".join(f"{n}'s console:\n{console_tail(lab, n)}" for n in silent)
    # the app runs its modules from the ROMFS partition (vb-05: also after the files form)
    for name in ("vb-01", "vb-05"):
        assert app_module_file(f"socket://127.0.0.1:{7100 + int(name[-2:])}") == "/rom/app.mpy", name


@needs_vboard
@pytest.mark.skipif(
    not (REPO / "firmware" / "main.py").exists(), reason="the firmware application is not here yet"
)
def test_the_deployed_recorder_records_the_virtual_boards(lab: dict[str, Any]) -> None:
    """The recorder started exactly as its deployed systemd unit would start it."""
    from recorder.read import summarize

    unit = (lab["root"] / "srv/etc/systemd/system/labfleet-recorder.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    data_dir = lab["root"] / "srv/var/lib/labfleet-recorder"
    log = (lab["root"] / "recorder.log").open("wb")
    proc = subprocess.Popen(shlex.split(exec_start[len("ExecStart=") :]), stdout=log, stderr=log)
    recorded: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(recorded.get(n, 0) > 0 for n in DEMO_BOARDS):
            time.sleep(2)
            if any(data_dir.rglob("*.h5")):
                recorded = {d.device: d.samples for d in summarize([data_dir]).devices}
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    assert all(recorded.get(n, 0) > 0 for n in DEMO_BOARDS), recorded


@needs_vboard
def test_wifi_change_reaches_every_board_then_a_second_run_sends_nothing(lab: dict[str, Any]) -> None:
    """The WiFi password changed in the vault (a copy of the demo inventory, re-encrypted with
    the demo vault password): every board gets it, and only config.json and the manifest travel."""
    inventory = lab["root"] / "inv-new-wifi"
    shutil.copytree(DEMO, inventory)
    vault = inventory / "group_vars/all/vault.yml"
    plain = subprocess.run(
        [
            str(VENV_BIN / "ansible-vault"),
            "view",
            "--vault-password-file",
            str(DEMO_VAULT_PASSWORD),
            str(vault),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    secrets = yaml.safe_load(plain)
    secrets["vault_wifi_passwords"]["labfleet-demo"] = "a-new-wifi-passphrase"
    vault.write_text(yaml.safe_dump(secrets))
    subprocess.run(
        [str(VENV_BIN / "ansible-vault"), "encrypt", "--vault-id", f"demo@{DEMO_VAULT_PASSWORD}", str(vault)],
        capture_output=True,
        check=True,
    )
    assert "a-new-wifi-passphrase" not in vault.read_text()
    first = make("reprovision", lab, inventory=inventory)
    assert first.returncode == 0, first.stdout[-4000:]
    rows = summary_rows(first.stdout)
    for name in DEMO_BOARDS:
        assert rows[name][1:3] == ["changed", "2"], rows[name]
        assert " ".join(rows[name][6:]) == "config.json, manifest.json", rows[name]
        # only those bytes: not the ROMFS image, not boot.py or main.py
        build = lab["build"] / name
        assert int(rows[name][3]) == sum((build / f).stat().st_size for f in ("config.json", "manifest.json"))
        port = f"socket://127.0.0.1:{7100 + int(name[-2:])}"
        config = read_board_files(port, ["config.json"], lab["root"] / "wifi" / name)["config.json"]
        assert json.loads(config)["wifi"] == [{"ssid": "labfleet-demo", "password": "a-new-wifi-passphrase"}]
    second = make("reprovision", lab, inventory=inventory)
    assert second.returncode == 0, second.stdout[-4000:]
    rows = summary_rows(second.stdout)
    assert all(rows[name][1] == "unchanged" and rows[name][3] == "0" for name in DEMO_BOARDS)
    assert "changed=0 unchanged=5 failed=0 not_connected=0 bytes_sent=0" in second.stdout
    for name in DEMO_BOARDS:
        recap = [
            line for line in second.stdout.splitlines() if line.startswith(f"{name} ") and "changed=" in line
        ]
        assert recap and " changed=0 " in recap[0], recap


@needs_vboard
@pytest.mark.slow
def test_unplugged_board_is_not_connected_and_retried_alone(lab: dict[str, Any]) -> None:
    lab["fleet"].stop("vb-05")
    change = {"board_health_s": 30}
    result = make("reprovision", lab, extra=change)
    assert result.returncode != 0
    rows = summary_rows(result.stdout)
    assert rows["vb-05"][1:3] == ["not", "connected"], rows["vb-05"]
    assert all(rows[name][1] == "changed" for name in DEMO_BOARDS[:4])
    retry_file = lab["build"] / "reprovision.retry"
    assert retry_file.read_text().split() == ["vb-05"]
    lab["fleet"].start("vb-05", ["vb-05"])  # plugged back in, its flash as it was
    retried = make("reprovision", lab, "RETRY=1", extra=change)
    assert retried.returncode == 0, retried.stdout[-4000:]
    assert sorted(summary_rows(retried.stdout)) == ["vb-05"]
    assert summary_rows(retried.stdout)["vb-05"][1] == "changed"
    assert retry_file.read_text() == ""
    nothing = make("reprovision", lab, "RETRY=1", extra=change)
    assert nothing.returncode == 0 and "nothing to retry" in nothing.stdout


@needs_vboard
@pytest.mark.slow
def test_check_mode_reports_and_changes_nothing_on_the_boards(lab: dict[str, Any]) -> None:
    change = {"board_health_s": 45}
    check = make("reprovision", lab, "CHECK=1", extra=change)
    assert check.returncode == 0, check.stdout[-4000:]
    assert "config.json" in check.stdout  # the diff names what would be sent
    # Nothing was sent: the boards still hold the previous build's config.
    port = "socket://127.0.0.1:7101"
    manifest_on_board = read_board_files(port, ["manifest.json"], lab["root"] / "check")["manifest.json"]
    previous = json.loads(manifest_on_board)["config_hash"]
    rendered = run_playbook(
        DEMO,
        "--tags",
        "build",
        "--limit",
        "vb-01",
        vault_password_file=DEMO_VAULT_PASSWORD,
        extra_vars={**lab["extra"], **change, "labfleet_build_dir": str(lab["root"] / "build-check")},
    )
    assert rendered.rc == 0
    assert (
        json.loads((lab["root"] / "build-check/vb-01/manifest.json").read_text())["config_hash"] != previous
    )


@needs_vboard
@pytest.mark.slow
def test_flash_is_skipped_when_the_release_matches_and_planned_when_it_differs(lab: dict[str, Any]) -> None:
    same = make("flash", lab, "DEVICE=vb-02")
    assert same.returncode == 0, same.stdout[-3000:]
    assert (
        "the board already runs MicroPython" in same.stdout or summary_rows(same.stdout)["vb-02"][4] == "no"
    )
    image = lab["root"] / "fw.bin"  # stands in for a MicroPython image: check mode writes nothing
    image.write_bytes(b"\xe9" + bytes(4095))
    other = run_playbook(
        DEMO,
        "--tags",
        "build,flash",
        "--limit",
        "vb-02",
        "--check",
        "--diff",
        vault_password_file=DEMO_VAULT_PASSWORD,
        extra_vars={
            **lab["extra"],
            "board_flash_micropython_version": "1.28.0",
            "micropython_firmware": str(image),
            "micropython_firmware_sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
        },
    )
    assert other.rc == 0, other.output[-3000:]
    # The flash task's diff: what runs now, what would be written.
    assert "-MicroPython 1.27.0" in other.output and "+MicroPython 1.28.0" in other.output


@needs_vboard
@pytest.mark.slow
def test_a_board_is_found_by_its_mac(lab: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    port_module = load_role_module("board_port", "labfleet_board_port")
    monkeypatch.setattr(port_module, "MAC_CACHE", str(lab["root"] / "mac-ports.json"))
    # The virtual board's MAC: Espressif's OUI and three bytes of sha256(name) (vboard/spec.py).
    mac = ":".join(f"{b:02x}" for b in bytes.fromhex("5ccf7f") + hashlib.sha256(b"vb-03").digest()[:3])
    ports = [f"socket://127.0.0.1:{p}" for p in range(7101, 7106)]
    found = port_module.find_by_mac(mac, str(VENV_BIN / "mpremote"), ports, claimed=set())
    assert found == "socket://127.0.0.1:7103"
    remembered = json.loads((lab["root"] / "mac-ports.json").read_text())
    assert remembered[mac] == found  # the next lookup asks this port first


@needs_vboard
def test_the_real_esptool_flashes_a_board_whose_release_differs_and_then_leaves_it(
    lab: dict[str, Any],
) -> None:
    """`make flash` with another MicroPython release configured: the real esptool erases vb-04
    and writes the image through the virtual board's ROM loader, the board boots that release
    with an empty filesystem, every file is uploaded again. That image is the default variant
    (files form): the ROMFS form's upload then refuses the board, which has no ROMFS partition,
    and `make flash` writes the FLASH_2M_ROMFS build although the release matches; the board
    runs its modules from /rom, and a second run leaves the flash alone. (Last in this module:
    vb-04 runs 1.28.0 afterwards.)"""
    from vboard.esprom import build_firmware_image

    def image_of(variant: str) -> dict[str, Any]:
        image = lab["root"] / f"micropython-1.28.0{variant}.bin"
        image.write_bytes(build_firmware_image("1.28.0", "2026-11-01", size=0x40000, variant=variant))
        return {
            "board_flash_micropython_version": "1.28.0",
            "micropython_firmware": str(image),
            "micropython_firmware_sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
        }

    # The files form at the default heap does not fit: its upload does not restart the app.
    files_form = {**image_of(""), "micropython_variant": "", "board_files_restart": False}
    first = make("flash", lab, "DEVICE=vb-04", extra=files_form)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    row = summary_rows(first.stdout)["vb-04"]
    assert row[1] == "changed" and row[4] == "yes", row
    # What esptool wrote is on the board's flash: the image, with the header's flash mode (dio,
    # NodeMCU) and detected size (4 MB) as esptool set them
    flash = flash_image(lab, "vb-04").read_bytes()
    written = (lab["root"] / "micropython-1.28.0.bin").read_bytes()
    assert flash[:2] == written[:2] and flash[4 : len(written)] == written[4:]
    assert flash[2] == 0x02 and flash[3] >> 4 == 0x4, flash[:4].hex()
    port = "socket://127.0.0.1:7104"
    info = board_utils.board_exec(str(VENV_BIN / "mpremote"), port, board_utils.INFO_SCRIPT)
    assert info["release"] == "1.28.0" and info["romfs"] == 0, info
    # the erase took the files with it: all of them were uploaded again, and they are right
    build = lab["build"] / "vb-04"
    manifest = json.loads((build / "manifest.json").read_text())
    names = sorted(manifest["files"])
    assert int(row[2]) == len(names) + 1  # and the manifest
    on_board = read_board_files(port, names, lab["root"] / "flashed", restart=False)
    assert all(on_board[name] == (build / name).read_bytes() for name in names)

    # The ROMFS form needs the partition this image does not map: a clear failure, nothing sent.
    refused = make("upload", lab, "DEVICE=vb-04", extra={"board_files_restart": False})
    assert refused.returncode != 0
    row = summary_rows(refused.stdout)["vb-04"]
    assert row[1] == "failed", row
    status = json.loads((lab["build"] / "provision" / "status.json").read_text())["vb-04"]
    assert "no ROMFS partition" in status["message"], status
    assert "flash the FLASH_2M_ROMFS variant: make flash DEVICE=vb-04" in status["message"], status
    assert status["sent_bytes"] == 0
    assert "app.mpy" in firmware_modules_on_the_filesystem(lab, "vb-04")  # as it was

    romfs = image_of("FLASH_2M_ROMFS")
    second = make("flash", lab, "DEVICE=vb-04", extra=romfs)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    row = summary_rows(second.stdout)["vb-04"]
    assert row[1] == "changed" and row[4] == "yes", row  # though the release matched
    flash = flash_image(lab, "vb-04").read_bytes()
    assert b"ESP8266_GENERIC-FLASH_2M_ROMFS\x00" in flash[:0x40000]
    assert "firmware.romfs" in " ".join(row[6:]), row
    assert firmware_modules_on_the_filesystem(lab, "vb-04") == []
    assert app_module_file(port) == "/rom/app.mpy"

    third = make("flash", lab, "DEVICE=vb-04", extra=romfs)
    assert third.returncode == 0, third.stdout[-4000:]
    row = summary_rows(third.stdout)["vb-04"]
    assert row[1] == "unchanged" and row[4] == "no", row
