"""Control of a running fleet: fault injection and status, from scenario events, from the
`vboard ctl` command (a JSON-lines Unix socket in the fleet's work directory), and from tests.

Every action is a coroutine run on the fleet's loop; arguments are by name. `ACTIONS` lists
them with their arguments, for `--help` and for validating scenario files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vboard.board import Board
from vboard.fleet import Fleet

CONTROL_SOCKET = "control.sock"

ACTIONS: dict[str, str] = {
    "status": "every board's state (no arguments)",
    "reset": "board=NAME: hard reset (RST pin)",
    "power_off": "board=NAME: unplug the board's power (the DS3231 keeps time on its battery)",
    "power_on": "board=NAME: power it again",
    "wifi_drop": "board=NAME seconds=S: no access point reachable for S simulated seconds",
    "ap_down": "ssid=SSID: the access point goes off the air (every board)",
    "ap_up": "ssid=SSID: it comes back",
    "ap_password": "ssid=SSID password=PW: the access point's WPA2 password changes",
    "unplug": "board=NAME chip=rtc|ambient|thermocouple: the chip stops answering",
    "replug": "board=NAME chip=...: it answers again",
    "crc_errors": "board=NAME chip=ambient count=N: the next N replies carry a bad CRC",
    "tc_open": "board=NAME on=true|false: open thermocouple",
    "cut": "board=NAME: reset the board's live TCP connections (a router or broker dropping them)",
    "press": "board=NAME seconds=S [pin=GPIO]: hold the flash button (GPIO0) for S simulated seconds",
    "override": "board=NAME quantity=kT|aT|aH|... value=X (or value=null to clear): force a physical value",
    "speed": "value=N: simulated seconds per real second, from now on",
    "ntp": "on=true|false: the LAN's NTP responder answers or not",
    "console_detach": "board=NAME: the USB cable is pulled: nothing listens on its console port",
    "console_attach": "board=NAME: plugged in again",
}


def _board(fleet: Fleet, args: dict[str, Any]) -> Board:
    name = args.get("board")
    if name not in fleet.boards:
        raise KeyError(f"no board {name!r}; boards: {', '.join(sorted(fleet.boards))}")
    return fleet.boards[str(name)]


def _chip(board: Board, args: dict[str, Any]) -> Any:
    role = str(args.get("chip", "ambient"))
    if role not in board.chips:
        raise KeyError(f"board {board.name!r} has no {role!r} chip; it has {', '.join(board.chips)}")
    return board.chips[role]


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return bool(value)


async def perform(fleet: Fleet, action: str, args: dict[str, Any]) -> Any:
    if action not in ACTIONS:
        raise KeyError(f"unknown action {action!r}; actions: {', '.join(ACTIONS)}")
    lan = fleet.lan
    if action == "status":
        return [b.status() for b in fleet.boards.values()]
    if action == "speed":
        anchors = fleet.clock.set_speed(float(args["value"]))
        for board in fleet.boards.values():
            board.clock_changed(anchors)
        return {"speed": fleet.clock.speed}
    if action == "ntp":
        lan.ntp_up = _truthy(args.get("on", True))
        return None
    if action in ("ap_down", "ap_up", "ap_password"):
        ssid = str(args["ssid"])
        if ssid not in lan.access_points:
            raise KeyError(f"no access point {ssid!r}; access points: {', '.join(lan.access_points)}")
        ap = lan.access_points[ssid]
        if action == "ap_password":
            ap.password = str(args["password"])
        else:
            ap.up = action == "ap_up"
        for board in fleet.boards.values():
            board.station.advance()
        return None
    board = _board(fleet, args)
    simple: dict[str, Callable[[], Awaitable[Any] | Any]] = {
        "reset": board.reset,
        "power_off": board.power_off,
        "power_on": board.power_on,
        "cut": board.gateway.cut,
        "console_detach": board.console.detach,
        "console_attach": board.console.attach,
    }
    if action in simple:
        result = simple[action]()
        return await result if asyncio.iscoroutine(result) else result
    if action == "wifi_drop":
        board.station.drop_link(float(args["seconds"]))
        return None
    if action in ("unplug", "replug"):
        _chip(board, args).faults.plugged = action == "replug"
        return None
    if action == "crc_errors":
        _chip(board, args).faults.crc_error_next = int(args.get("count", 1))
        return None
    if action == "tc_open":
        board.chips["thermocouple"].faults.tc_open = _truthy(args.get("on", True))
        return None
    if action == "press":
        gpio = int(args.get("pin", board.spec.pins["button"]))
        board.press(gpio, True)
        await asyncio.sleep(fleet.clock.real_delay(float(args.get("seconds", 3))))
        board.press(gpio, False)
        return None
    if action == "override":
        value = args.get("value")
        if value is None or value == "null":
            board.env.clear_override(str(args["quantity"]))
        else:
            board.env.set_override(str(args["quantity"]), float(value))
        return None
    raise AssertionError(action)


async def run_events(fleet: Fleet, events: list[Any]) -> None:
    """Scenario events at their simulated times after the fleet started."""
    start = fleet.clock.now()
    for event in events:
        await asyncio.sleep(fleet.clock.real_until(start + event.at))
        try:
            await perform(fleet, event.action, event.args)
        except Exception as e:  # a bad event is reported, the fleet keeps running
            print(f"scenario event at +{event.at:g}s {event.action} {event.args}: {e}", flush=True)


async def serve(fleet: Fleet, path: Path) -> asyncio.Server:
    """JSON lines: {"action": ..., "args": {...}} -> {"ok": true, "result": ...}
    or {"ok": false, "error": ...}"""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    result = await perform(fleet, str(request["action"]), dict(request.get("args") or {}))
                    reply = {"ok": True, "result": result}
                except Exception as e:
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return await asyncio.start_unix_server(handle, str(path))


def request(path: Path, action: str, args: dict[str, Any], timeout: float = 60) -> Any:
    """Client side of `serve` (used by `vboard ctl` and by tests driving a fleet process)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            raise ConnectionError(f"no fleet is running with control socket {path} ({e.strerror})") from None
        s.sendall(json.dumps({"action": action, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply["ok"]:
        raise RuntimeError(reply["error"])
    return reply["result"]
