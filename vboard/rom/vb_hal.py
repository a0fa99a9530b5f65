# The virtual board's hardware access layer, MicroPython side: the two IPC channels to the
# host process, the simulated clock, and the GPIO level cache with pin-IRQ dispatch.
#
# Simulated time: sim_us = sim_anchor + (real_us - real_anchor) * speed_milli // 1000, with
# real_us from CLOCK_REALTIME (time.time_ns), the same clock and formula the host uses
# (vboard/clock.py). The host can re-anchor at any time through an EV_CLOCK event.
#
# Pin IRQs: a thread reads host events; a level change on a pin with an IRQ armed for that
# edge is handed to micropython.schedule, exactly where the ESP8266 port's GPIO interrupt
# handler hands it; if the scheduler queue (4 deep, as on the ESP8266) is full the edge is
# lost, and the host is told (EV_IRQ_LOST) so tests can see it. The thread then wakes the
# main thread (a datagram on a loopback "wake" socket that every blocking wait polls), so
# scheduled callbacks run while the main program sleeps or waits for a socket, as the
# ESP8266 port runs them from its event-poll hook.

import _thread
import json
import os
import select
import socket
import struct
import sys
import time as _time

import micropython
import vb_ipc as ipc

real_time = _time
TICKS_PERIOD = 1 << 30  # ticks_ms/ticks_us wrap like the ESP8266's 31-bit small ints
TICKS_MAX = TICKS_PERIOD - 1
TICKS_HALF = TICKS_PERIOD >> 1

params = None
_req = None
_evt = None
_anchors = (0, 0, 1000)
boot_sim_us = 0
pin_levels = bytearray(17)
pin_irqs = [None] * 17  # (trigger, handler, pin object) per GPIO
irq_lost = 0
_evt_lock = _thread.allocate_lock()
_wake_thread_sock = None
# The event thread's buffers, made on import with the rest of the ROM: the thread starts after
# the ROM filled the heap's holes (start_events()), and what it allocated then would count as
# the firmware's.
_evt_head = bytearray(ipc.HEADER_SIZE)
_evt_body = bytearray(64)
_evt_buffers = (_evt_head, _evt_body, memoryview(_evt_head), memoryview(_evt_body))


_IPPROTO_TCP = 6
_TCP_NODELAY = 1


def _connect(port):
    s = socket.socket()
    # No Nagle: a fire-and-forget frame followed by a request would otherwise wait for the
    # host's delayed ACK (40 ms on Linux) before the request leaves.
    s.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
    s.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    return s


# A Ctrl-C (SIGINT) can land in the middle of a request: MicroPython raises the pending
# KeyboardInterrupt at the next jump of whatever bytecode runs, so anywhere in the exchange.
# The channel must stay framed whatever was cut short, as the port raises the interrupt out
# of a blocking operation and carries on. So: reads and writes are single recv/send calls
# (the stream methods loop over several and lose what they moved when a signal interrupts
# the next), the reader keeps its buffer and fill level in an object and updates them with
# no jump in between (a cut-short read resumes where it stopped), and every request carries
# a sequence number that its reply echoes, so the reply of a request the interrupt abandoned
# is recognised and dropped by the next one. An interrupt while sending is raised once the
# frame is out.
# Known limit: this unix build raises the KeyboardInterrupt from the SIGINT handler itself, not
# only at a jump (a C call such as sum(range(10**9)) stops mid-way), so it can still land between
# a recv() and the statement that keeps its bytes, or inside the GC (the heap then stays locked).
# Ctrl-C every 1-50 ms into a loop of hardware calls crashed the ROM 18 times in ~3,400 (the
# host restarts it as after a crash); delivering Ctrl-C without a signal would need the host to
# interrupt pure-Python loops some other way.
_deferred = None
_seq = 0


class _Reader:
    """Whole frames from a socket, resumable after any exception."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray(256)
        self.fill = 0

    def frame(self):
        """(status, payload) of the next frame."""
        while True:
            fill = self.fill
            buf = self.buf
            end = ipc.HEADER_SIZE
            if fill >= end:
                end = ipc.HEADER_SIZE + (buf[0] | buf[1] << 8) - 1
                if fill >= end:  # (never more: reads stop at the frame's end)
                    status = buf[2]
                    payload = bytes(buf[ipc.HEADER_SIZE : end])
                    self.fill = 0
                    return status, payload
            if end > len(buf):
                grown = bytearray(end)
                grown[:fill] = buf[:fill]
                self.buf = grown
                buf = grown
            # recv: one read(2). readinto/write loop until n bytes, and a signal between two of
            # their reads raises with the bytes already taken lost.
            got = self.sock.recv(end - fill)
            buf[fill : fill + len(got)] = got
            self.fill = fill + len(got)
            if not got:
                raise OSError(104)  # the host went away: nothing sensible left to do


_reader = None


def reader_buffer_size():
    return len(_reader.buf)


def shrink_reader_buffer(size):
    """Give back what large replies grew the reader's buffer to (it keeps its largest frame)."""
    _reader.buf = bytearray(size)


def _write_all(sock, data):
    global _deferred
    mv = memoryview(data)
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(mv[sent:])  # one write(2) (see _Reader)
        except KeyboardInterrupt as e:
            _deferred = e


def _send(sock, op, payload):
    _write_all(sock, struct.pack(ipc.HEADER, len(payload) + 1, op) + payload)


def _raise_deferred():
    global _deferred
    if _deferred is not None:
        e = _deferred
        _deferred = None
        raise e


def request(op, payload=b""):
    """Send a request and return the reply payload; a non-zero status raises OSError(status)."""
    global _seq
    _seq = (_seq + 1) & 0xFFFF
    seq = _seq
    _send(_req, op, struct.pack(ipc.SEQ, seq) + payload)
    while True:
        status, reply = _reader.frame()
        if reply[0] | reply[1] << 8 == seq:
            break  # older ones are replies to requests an interrupt abandoned
    _raise_deferred()
    if status:
        raise OSError(status)
    return reply[ipc.SEQ_SIZE :]


def post(op, payload=b""):
    """Fire-and-forget request (processed in order with the others)."""
    _send(_req, op, payload)
    _raise_deferred()


def call(name, *args):
    return json.loads(request(ipc.OP_CALL, json.dumps([name] + list(args))))


def note(name, *args):
    post(ipc.OP_NOTE, json.dumps([name] + list(args)))


# -- time -------------------------------------------------------------------------------


def real_us():
    return real_time.time_ns() // 1000


def sim_us():
    a = _anchors
    return a[1] + (real_time.time_ns() // 1000 - a[0]) * a[2] // 1000


def real_us_for(sim_delta_us):
    return sim_delta_us * 1000 // _anchors[2]


def guard_real_us(sim_timeout_us):
    """Real-time length of a timeout guarding against a stall (see vboard/clock.py)."""
    return max(real_us_for(sim_timeout_us), params["timeout_floor_us"])


_wake = None
_wake_addr = None
_wake_poll = None


def _open_wake_socket():
    global _wake, _wake_addr, _wake_poll
    # No getsockname() on the unix port: pick free loopback ports until bind succeeds.
    while True:
        port = 20000 + (os.urandom(2)[0] << 8 | os.urandom(1)[0]) % 40000
        addr = socket.getaddrinfo("127.0.0.1", port)[0][-1]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(addr)
            break
        except OSError:
            s.close()
    s.setblocking(False)
    _wake = s
    _wake_addr = addr
    _wake_poll = select.poll()
    _wake_poll.register(s, select.POLLIN)
    # the host pokes this socket after a SIGINT, so a Ctrl-C ends a long wait at once
    note("wake", port)


def make_poller():
    """A native poll object watching the wake socket; add the objects to wait for."""
    p = select.poll()
    p.register(_wake, select.POLLIN)
    return p


def drain_wake():
    try:
        while _wake.recv(16):
            pass
    except OSError:
        pass


def poll_real(p, timeout_ms):
    """poll() that returns early (empty) when a callback was scheduled meanwhile."""
    ready = p.poll(timeout_ms)
    out = []
    for entry in ready:
        if entry[0] is _wake:
            drain_wake()
        else:
            out.append(entry)
    return out


def sleep_until_sim(deadline_sim_us):
    # Each wake-up returns to the VM, which runs the callbacks scheduled meanwhile.
    while True:
        left = real_us_for(deadline_sim_us - sim_us())
        if left <= 0:
            return
        if left < 1000:
            real_time.sleep_us(left)
        else:
            poll_real(_wake_poll, (left + 999) // 1000)


def ticks_us():
    return (sim_us() - boot_sim_us) & TICKS_MAX


def ticks_ms():
    return ((sim_us() - boot_sim_us) // 1000) & TICKS_MAX


def ticks_diff(a, b):
    return ((a - b + TICKS_HALF) & TICKS_MAX) - TICKS_HALF


def ticks_add(t, delta):
    return (t + delta) & TICKS_MAX


# -- GPIO -------------------------------------------------------------------------------

IRQ_RISING = 1
IRQ_FALLING = 2
IRQ_RETRY_SIM_US = 1000000
IRQ_RETRY_REAL_US = 250000


def set_irq(gpio, trigger, handler, pin):
    pin_irqs[gpio] = (trigger, handler, pin) if handler is not None and trigger else None


def _dispatch_pin(gpio, level):
    global irq_lost
    old = pin_levels[gpio]
    pin_levels[gpio] = level
    entry = pin_irqs[gpio]
    if entry is None or old == level:
        return
    edge = IRQ_RISING if level else IRQ_FALLING
    if not entry[0] & edge:
        return
    # The queue is full when the main thread has not run callbacks for 4 edges. On a board
    # that means the firmware blocked that long; here it is far more often the host starving
    # this process (at 60x, 67 ms of a loaded machine is 4 simulated seconds), so the edge is
    # retried for a while (IRQ_RETRY_SIM_US of simulated time, at least IRQ_RETRY_REAL_US of
    # real time) before it counts as lost. Documented in vboard/README.md.
    give_up = real_us() + max(real_us_for(IRQ_RETRY_SIM_US), IRQ_RETRY_REAL_US)
    while True:
        try:
            micropython.schedule(entry[1], entry[2])
            _wake_thread_sock.sendto(b"!", _wake_addr)
            return
        except RuntimeError:
            _wake_thread_sock.sendto(b"!", _wake_addr)
            if real_us() > give_up:
                break
            real_time.sleep_ms(1)
    irq_lost += 1
    with _evt_lock:
        _send(_evt, ipc.EV_IRQ_LOST, bytes((gpio,)))


def _event_loop():
    global _anchors
    head, body, hmv, bmv = _evt_buffers
    while True:
        got = 0
        while got < ipc.HEADER_SIZE:
            k = _evt.readinto(hmv[got:])
            if not k:
                return
            got += k
        length, kind = struct.unpack(ipc.HEADER, head)
        n = length - 1
        got = 0
        while got < n:
            k = _evt.readinto(bmv[got:n])
            if not k:
                return
            got += k
        if kind == ipc.EV_PIN:
            _dispatch_pin(body[0], body[1])
        elif kind == ipc.EV_CLOCK:
            _anchors = struct.unpack_from("<qqi", body, 0)


def start(argv):
    """Connect to the host, fetch the boot parameters (start_events() starts the event thread)."""
    global params, _req, _reader, _evt, _anchors, boot_sim_us
    port = int(argv[1])
    token = argv[2].encode()
    _req = _connect(port)
    _reader = _Reader(_req)
    _send(_req, ipc.OP_HELLO, b"R" + token)
    params = json.loads(_reader.frame()[1])
    _evt = _connect(port)
    _send(_evt, ipc.OP_HELLO, b"E" + token)
    a = params["anchors"]
    _anchors = (a[0], a[1], a[2])
    boot_sim_us = params["boot_sim_us"]
    for gpio, level in params["pin_levels"]:
        pin_levels[gpio] = level
    _open_wake_socket()
    global _wake_thread_sock
    _wake_thread_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return params


def start_events():
    """Start the thread that takes the host's events (pin levels, clock anchors); until then
    they wait in the socket. Started after the ROM's boot has filled the heap's holes, which
    needs this process to have a single allocating thread."""
    _thread.start_new_thread(_event_loop, ())


def halt_forever():
    """Wait to be killed by the host (after a reset request)."""
    while True:
        real_time.sleep_ms(1000)


def exit_process(code):
    sys.exit(code)
