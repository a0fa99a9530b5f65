"""A virtual board's serial console: a TCP port (`socket://127.0.0.1:PORT` for pyserial,
mpremote and esptool) bridged to the stdin/stdout of its MicroPython process.

Like a USB-serial adapter it has one user at a time (a second connection is told the port is
busy and closed), output nobody reads is dropped (it always goes to the board's log file),
and bytes sent while the board restarts wait in a small buffer, as in the adapter's FIFO.

The ESP8266's UART turns Ctrl-C into a KeyboardInterrupt only while code runs (the REPL
reads it as a character otherwise); the board tells the bridge when that is the case, and
the bridge then delivers Ctrl-C as SIGINT to the interpreter. Output is cooked as the port's
`mp_hal_stdout_tx_strn_cooked` does: a bare "\\n" becomes "\\r\\n".

While the chip sits in its serial bootloader (vboard/esprom.py) the port carries the loader's
binary SLIP frames instead: `send_raw` writes them uncooked, and the interpreter's output is
held back from the client (`app_muted`; it still reaches the log). `on_disconnect` tells the
board when the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

CTRL_C = 0x03
PENDING_LIMIT = 4096


class ConsoleBridge:
    def __init__(self, log_path: Path, on_input: Callable[[bytes], None]) -> None:
        self.log_path = log_path
        self.on_input = on_input
        self.port = 0
        self.client: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._last_byte = 0
        self._log = log_path.open("ab", buffering=0)
        self.output_listeners: list[Callable[[bytes], None]] = []
        self.on_disconnect: Callable[[], None] | None = None
        self.app_muted = False

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def detach(self) -> None:
        """The USB cable is pulled: the port disappears (the board runs on)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self.client is not None:
            self.client.close()
            self.client = None
            if self.on_disconnect is not None:
                self.on_disconnect()

    async def attach(self) -> None:
        if self._server is None:
            await self.start(self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self.client is not None:
            self.client.close()
        self._log.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.client is not None and not self.client.is_closing():
            writer.write(b"port busy: another client is connected to this board's console\r\n")
            writer.close()
            return
        self.client = writer
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                self.on_input(data)
        except (ConnectionError, OSError):
            pass
        finally:
            if self.client is writer:
                self.client = None
                if self.on_disconnect is not None:
                    self.on_disconnect()
            writer.close()

    def cook(self, data: bytes) -> bytes:
        out = bytearray()
        prev = self._last_byte
        for b in data:
            if b == 0x0A and prev != 0x0D:
                out.append(0x0D)
            out.append(b)
            prev = b
        if data:
            self._last_byte = data[-1]
        return bytes(out)

    def output(self, data: bytes) -> None:
        cooked = self.cook(data)
        self._log.write(cooked)
        for listener in list(self.output_listeners):
            listener(cooked)
        client = self.client
        if client is not None and not client.is_closing() and not self.app_muted:
            client.write(cooked)

    def send_raw(self, data: bytes) -> None:
        """Binary output (the serial bootloader's frames): not cooked, never muted."""
        self._log.write(data)
        for listener in list(self.output_listeners):
            listener(data)
        client = self.client
        if client is not None and not client.is_closing():
            client.write(data)
