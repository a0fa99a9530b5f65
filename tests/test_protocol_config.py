"""The shared protocol and config-schema modules, in CPython and in the real MicroPython."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from firmware import config, protocol

VALID: dict[str, Any] = {
    "device": "lab-01",
    "wifi": [{"ssid": "lab", "password": "correct horse"}],
    "broker": {"host": "192.168.1.10"},
}


def test_minimal_config_is_valid_and_gets_seed_defaults() -> None:
    assert config.validate(VALID) == []
    full = config.with_defaults(VALID)
    assert full["pins"] == {"i2c_scl": 5, "i2c_sda": 4, "spi_cs": 15, "sqw": 2, "button": 0, "safe_mode": 13}
    assert full["broker"]["port"] == 1883
    assert full["buffer"]["flash_samples"] >= 6 * 3600


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"device": "Lab 01"}, "device must be"),
        ({"device": "../x"}, "device must be"),
        ({"wifi": []}, "wifi must be a list"),
        ({"wifi": [{"ssid": "lab", "password": "short"}]}, "wifi[0].password"),
        ({"broker": {"host": "b", "port": 70000}}, "broker.port"),
        ({"broker": {"host": "b", "user": "u"}}, "given together"),
        ({"sensors": {"thermocouple": "MAX9999"}}, "sensors.thermocouple"),
        ({"sensors": {"ambient": "DHT22"}}, "sensors.ambient"),
        ({"pins": {"sqw": 4}}, "both use GPIO4"),
        ({"pins": {"spi_cs": 14}}, "HSPI SCK"),
        ({"pins": {"sqw": 7}}, "usable GPIO"),
        ({"buffer": {"flush_s": 500, "ram_samples": 100}}, "flush_s must not exceed"),
        ({"buffer": {"flush_s": 10, "resend_s": 10}}, "resend_s must be less than buffer.flush_s"),
        ({"buffer": {"resend_s": -1}}, "buffer.resend_s"),
        ({"topic_prefix": "lab/#"}, "topic_prefix"),
        ({"wlan": []}, "unknown key 'wlan'"),
        ({"pins": {"sda": 4}}, "unknown key pins.sda"),
    ],
)
def test_bad_config_names_the_variable(patch: dict[str, Any], message: str) -> None:
    cfg = {**VALID, **patch}
    errors = config.validate(cfg)
    assert any(message in e for e in errors), errors


def test_missing_required_keys() -> None:
    assert config.validate({"device": "x"}) == ["missing 'wifi'", "missing 'broker'"]
    assert config.validate([]) == ["the config must be a JSON object"]


def test_topics_round_trip() -> None:
    t = protocol.topic("labfleet", "lab-01", protocol.DATA)
    assert t == "labfleet/lab-01/data"
    assert protocol.parse_topic("labfleet", t) == ("lab-01", "data")
    assert protocol.parse_topic("labfleet", "labfleet/lab-01/other") is None
    assert protocol.parse_topic("labfleet", "labfleet/../data") is None
    assert protocol.parse_topic("other", t) is None
    assert protocol.subscriptions("p") == ["p/+/status", "p/+/info", "p/+/data", "p/+/health"]


def test_hundredths_round_half_away_from_zero() -> None:
    assert protocol.to_hundredths(24.25) == 2425
    assert protocol.to_hundredths(-0.25) == -25
    assert protocol.to_hundredths(22.005) in (2200, 2201)  # binary float: either is honest
    assert protocol.to_hundredths(None) is None
    assert protocol.flag_names(protocol.FLAG_TC_OPEN | protocol.FLAG_AMB_CRC) == ["tc_open", "amb_crc"]


def test_modules_run_unchanged_on_micropython(micropython_bin: str, repo: Path, tmp_path: Path) -> None:
    """Both modules are deployed to the boards: they must import and agree under real MicroPython."""
    (tmp_path / "config.json").write_text(json.dumps({**VALID, "device": "Bad Name"}))
    script = (
        "import sys\nsys.path.insert(0, {!r})\n"
        "import config, protocol\n"
        "print(protocol.topic('p', 'd', protocol.DATA))\n"
        "print(config.load('config.json')[1])\n"
        "print(config.validate({!r}))\n".format(str(repo / "firmware"), VALID)
    )
    out = subprocess.run(
        [micropython_bin, "-X", "heapsize=64K", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "p/d/data"
    assert "device must be" in out[1]
    assert out[2] == "[]"
