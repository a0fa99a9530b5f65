"""A fleet of virtual boards sharing one simulated clock, one radio environment and one NTP
responder, run by an asyncio loop.

`Fleet` is used two ways: by the CLI (`vboard run`, `vboard fleet`), which runs it in the
foreground, and by tests and benchmarks, which run it in a background thread and reach into
it through `run()` (await a coroutine on the fleet's loop) and `call()` (run a function
there — anything that touches sockets or tasks must go through these).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from vboard.board import Board
from vboard.clock import SimClock
from vboard.net import Lan, NtpResponder
from vboard.spec import BoardSpec, LanSpec, parse_hostport

T = TypeVar("T")


def build_lan(spec: LanSpec) -> Lan:
    lan = Lan()
    for ap in spec.access_points:
        lan.add_ap(str(ap["ssid"]), str(ap.get("password", "")), int(ap.get("rssi", -55)))
    lan.hosts.update(spec.hosts)
    for src, dst in spec.routes.items():
        lan.routes[parse_hostport(src, "routes")] = parse_hostport(dst, "routes")
    for target_host, _ in lan.routes.values():
        if target_host != "127.0.0.1":
            raise ValueError(f"routes may only lead to 127.0.0.1, not {target_host}")
    return lan


class Fleet:
    def __init__(
        self,
        workdir: Path,
        speed: float = 1.0,
        start_time: float | None = None,
        lan: LanSpec | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.clock = SimClock(start_time, speed)
        self.lan = build_lan(lan or LanSpec())
        self.boards: dict[str, Board] = {}
        self.ntp: NtpResponder | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- running in the foreground (CLI) -------------------------------------------------

    async def astart(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ntp = await NtpResponder.start(self.clock.now, self.lan)

    async def aadd(self, spec: BoardSpec) -> Board:
        if spec.name in self.boards:
            raise ValueError(f"two boards named {spec.name!r}")
        board = Board(spec, self.workdir / spec.name, self.clock, self.lan)
        await board.start()
        self.boards[spec.name] = board
        await asyncio.wait_for(board.ready.wait(), timeout=60)
        return board

    async def astop(self) -> None:
        await asyncio.gather(*(b.stop() for b in self.boards.values()), return_exceptions=True)
        if self.ntp is not None and self.ntp.transport is not None:
            self.ntp.transport.close()

    # -- running in a background thread (tests, benchmarks, demo) --------------------------

    def start(self) -> Fleet:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.astart())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.astop())
            loop.close()

        self._thread = threading.Thread(target=main, name="vboard-fleet", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def stop(self) -> None:
        loop = self.loop
        if loop is None or self._thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(60)
        self._thread = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the fleet's loop and wait for its result."""
        assert self.loop is not None, "fleet not started"
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"fleet operation did not finish within {timeout} s") from None

    def call(self, fn: Callable[[], T], timeout: float | None = 30) -> T:
        """Run a plain function on the fleet's loop thread and return its result."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def add(self, spec: BoardSpec) -> Board:
        return self.run(self.aadd(spec), timeout=60)

    def wait_repl(self, board: Board, timeout: float = 60) -> None:
        """Until the board has run boot.py and main.py and waits in its REPL."""

        async def waiter() -> None:
            await asyncio.wait_for(board.at_repl.wait(), timeout)

        self.run(waiter(), timeout + 5)

    def wait_output(self, board: Board, pattern: bytes, timeout: float) -> bytes:
        async def waiter() -> bytes:
            return await board.wait_output(pattern, timeout)

        return self.run(waiter(), timeout + 5)

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
