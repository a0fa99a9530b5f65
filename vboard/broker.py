"""A local mosquitto broker on 127.0.0.1 for tests, benchmarks and `make demo`.

Started from a generated config in its own directory, on a free port, with persistence on and
saved on every change (the defaults lose data: persistence off, autosave every 30 minutes,
1,000 queued messages per client). It can be killed with SIGKILL and restarted on the same
port and persistence file, which is what the "broker restart mid-run" scenarios need.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from vboard.procs import stop_process


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "mosquitto is not installed: `apt-get install mosquitto` (CI does this in .ci/run), "
        "or `make demo` falls back to the embedded broker"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing is listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.02)


class Amqtt:
    """The embedded Python broker `make demo` falls back to when mosquitto is not installed
    (no root needed). Fine for a demo; the lab runs mosquitto (roles/mosquitto)."""

    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        binary = Path(sys.executable).parent / "amqtt"
        if not binary.exists():
            raise BrokerError("neither mosquitto nor amqtt is installed (`make venv` installs amqtt)")
        self.binary = str(binary)

    @property
    def log_path(self) -> Path:
        return self.workdir / "amqtt.log"

    def start(self, timeout: float = 20.0) -> Amqtt:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "amqtt.yaml"
        config.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(config)], stdout=log, stderr=log, start_new_session=True
            )
        wait_for_port(self.port, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def local_broker(workdir: Path, port: int = 0) -> Mosquitto | Amqtt:
    """mosquitto when it is installed, else the embedded amqtt (not started yet)."""
    try:
        return Mosquitto(workdir, port=port)
    except BrokerError:
        return Amqtt(workdir, port=port)


class Mosquitto:
    """One mosquitto process. `extra_config` lines are appended to the generated config."""

    def __init__(
        self,
        workdir: Path,
        port: int = 0,
        persistence: bool = True,
        max_queued_messages: int = 1_000_000,
        extra_config: list[str] | None = None,
        allow_anonymous: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.extra_config = list(extra_config or [])
        self.allow_anonymous = allow_anonymous
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = find_mosquitto()

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Run as whoever started us: as root, mosquitto would switch to the `mosquitto` user
            # and could not write its persistence file in our directory.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            # Save on every change: a kill -9 must not lose what the broker acknowledged.
            "autosave_interval 1",
            "autosave_on_changes true",
            f"max_queued_messages {self.max_queued_messages}",
            "max_inflight_messages 100",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=log,
            stderr=log,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout)
        except BrokerError:
            self.kill()
            raise BrokerError(f"mosquitto did not start; its log:\n{self.log_tail()}") from None
        if self.proc.poll() is not None:
            raise BrokerError(f"mosquitto exited at start; its log:\n{self.log_tail()}")
        return self

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): mosquitto saves its persistence file."""
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a power cut or OOM kill would: nothing is saved beyond the last autosave."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, hard: bool = False) -> None:
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
