# A small MQTT 3.1.1 client for the boards: publish-only, QoS 0 and QoS 1 with a window of
# in-flight QoS 1 publishes, last will, keepalive with a PINGRESP deadline, optional TLS.
#
# Written for the ESP8266 port (about 30 KB of free heap): the buffers it needs on every publish
# and every incoming packet are allocated once; a payload is written straight from the caller's
# buffer after a small header, never copied. After connect() the socket is non-blocking and every
# wait goes through select.poll with a deadline: `timeout_ms` without progress while reading a
# packet, `write_timeout_ms` while the socket's send buffer stays full, `connect_timeout_ms` for
# connect(). Waiting in select.poll still runs scheduled callbacks (the sampling) on the ESP8266.
#
# Every failure of the connection raises OSError (MQTTError and ConnectRefused are subclasses), so
# the app has one thing to catch: close(), back off, connect() again, and publish anew whatever was
# not acknowledged (the store's rewind()). The QoS 1 session is not resumed across connections:
# re-sent samples may arrive twice, and the recorder removes duplicates by (device, boot, seq).
#
# Usage:
#     c = MQTTClient(b"lab-01", "192.168.1.10", keepalive=60, window=8)
#     c.set_last_will(b"labfleet/lab-01/status", b"offline", retain=True, qos=1)
#     c.connect()
#     pid = c.publish(topic, payload, qos=1)    # only while c.window_free() > 0
#     done = c.poll()          # call often: handles PUBACKs and keepalive; returns how many of
#                              # the oldest in-flight publishes completed, in publish order

import errno
import select
import socket
import time

from micropython import const

_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_PUBREC = const(0x50)
_PUBREL = const(0x60)
_PUBCOMP = const(0x70)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)

_PROTOCOL_LEVEL = const(4)  # MQTT 3.1.1
_MAX_REMAINING = const(268435455)  # the largest 4-byte remaining length
# Incoming packets handled per poll() call: bounds the time one call can take even if the broker
# floods us (the board subscribes to nothing, so anything beyond PUBACKs is unexpected).
_MAX_PACKETS_PER_POLL = const(32)

# Offset of the topic in the PUBLISH header buffer: fixed header (1) + remaining length (up to 4)
# + topic length (2) come before it, the packet id (2) after it.
_TOPIC_AT = const(7)

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLL_FAIL = select.POLLHUP | select.POLLERR

# CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3), 0..5. One string, split when needed: a
# tuple of strings costs an object per string in the heap for as long as the module is loaded.
CONNACK_REASONS = (
    "accepted|unacceptable protocol version|client identifier rejected|server unavailable|"
    "bad user name or password|not authorized"
)


class MQTTError(OSError):
    """A protocol-level failure: the connection is unusable and must be closed."""


class ConnectRefused(MQTTError):
    """The broker refused the CONNECT; `code` is the CONNACK return code (1..5)."""

    def __init__(self, code):
        reasons = CONNACK_REASONS.split("|")
        reason = reasons[code] if 0 < code < len(reasons) else "unknown reason"
        super().__init__(code, "broker refused the connection: %s (CONNACK code %d)" % (reason, code))
        self.code = code


def _as_bytes(value):
    return value.encode() if isinstance(value, str) else value


def encode_remaining_length(buf, pos, length):
    """Write the MQTT variable-length encoding of `length` into buf at pos; returns the end."""
    if not 0 <= length <= _MAX_REMAINING:
        raise ValueError("MQTT packet too long: %d bytes" % length)
    while True:
        digit = length & 0x7F
        length >>= 7
        if length:
            buf[pos] = digit | 0x80
            pos += 1
        else:
            buf[pos] = digit
            return pos + 1


def _varint_size(length):
    if length < 0x80:
        return 1
    if length < 0x4000:
        return 2
    if length < 0x200000:
        return 3
    return 4


class MQTTClient:
    def __init__(
        self,
        client_id,
        server,
        port=0,
        user=None,
        password=None,
        keepalive=60,
        tls=False,
        tls_params=None,
        window=8,
        timeout_ms=300,
        write_timeout_ms=2000,
        connect_timeout_ms=5000,
        ping_interval_ms=0,
        topic_max=128,
        coalesce_max=256,
    ):
        if not 1 <= window <= 64:
            raise ValueError("window must be 1..64")
        self.client_id = _as_bytes(client_id)
        self.server = server
        self.port = port or (8883 if tls else 1883)
        self.user = _as_bytes(user)
        self.password = _as_bytes(password)
        self.keepalive = keepalive
        self.tls = tls
        self.tls_params = tls_params or {}
        self.window = window
        self.timeout_ms = timeout_ms
        # A write may wait longer than a read: one lost TCP segment stalls a full send buffer
        # for a retransmission timeout (>= 1 s in lwIP), which is not a dead link.
        self.write_timeout_ms = write_timeout_ms
        self.connect_timeout_ms = connect_timeout_ms
        # A PINGREQ goes out when nothing was sent or nothing was received for ping_interval_ms;
        # its PINGRESP must come within half that, so a dead link is noticed within ~1.5 intervals.
        self.ping_interval_ms = ping_interval_ms or keepalive * 1000
        self.lw_topic = None
        self.lw_msg = None
        self.lw_qos = 0
        self.lw_retain = False
        self.on_ack = None  # called with each QoS 1 packet id as it completes, in publish order
        self.sock = None
        self.pings = 0  # PINGREQs sent since construction (for health reports and tests)
        self.discarded = 0  # unsolicited PUBLISHes from the broker, read and dropped
        self._poller = select.poll()
        self._head = bytearray(_TOPIC_AT + topic_max + 2 + coalesce_max)
        self._head_topic = None  # the topic object whose bytes are in _head (use immutable topics)
        self._head_topic_len = 0
        self._rx = bytearray(4)
        self._tx = bytearray(4)  # PINGREQ / PUBACK / PUBREC / PUBCOMP / DISCONNECT
        self._skip = bytearray(64)  # sink for the body of packets we discard
        self._inflight_pid = [0] * window  # ring of QoS 1 packet ids, oldest at _oldest
        self._inflight_acked = bytearray(window)
        self._oldest = 0
        self._inflight = 0
        self._last_pid = 0
        self._last_tx = 0
        self._last_rx = 0
        self._ping_sent_at = 0
        self._ping_pending = False

    # --- connection ------------------------------------------------------------------------

    def set_last_will(self, topic, msg, retain=False, qos=0):
        """Registered in the next CONNECT, so the broker holds it from the first moment."""
        if not 0 <= qos <= 2:
            raise ValueError("qos must be 0, 1 or 2")
        self.lw_topic = _as_bytes(topic)
        self.lw_msg = _as_bytes(msg)
        self.lw_qos = qos
        self.lw_retain = retain

    def connect(self, clean_session=True):
        """Open the connection and complete CONNECT/CONNACK. Returns the session-present flag."""
        self.close()
        addr = socket.getaddrinfo(self.server, self.port, 0, socket.SOCK_STREAM)[0]
        sock = socket.socket(addr[0], socket.SOCK_STREAM, addr[2])
        try:
            sock.settimeout(self.connect_timeout_ms / 1000)
            sock.connect(addr[-1])
            if hasattr(socket, "TCP_NODELAY"):
                # A batch is written as header then payload (no copy): without this, Nagle's
                # algorithm holds the payload until the header's delayed ACK comes back.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                sock = self._wrap_tls(sock)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._poller = select.poll()  # a fresh one: nothing of the old socket stays registered
        self._poller.register(sock, _POLLIN)
        self._inflight = 0
        self._oldest = 0
        self._ping_pending = False
        try:
            self._send(self._connect_packet(clean_session))
            if not self._wait(_POLLIN, self.connect_timeout_ms):
                raise OSError(errno.ETIMEDOUT)
            rx = self._rx
            self._recv(2)
            if rx[0] != _CONNACK or rx[1] != 2:
                raise MQTTError(errno.EIO, "expected CONNACK, got packet type 0x%02x" % rx[0])
            self._recv(2)
            if rx[1]:
                raise ConnectRefused(rx[1])
            return bool(rx[0] & 1)
        except BaseException:
            self.close()
            raise

    def _wrap_tls(self, sock):
        import ssl

        params = self.tls_params
        hostname = params.get("server_hostname", self.server)
        try:
            if not hasattr(ssl, "SSLContext"):
                return ssl.wrap_socket(sock, server_hostname=hostname)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            cadata = params.get("cadata")
            if cadata:
                ctx.load_verify_locations(cadata=cadata)
                ctx.verify_mode = ssl.CERT_REQUIRED
            else:
                # No CA configured: the link is encrypted but the broker is not authenticated.
                ctx.verify_mode = ssl.CERT_NONE
            return ctx.wrap_socket(sock, server_hostname=hostname)
        except ValueError as e:  # mbedtls reports a certificate it rejects as ValueError
            raise MQTTError(errno.ECONNABORTED, "TLS handshake failed: %s" % e) from None

    def _connect_packet(self, clean_session):
        flags = 0x02 if clean_session else 0
        length = 10 + 2 + len(self.client_id)
        if self.lw_topic is not None:
            flags |= 0x04 | self.lw_qos << 3 | (0x20 if self.lw_retain else 0)
            length += 4 + len(self.lw_topic) + len(self.lw_msg)
        if self.user is not None:
            flags |= 0x80
            length += 2 + len(self.user)
        if self.password is not None:
            flags |= 0x40
            length += 2 + len(self.password)
        pkt = bytearray(5 + length)
        pkt[0] = _CONNECT
        pos = encode_remaining_length(pkt, 1, length)
        pos = self._put_field(pkt, pos, b"MQTT")
        pkt[pos] = _PROTOCOL_LEVEL
        pkt[pos + 1] = flags
        pkt[pos + 2] = self.keepalive >> 8
        pkt[pos + 3] = self.keepalive & 0xFF
        pos = self._put_field(pkt, pos + 4, self.client_id)
        if self.lw_topic is not None:
            pos = self._put_field(pkt, pos, self.lw_topic)
            pos = self._put_field(pkt, pos, self.lw_msg)
        if self.user is not None:
            pos = self._put_field(pkt, pos, self.user)
        if self.password is not None:
            pos = self._put_field(pkt, pos, self.password)
        return memoryview(pkt)[:pos]

    @staticmethod
    def _put_field(buf, pos, data):
        n = len(data)
        if n > 0xFFFF:
            raise ValueError("MQTT string field longer than 65535 bytes")
        buf[pos] = n >> 8
        buf[pos + 1] = n & 0xFF
        buf[pos + 2 : pos + 2 + n] = data
        return pos + 2 + n

    def disconnect(self):
        """Clean DISCONNECT (the broker discards the last will), then close."""
        if self.sock is not None:
            try:
                self._tx[0] = _DISCONNECT
                self._tx[1] = 0
                self._send(self._tx, 2)
            except OSError:
                pass
        self.close()

    def close(self):
        """Drop the connection without DISCONNECT: the broker publishes the last will."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        self._inflight = 0
        try:
            sock.close()
        except OSError:
            pass

    def connected(self):
        return self.sock is not None

    # --- publishing ------------------------------------------------------------------------

    def window_free(self):
        """How many more QoS 1 publishes may be sent before one must be acknowledged."""
        return self.window - self._inflight

    def inflight(self):
        return self._inflight

    def publish(self, topic, msg, retain=False, qos=0):
        """Send a PUBLISH; returns its packet id for QoS 1, else 0. `msg` is any bytes-like object."""
        if self.sock is None:
            raise OSError(errno.ENOTCONN)
        if qos == 1:
            if self._inflight >= self.window:
                raise ValueError("QoS 1 window full: poll() until window_free() > 0")
        elif qos != 0:
            raise ValueError("qos must be 0 or 1")
        head = self._head
        # The topic sits at a fixed offset in the header buffer, so its bytes are only copied when
        # the topic changes; the fixed header is then laid out right-aligned before it.
        if topic is not self._head_topic:
            data = _as_bytes(topic)
            if _TOPIC_AT + len(data) + 2 > len(head):
                raise ValueError("topic longer than topic_max")
            self._head_topic = None
            self._head_topic_len = len(data)
            head[_TOPIC_AT - 2] = len(data) >> 8
            head[_TOPIC_AT - 1] = len(data) & 0xFF
            head[_TOPIC_AT : _TOPIC_AT + len(data)] = data
            self._head_topic = topic
        topic_len = self._head_topic_len
        if isinstance(msg, str):
            msg = msg.encode()
        payload_len = len(msg)
        remaining = 2 + topic_len + payload_len + 2 * qos
        start = _TOPIC_AT - 3 - _varint_size(remaining)
        head[start] = _PUBLISH | qos << 1 | (1 if retain else 0)
        encode_remaining_length(head, start + 1, remaining)
        end = _TOPIC_AT + topic_len
        pid = 0
        if qos:
            pid = self._next_pid()
            head[end] = pid >> 8
            head[end + 1] = pid & 0xFF
            end += 2
        if end + payload_len <= len(head):
            # A small payload goes out in the same segment as its header: sent separately, it
            # would wait for the header's delayed ACK under Nagle's algorithm (40-200 ms).
            head[end : end + payload_len] = msg
            self._send(head, end + payload_len - start, start)
        else:
            self._send(head, end - start, start)
            self._send(msg, payload_len)
        if qos:
            slot = (self._oldest + self._inflight) % self.window
            self._inflight_pid[slot] = pid
            self._inflight_acked[slot] = 0
            self._inflight += 1
        return pid

    def _next_pid(self):
        pid = self._last_pid + 1
        if pid > 0xFFFF:
            pid = 1
        self._last_pid = pid
        return pid

    # --- receiving and keepalive -----------------------------------------------------------

    def poll(self, timeout_ms=0):
        """Handle what the broker sent and the keepalive. Waits up to timeout_ms for the first
        packet. Returns how many of the oldest in-flight QoS 1 publishes completed, in order."""
        if self.sock is None:
            raise OSError(errno.ENOTCONN)
        completed = 0
        wait = timeout_ms
        for _ in range(_MAX_PACKETS_PER_POLL):
            if not self._wait(_POLLIN, wait):
                break
            completed += self._handle_packet()
            wait = 0
        self._keepalive()
        return completed

    def _keepalive(self):
        if self.ping_interval_ms <= 0:
            return
        now = time.ticks_ms()
        if self._ping_pending:
            if time.ticks_diff(now, self._ping_sent_at) > self.ping_interval_ms // 2:
                raise MQTTError(errno.ETIMEDOUT, "no PINGRESP from the broker: connection dead")
        elif (
            time.ticks_diff(now, self._last_tx) >= self.ping_interval_ms
            or time.ticks_diff(now, self._last_rx) >= self.ping_interval_ms
        ):
            self._tx[0] = _PINGREQ
            self._tx[1] = 0
            self._send(self._tx, 2)
            self._ping_pending = True
            self._ping_sent_at = now
            self.pings += 1

    def _handle_packet(self):
        rx = self._rx
        self._recv(1)
        kind = rx[0]
        length = self._recv_remaining_length()
        packet_type = kind & 0xF0
        if packet_type == _PUBACK and length == 2:
            self._recv(2)
            return self._acked(rx[0] << 8 | rx[1])
        if packet_type == _PINGRESP and length == 0:
            self._ping_pending = False
            return 0
        if packet_type == _PUBLISH:
            self._discard_publish(kind, length)
            return 0
        if packet_type == _PUBREL and length == 2:
            # Second half of an incoming QoS 2 delivery we never asked for: complete it.
            self._recv(2)
            self._reply(_PUBCOMP, rx[0], rx[1])
            return 0
        if packet_type in (_CONNACK, _PUBACK, _PINGRESP):
            raise MQTTError(errno.EIO, "malformed packet 0x%02x of length %d" % (kind, length))
        self._discard(length)  # SUBACK, UNSUBACK, PUBREC, PUBCOMP: nothing we asked for
        return 0

    def _recv_remaining_length(self):
        length = 0
        shift = 0
        while True:
            self._recv(1)
            digit = self._rx[0]
            length |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return length
            shift += 7
            if shift > 21:
                raise MQTTError(errno.EIO, "malformed remaining length")

    def _discard_publish(self, kind, length):
        """Read an unsolicited PUBLISH to its end; acknowledge it so the broker stops resending."""
        rx = self._rx
        self.discarded += 1
        qos = (kind >> 1) & 3
        self._recv(2)
        rest = length - 2 - (rx[0] << 8 | rx[1]) - (2 if qos else 0)
        if rest < 0 or qos == 3:
            raise MQTTError(errno.EIO, "malformed PUBLISH from the broker")
        self._discard(rx[0] << 8 | rx[1])  # the topic
        if qos:
            self._recv(2)
            self._reply(_PUBACK if qos == 1 else _PUBREC, rx[0], rx[1])
        self._discard(rest)

    def _discard(self, length):
        skip = self._skip
        chunk = len(skip)
        while length > 0:
            n = length if length < chunk else chunk
            self._recv_into(skip, n)
            length -= n

    def _reply(self, packet_type, pid_msb, pid_lsb):
        tx = self._tx
        tx[0] = packet_type | (0x02 if packet_type == _PUBREL else 0)
        tx[1] = 2
        tx[2] = pid_msb
        tx[3] = pid_lsb
        self._send(tx, 4)

    def _acked(self, pid):
        """Mark pid acknowledged; retire the acknowledged prefix of the in-flight ring."""
        window = self.window
        pids = self._inflight_pid
        acked = self._inflight_acked
        slot = self._oldest
        for _ in range(self._inflight):
            if pids[slot] == pid and not acked[slot]:
                acked[slot] = 1
                break
            slot = (slot + 1) % window
        else:
            return 0  # a duplicate or unknown PUBACK: nothing of ours is waiting for it
        completed = 0
        while self._inflight and acked[self._oldest]:
            done_pid = pids[self._oldest]
            self._oldest = (self._oldest + 1) % window
            self._inflight -= 1
            completed += 1
            if self.on_ack is not None:
                self.on_ack(done_pid)
        return completed

    # --- socket I/O ------------------------------------------------------------------------

    def _wait(self, event, timeout_ms):
        """True when the socket is ready for `event` within timeout_ms; raises if it failed."""
        for _, ready in self._poller.ipoll(timeout_ms):
            if ready & _POLL_FAIL and not ready & event:
                raise OSError(errno.ECONNRESET)
            return True
        return False

    def _recv(self, n):
        self._recv_into(self._rx, n)

    def _recv_into(self, buf, n):
        got = self.sock.readinto(buf, n)
        while got is None or got < n:
            if got == 0:
                raise OSError(errno.ECONNRESET)  # end of stream: the broker closed the connection
            if not self._wait(_POLLIN, self.timeout_ms):
                raise OSError(errno.ETIMEDOUT)
            if got is None:
                got = self.sock.readinto(buf, n)
            else:
                more = self.sock.readinto(memoryview(buf)[got:n])
                if more == 0:
                    raise OSError(errno.ECONNRESET)
                if more:
                    got += more
        self._last_rx = time.ticks_ms()

    def _send(self, buf, n=-1, offset=0):
        """Write n bytes of buf from offset; waits (bounded) while the socket's buffer is full."""
        if n < 0:
            n = len(buf)
        sock = self.sock
        if sock is None:
            raise OSError(errno.ENOTCONN)
        if offset or n != len(buf):
            buf = memoryview(buf)[offset : offset + n]
        sent = 0
        while sent < n:
            # Only the documented socket.write(buf): a partial write continues from a view.
            wrote = sock.write(memoryview(buf)[sent:] if sent else buf)
            if wrote:
                sent += wrote
                continue
            poller = self._poller
            poller.modify(sock, _POLLOUT)
            try:
                writable = self._wait(_POLLOUT, self.write_timeout_ms)
            finally:
                poller.modify(sock, _POLLIN)
            if not writable:
                raise OSError(errno.ETIMEDOUT)
        self._last_tx = time.ticks_ms()
