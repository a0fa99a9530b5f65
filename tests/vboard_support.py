"""Helpers for tests that drive virtual boards: a fleet fixture and a serial client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

MPREMOTE = str(Path(sys.executable).parent / "mpremote")


class SerialClient:
    """A raw TCP client on a board's console, as a terminal would be."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, pattern: bytes, timeout: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while pattern not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{pattern!r} not seen; got {bytes(self.buf[-500:])!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError(f"console closed; got {bytes(self.buf[-500:])!r}")
            self.buf += chunk
        end = self.buf.index(pattern) + len(pattern)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def close(self) -> None:
        self.sock.close()


def mpremote(url: str, *args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        [MPREMOTE, "connect", url, *args], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"mpremote {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout
