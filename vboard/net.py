"""The virtual boards' radio and network: access points, each board's station interface, a
gateway that carries every board connection to its real target on 127.0.0.1, and an NTP
responder that answers with simulated time.

Nothing a board does leaves 127.0.0.1: names resolve through the LAN's host table (plus
`localhost`), connections to 127.0.0.1 pass through unchanged, any other address must be
mapped by a route (e.g. the example lab's `192.168.1.10:1883` -> `127.0.0.1:18830`) or is
unreachable, and UDP port 123 anywhere reaches the NTP responder.

Link loss (an access point going down, `Station.drop_link()`) stalls every live TCP
connection of the board: nothing is forwarded either way, as when frames stop flowing. If the
link comes back within `TCP_ABORT_S` (simulated) the connection carries on; otherwise the
board's side is reset (the board sees ECONNRESET, as lwIP aborting the PCB) and the far side
closed (the broker sees the client vanish and publishes its will). New connections and DNS
fail at once while the station has no IP.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vboard.clock import SimClock

TCP_ABORT_S = 30.0  # simulated seconds a stalled connection survives
ASSOCIATE_S = 1.5  # simulated seconds from connect() to GOT_IP
SCAN_S = 3.0  # simulated seconds before NO_AP_FOUND
RETRY_S = 5.0  # simulated seconds between automatic reconnect attempts
EAI_FAIL = -2  # what the ESP8266 port raises for a failed DNS lookup
NTP_PORT = 123
NTP_EPOCH_OFFSET = 2_208_988_800  # 1900-01-01 to 1970-01-01

STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_WRONG_PASSWORD = 2
STAT_NO_AP_FOUND = 3
STAT_CONNECT_FAIL = 4
STAT_GOT_IP = 5


@dataclass
class AccessPoint:
    ssid: str
    password: str = ""
    rssi: int = -55
    channel: int = 6
    up: bool = True

    @property
    def bssid(self) -> bytes:
        return b"\x02" + hashlib.sha256(self.ssid.encode()).digest()[:5]

    @property
    def authmode(self) -> int:
        return 3 if self.password else 0  # AUTH_WPA2_PSK / AUTH_OPEN


@dataclass
class Lan:
    """What every board's radio can hear and reach."""

    access_points: dict[str, AccessPoint] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address on the virtual LAN
    routes: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    ntp_port: int = 0
    ntp_up: bool = True

    def add_ap(self, ssid: str, password: str = "", rssi: int = -55) -> AccessPoint:
        ap = AccessPoint(ssid, password, rssi)
        self.access_points[ssid] = ap
        return ap

    def resolve(self, name: str) -> str | None:
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            pass
        if name == "localhost":
            return "127.0.0.1"
        return self.hosts.get(name)

    def target(self, ip: str, port: int) -> tuple[str, int] | None:
        if (ip, port) in self.routes:
            return self.routes[(ip, port)]
        if ip == "127.0.0.1":
            return (ip, port)
        return None


class Station:
    """One board's station (STA) and access-point (AP) interfaces, ESP8266 SDK semantics.

    The SDK keeps the interface modes and the last credentials in flash and reconnects by
    itself, so `saved` and the `*_active` flags survive resets; the link does not."""

    def __init__(self, lan: Lan, clock: SimClock, mac: bytes) -> None:
        self.lan = lan
        self.clock = clock
        self.mac = mac
        self.sta_active = True
        self.ap_active = True  # a fresh ESP8266 MicroPython starts its "MicroPython-xxxxxx" AP
        self.saved: tuple[str, str] | None = None
        self.wanted = False  # connect() called and not disconnect()ed: the SDK keeps trying
        self.phase = STAT_IDLE
        self.phase_since = 0.0
        self.connected_ap: AccessPoint | None = None
        self.ip = "0.0.0.0"
        self.on_link_change: list[Callable[[bool], None]] = []
        self.dropped_until = 0.0
        self.connects = 0

    # -- SDK state machine, advanced lazily whenever someone looks ------------------------

    def _set(self, phase: int, now: float) -> None:
        was_up = self.phase == STAT_GOT_IP
        self.phase, self.phase_since = phase, now
        if was_up != (phase == STAT_GOT_IP):
            for cb in list(self.on_link_change):
                cb(phase == STAT_GOT_IP)

    def advance(self) -> int:
        now = self.clock.now()
        if not self.sta_active or self.saved is None or not self.wanted:
            if self.phase != STAT_IDLE:
                self._set(STAT_IDLE, now)
            return self.phase
        ssid, password = self.saved
        ap = self.lan.access_points.get(ssid)
        reachable = ap is not None and ap.up and now >= self.dropped_until
        if self.phase == STAT_GOT_IP:
            if not reachable or ap is not self.connected_ap:
                self.connected_ap = None
                self._set(STAT_CONNECTING, now)  # the SDK starts reconnecting on its own
            return self.phase
        if self.phase in (STAT_IDLE, STAT_NO_AP_FOUND, STAT_CONNECT_FAIL):
            if self.phase != STAT_IDLE and now - self.phase_since >= RETRY_S:
                self._set(STAT_CONNECTING, now)
            return self.phase
        if self.phase == STAT_CONNECTING:
            waited = now - self.phase_since
            if reachable and ap is not None and waited >= ASSOCIATE_S:
                if ap.password != password:
                    self._set(STAT_WRONG_PASSWORD, now)
                else:
                    self.connected_ap = ap
                    self.ip = f"10.0.{self.mac[4]}.{self.mac[5] or 1}"
                    self.connects += 1
                    self._set(STAT_GOT_IP, now)
            elif not reachable and waited >= SCAN_S:
                self._set(STAT_NO_AP_FOUND, now)
        return self.phase

    @property
    def link_up(self) -> bool:
        return self.advance() == STAT_GOT_IP

    def connect(self, ssid: str | None, password: str | None) -> None:
        if not self.sta_active:
            raise OSError("Wifi Internal Error")
        if ssid is not None:
            self.saved = (ssid, password or "")
        if self.saved is None:
            raise OSError("Wifi Invalid Argument")
        self.connected_ap = None
        self.wanted = True
        self._set(STAT_CONNECTING, self.clock.now())

    def disconnect(self) -> None:
        # after disconnect() the SDK does not reconnect until connect() is called again
        self.wanted = False
        self.connected_ap = None
        self._set(STAT_IDLE, self.clock.now())

    def power_cycle(self) -> None:
        """Radio reset (any chip reset): the link goes, the saved config auto-connects."""
        now = self.clock.now()
        self.connected_ap = None
        self.wanted = self.sta_active and self.saved is not None
        self._set(STAT_CONNECTING if self.wanted else STAT_IDLE, now)

    def drop_link(self, seconds: float) -> None:
        """Interference: no AP reachable for `seconds` of simulated time."""
        self.dropped_until = self.clock.now() + seconds
        self.advance()

    def rssi(self) -> int:
        if self.connected_ap is None:
            return -100
        return self.connected_ap.rssi

    def scan(self) -> list[list[object]]:
        return [
            [ap.ssid, list(ap.bssid), ap.channel, ap.rssi, ap.authmode, 0]
            for ap in self.lan.access_points.values()
            if ap.up
        ]


class _Conn:
    """One proxied TCP connection between a board and its real target."""

    def __init__(self, board_w: asyncio.StreamWriter, far_w: asyncio.StreamWriter) -> None:
        self.board_w = board_w
        self.far_w = far_w
        self.stalled = asyncio.Event()
        self.stalled.set()  # set = flowing
        self.closed = False
        self.bytes_up = 0
        self.bytes_down = 0

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        sock = self.board_w.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0: close() sends RST, the board sees ECONNRESET
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.board_w.close()
        self.far_w.close()


class Gateway:
    """A board's way out: resolves, routes and proxies its connections."""

    def __init__(
        self, lan: Lan, station: Station, clock: SimClock, answer_time: Callable[[], float] | None = None
    ) -> None:
        self.lan = lan
        self.station = station
        self.clock = clock
        # when the answer to the board's newest datagram is made, in the board's own simulated
        # time (it may trail the fleet's clock: vboard/README.md): its NTP answers are in that
        # time, so what it learns agrees with its own DS3231 (Board.answer_time)
        self.answer_time = answer_time or clock.now
        self.ntp: NtpResponder | None = None
        self.conns: list[_Conn] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self._abort_task: asyncio.Task[None] | None = None
        self._proxies: set[asyncio.Task[None]] = set()
        station.on_link_change.append(self._link_changed)

    def resolve(self, name: str) -> str | int:
        if not self.station.link_up:
            return EAI_FAIL
        ip = self.lan.resolve(name)
        return EAI_FAIL if ip is None else ip

    async def route(self, proto: str, host: str, port: int) -> dict[str, int]:
        if not self.station.link_up:
            return {"error": errno.EHOSTUNREACH}
        ip = self.lan.resolve(host)
        if ip is None:
            return {"error": errno.EHOSTUNREACH}
        if proto == "udp":
            if port == NTP_PORT and self.lan.ntp_port:
                # an NTP outage drops the requests (the responder checks ntp_up): the board times out
                if self.ntp is None or self.ntp.transport is None:
                    self.ntp = await NtpResponder.start(self.answer_time, self.lan, shared=False)
                return {"port": self.ntp.port}
            target = self.lan.target(ip, port)
            return {"port": target[1]} if target else {"error": errno.EHOSTUNREACH}
        target = self.lan.target(ip, port)
        if target is None:
            return {"error": errno.EHOSTUNREACH}
        try:
            far_r, far_w = await asyncio.wait_for(
                asyncio.open_connection(*target), timeout=self.clock.guard_timeout(10)
            )
        except ConnectionRefusedError:
            return {"error": errno.ECONNREFUSED}
        except (TimeoutError, OSError):
            return {"error": errno.ETIMEDOUT}
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_board(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if not accepted.done():
                accepted.set_result((r, w))

        server = await asyncio.start_server(on_board, "127.0.0.1", 0)
        local_port = server.sockets[0].getsockname()[1]

        async def finish() -> None:
            try:
                board_r, board_w = await asyncio.wait_for(accepted, timeout=30)
            except TimeoutError:
                far_w.close()
                return
            finally:
                server.close()
            conn = _Conn(board_w, far_w)
            self.conns.append(conn)
            if not self.station.link_up:
                conn.reset()
                return
            await asyncio.gather(
                self._pipe(conn, board_r, far_w, up=True),
                self._pipe(conn, far_r, board_w, up=False),
                return_exceptions=True,
            )
            if conn in self.conns:
                self.conns.remove(conn)

        task = asyncio.ensure_future(finish())
        self._proxies.add(task)
        task.add_done_callback(self._proxies.discard)
        return {"port": local_port}

    async def _pipe(self, conn: _Conn, r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                await conn.stalled.wait()
                if conn.closed:
                    break
                w.write(data)
                await w.drain()
                if up:
                    conn.bytes_up += len(data)
                    self.bytes_up += len(data)
                else:
                    conn.bytes_down += len(data)
                    self.bytes_down += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            if not conn.closed:
                conn.closed = True
                # a clean close on one side closes the other, as TCP FIN would
                for writer in (conn.board_w, conn.far_w):
                    writer.close()

    def _link_changed(self, up: bool) -> None:
        for conn in self.conns:
            if up:
                conn.stalled.set()
            else:
                conn.stalled.clear()
        if not up:
            loop = asyncio.get_event_loop()
            if self._abort_task is None or self._abort_task.done():
                self._abort_task = loop.create_task(self._abort_stalled())

    async def _abort_stalled(self) -> None:
        await asyncio.sleep(self.clock.real_delay(TCP_ABORT_S))
        if self.station.link_up:
            return
        for conn in list(self.conns):
            conn.reset()
        self.conns.clear()

    def close(self) -> None:
        """The board is going away: its connections and pending timers with it."""
        self.cut()
        for task in [self._abort_task, *self._proxies]:
            if task is not None and not task.done():
                task.cancel()
        if self.ntp is not None and self.ntp.transport is not None:
            self.ntp.transport.close()

    def cut(self) -> int:
        """Reset every live connection of this board now (a broker or router dropping it)."""
        n = 0
        for conn in list(self.conns):
            if not conn.closed:
                conn.reset()
                n += 1
        self.conns.clear()
        return n


class NtpResponder(asyncio.DatagramProtocol):
    """SNTP server on 127.0.0.1 answering with simulated time (RFC 4330 server reply)."""

    def __init__(self, now: Callable[[], float], lan: Lan) -> None:
        self.now = now
        self.lan = lan
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if len(data) < 48 or not self.lan.ntp_up or self.transport is None:
            return
        self.requests += 1
        now = self.now() + NTP_EPOCH_OFFSET
        secs = int(now)
        frac = int((now - secs) * (1 << 32)) & 0xFFFFFFFF
        version = (data[0] >> 3) & 0x7
        reply = bytearray(48)
        reply[0] = (version << 3) | 4  # LI 0, server mode
        reply[1] = 1  # stratum 1: a primary reference
        reply[2] = data[2]
        reply[3] = 0xEC  # precision 2^-20 s
        reply[12:16] = b"SIM\x00"
        struct.pack_into("!II", reply, 16, secs, frac)  # reference timestamp
        reply[24:32] = data[40:48]  # originate = the client's transmit timestamp
        struct.pack_into("!IIII", reply, 32, secs, frac, secs, frac)  # receive, transmit
        self.transport.sendto(bytes(reply), addr)

    @classmethod
    async def start(cls, now: Callable[[], float], lan: Lan, shared: bool = True) -> NtpResponder:
        """A responder on a free port; `shared`: the LAN's (lan.ntp_port), else one board's."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: cls(now, lan), local_addr=("127.0.0.1", 0)
        )
        assert isinstance(protocol, NtpResponder)
        protocol.port = transport.get_extra_info("sockname")[1]
        if shared:
            lan.ntp_port = protocol.port
        return protocol
