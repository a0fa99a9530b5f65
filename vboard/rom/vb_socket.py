# `socket` as on the ESP8266 port (lwIP), routed through the virtual board's WiFi link.
#
# Every connection leaves through the host's gateway (vboard/net.py): the host resolves names
# on the virtual LAN, refuses everything while the station is not connected, and proxies the
# TCP stream to its real target on 127.0.0.1, so the harness can cut or stall a live
# connection the way a lost WiFi link does. Underneath is a real, non-blocking unix socket;
# blocking calls wait in short real-time slices (scheduled callbacks keep running) up to the
# socket's timeout, taken in simulated seconds and never shorter than the host's real-time
# floor. Errors are OSError with lwIP's errno values, as the port raises them.

import select as _select
import socket as _socket

import vb_hal as hal
import vb_ipc as ipc

AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
IPPROTO_IP = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
SOL_SOCKET = 0xFFF
SO_REUSEADDR = 0x0004
SO_KEEPALIVE = 0x0008
SO_BROADCAST = 0x0020
TCP_NODELAY = 0x01
IP_ADD_MEMBERSHIP = 0x400

EAGAIN = 11
ETIMEDOUT = 110
ENOTCONN = 128
EINPROGRESS = 115
ECONNRESET = 104
EPIPE = 32


@hal.native
def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    ip = hal.call("net.resolve", host)
    if isinstance(ip, dict):
        raise OSError(ip["error"])
    return [(AF_INET, type or SOCK_STREAM, proto, "", (ip, port))]


def inet_ntop(af, addr):
    return _socket.inet_ntop(_socket.AF_INET, addr)


def inet_pton(af, addr):
    return _socket.inet_pton(_socket.AF_INET, addr)


def _sockaddr(addr):
    if isinstance(addr, (tuple, list)) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    raise TypeError("address must be a (host, port) tuple")


class socket:
    def __init__(self, af=AF_INET, type=SOCK_STREAM, proto=0):
        if af not in (AF_INET, AF_INET6):
            raise OSError(97)  # EAFNOSUPPORT
        self._type = type
        native_type = _socket.SOCK_DGRAM if type == SOCK_DGRAM else _socket.SOCK_STREAM
        self._s = _socket.socket(_socket.AF_INET, native_type)
        self._s.setblocking(False)
        self._timeout_us = -1  # blocking
        self._connected = False
        self._closed = False
        self._awaiting = False  # sent since it last received: an answer is awaited (vb_select)
        self._sent_at = 0  # real time of the send an answer is awaited for
        self._rtt_us = 0  # the longest recent real round trip (0: none seen yet)
        if type == SOCK_DGRAM:  # a TCP socket's heap is only what the port's lwIP object takes
            self._udp_routes = {}
            self._udp_back = {}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()

    def __del__(self):
        self.close()

    # -- waiting --------------------------------------------------------------------------

    def _deadline(self):
        """(simulated, real) deadline of a wait under the socket's timeout: a stuck-guarding
        timeout never ends before the real-time floor (vboard/clock.py)."""
        if self._timeout_us < 0:
            return None
        if not self._timeout_us:
            return (hal.sim_us(), 0)
        return (hal.sim_us() + self._timeout_us, hal.real_us() + hal.guard_real_us(0))

    def _wait(self, event, deadline, answered=False):
        """Wait until the native socket is ready for `event`; False on timeout. `answered`: the
        far side's answer makes it ready (a TCP connect: the SYN's SYN-ACK), as for input."""
        p = hal.make_poller()
        p.register(self._s, event)
        answer = self.answer_wait_us() if event == _select.POLLIN or answered else 0
        while True:
            if answer:
                if hal.wait(p, None if deadline is None else deadline[0], answer):
                    return True
                self.give_up_answer()
                answer = 0
                continue
            if deadline is None:
                if hal.wait(p, None):
                    return True
                continue
            sim_deadline, real_floor = deadline
            if hal.sim_us() >= sim_deadline:
                if hal.real_us() >= real_floor:
                    return bool(hal.poll_real(p, 0))
                # the simulated timeout is up but not the real floor: wait for the far side
                # in real time (the board's time stays where it is)
                if hal.wait(p, None, 0, real_floor):
                    return True
                continue
            if hal.wait(p, sim_deadline):
                return True

    def _sent(self):
        if not self._awaiting:
            self._awaiting = True
            self._sent_at = hal.real_us()

    def _answered(self):
        if self._awaiting:
            self._awaiting = False
            rtt = hal.real_us() - self._sent_at
            # the longest recent one, forgotten by halves
            self._rtt_us = rtt if rtt > self._rtt_us else (self._rtt_us + rtt) // 2

    def give_up_answer(self):
        self._awaiting = False

    def answer_wait_us(self):
        """How long (real us) to wait for an answer with the board's clock standing still: four
        round trips of this connection, at least 20 ms; the real-time floor while none is known
        (a connect, a first request). 0: no answer awaited."""
        if not self._awaiting:
            return 0
        floor = hal.guard_real_us(0)
        if not self._rtt_us:
            return floor
        wait = 4 * self._rtt_us
        return 20000 if wait < 20000 else (floor if wait > floor else wait)

    def _check_open(self):
        if self._closed:
            raise OSError(9)  # EBADF

    # -- configuration --------------------------------------------------------------------

    def settimeout(self, value):
        if value is None:
            self._timeout_us = -1
        else:
            self._timeout_us = int(value * 1000000)

    def setblocking(self, flag):
        self._timeout_us = -1 if flag else 0

    def setsockopt(self, level, optname, value):
        if level == SOL_SOCKET and optname == SO_REUSEADDR:
            self._s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, value)
        elif level == IPPROTO_TCP and optname == TCP_NODELAY:
            self._s.setsockopt(6, 1, value)  # the same values on Linux
        # Other options (keepalive, broadcast, multicast) have no effect on the simulation.

    # -- connection -----------------------------------------------------------------------

    @hal.native
    def connect(self, address):
        self._check_open()
        host, port = _sockaddr(address)
        proto = "udp" if self._type == SOCK_DGRAM else "tcp"
        route = hal.call("net.route", proto, host, port)
        if "error" in route:
            raise OSError(route["error"])
        if proto == "udp":
            self._udp_routes[(host, port)] = route["port"]
            self._udp_back[route["port"]] = (host, port)
            self._udp_default = (host, port)
            return
        try:
            self._s.connect(_socket.getaddrinfo("127.0.0.1", route["port"])[0][-1])
        except OSError as e:
            if e.errno != EINPROGRESS:
                raise
        # the handshake is a round trip: its answer costs a LAN round trip, not the host's time
        self._sent()
        deadline = (hal.sim_us() + 10000000, hal.real_us() + hal.guard_real_us(10000000))
        if not self._wait(_select.POLLOUT, deadline, answered=True):
            raise OSError(ETIMEDOUT)
        self._answered()
        self._connected = True

    def bind(self, address):
        port = _sockaddr(address)[1]
        self._s.bind(_socket.getaddrinfo("127.0.0.1", port)[0][-1])

    def listen(self, backlog=1):
        self._s.listen(backlog)

    @hal.native
    def accept(self):
        deadline = self._deadline()
        while True:
            try:
                conn = self._s.accept()[0]
                break
            except OSError as e:
                if e.errno != EAGAIN:
                    raise
            if not self._wait(_select.POLLIN, deadline):
                raise OSError(ETIMEDOUT if self._timeout_us > 0 else EAGAIN)
        s = socket.__new__(socket)
        s._type = SOCK_STREAM
        s._s = conn
        conn.setblocking(False)
        s._timeout_us = -1
        s._connected = True
        s._closed = False
        return s, ("127.0.0.1", 0)

    @hal.native
    def close(self):
        if not self._closed:
            self._closed = True
            try:
                self._s.close()
            except OSError:
                pass

    # -- data -----------------------------------------------------------------------------

    def _recv_native(self, n):
        deadline = self._deadline()
        while True:
            try:
                data = self._s.recv(n)
                self._answered()
                return data
            except OSError as e:
                if e.errno != EAGAIN:
                    raise
            if not self._wait(_select.POLLIN, deadline):
                raise OSError(ETIMEDOUT if self._timeout_us > 0 else EAGAIN)

    @hal.native
    def recv(self, bufsize):
        self._check_open()
        if self._type == SOCK_DGRAM:
            return self.recvfrom(bufsize)[0]
        return self._recv_native(bufsize)

    @hal.native
    def read(self, size=-1):
        self._check_open()
        try:
            if size is None or size < 0:
                chunks = []
                while True:
                    chunk = self._recv_native(1024)
                    if not chunk:
                        return b"".join(chunks)
                    chunks.append(chunk)
            out = b""
            while len(out) < size:
                chunk = self._recv_native(size - len(out))
                if not chunk:
                    break
                out += chunk
                if self._timeout_us == 0:
                    break
            return out
        except OSError as e:
            if e.errno == EAGAIN:
                return None
            raise

    @hal.native
    def readinto(self, buf, nbytes=None):
        n = len(buf) if nbytes is None else nbytes
        data = self.read(n)
        if data is None:
            return None
        for i in range(len(data)):
            buf[i] = data[i]
        return len(data)

    def readline(self):
        out = b""
        while not out.endswith(b"\n"):
            ch = self.read(1)
            if not ch:
                break
            out += ch
        return out

    def _send_native(self, data):
        deadline = self._deadline()
        while True:
            try:
                sent = self._s.send(data)
                self._sent()
                return sent
            except OSError as e:
                if e.errno == EPIPE:
                    # lwIP has no EPIPE: a write to a reset connection fails with ECONNRESET
                    raise OSError(ECONNRESET) from None
                if e.errno != EAGAIN:
                    raise
            if not self._wait(_select.POLLOUT, deadline):
                raise OSError(ETIMEDOUT if self._timeout_us > 0 else EAGAIN)

    @hal.native
    def send(self, data):
        self._check_open()
        if self._type == SOCK_DGRAM:
            return self.sendto(data, self._udp_default)
        return self._send_native(data)

    @hal.native
    def write(self, buf, off_or_len=None, length=None):
        # stream.write(buf[, max_len]) or write(buf, off, max_len), as the port's streams take
        self._check_open()
        data = memoryview(buf)
        if length is not None:
            data = data[off_or_len : off_or_len + length]
        elif off_or_len is not None:
            data = data[:off_or_len]
        if self._timeout_us == 0:
            try:
                return self._send_native(data)
            except OSError as e:
                if e.errno == EAGAIN:
                    return None
                raise
        sent = 0
        while sent < len(data):
            sent += self._send_native(data[sent:])
        return sent

    def sendall(self, data):
        self.write(data)

    @hal.native
    def sendto(self, data, address):
        self._check_open()
        host, port = _sockaddr(address)
        local = self._udp_routes.get((host, port))
        if local is None:
            route = hal.call("net.route", "udp", host, port)
            if "error" in route:
                raise OSError(route["error"])
            local = route["port"]
            self._udp_routes[(host, port)] = local
            self._udp_back[local] = (host, port)
        hal.request(ipc.OP_UDP_SENT)
        sent = self._s.sendto(data, _socket.getaddrinfo("127.0.0.1", local)[0][-1])
        self._sent()
        return sent

    @hal.native
    def recvfrom(self, bufsize):
        self._check_open()
        deadline = self._deadline()
        while True:
            try:
                data, addr = self._s.recvfrom(bufsize)
                self._answered()
                break
            except OSError as e:
                if e.errno != EAGAIN:
                    raise
            if not self._wait(_select.POLLIN, deadline):
                raise OSError(ETIMEDOUT if self._timeout_us > 0 else EAGAIN)
        # the unix port returns a raw struct sockaddr_in: family(2) port(2, big-endian) addr(4)
        port = addr[2] * 256 + addr[3] if isinstance(addr, (bytes, bytearray)) else 0
        return data, self._udp_back.get(port, ("0.0.0.0", 0))

    def makefile(self, mode="rb", buffering=0):
        return self

    def fileno(self):
        return self._s.fileno()
