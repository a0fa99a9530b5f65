# The virtual board's hardware access layer, MicroPython side: the two IPC channels to the
# host process, the simulated clock, and the GPIO level cache with pin-IRQ dispatch.
#
# Fleet time: fleet_us = sim_anchor + (real_us - real_anchor) * speed_milli // 1000, with
# real_us from CLOCK_MONOTONIC (time.ticks_us), the same clock and formula the host uses
# (vboard/clock.py). The host can re-anchor at any time through an EV_CLOCK event; the board's
# own clock is charged from its CPU time (below, "time").
#
# Pin IRQs: a thread reads host events; a level change on a pin with an IRQ armed for that
# edge is handed to micropython.schedule, exactly where the ESP8266 port's GPIO interrupt
# handler hands it; if the scheduler queue (4 deep, as on the ESP8266) is full the edge is
# lost, and the host is told (EV_IRQ_LOST) so tests can see it. The thread then wakes the
# main thread (a datagram on a loopback "wake" socket that every blocking wait polls), so
# scheduled callbacks run while the main program sleeps or waits for a socket, as the
# ESP8266 port runs them from its event-poll hook.

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
boot_sim_us = 0
pin_levels = bytearray(17)
pin_irqs = [None] * 17  # (trigger, handler, pin object) per GPIO
irq_lost = 0
# The host's events (pin levels, clock anchors, square-wave schedules) are read by the main
# thread itself, at every sync point and whenever a wait wakes (_read_events): a second thread
# would make every garbage collection wait until that thread ran (the unix port stops the other
# threads to scan their stacks, mpthreadport.c), which on a busy host blocks the interpreter for
# milliseconds that are the simulation's, not the chip's. The buffer is made on import with the
# rest of the ROM (what is allocated after the heap's holes are filled counts as the firmware's).
_evt_buf = bytearray(256)
_evt_view = memoryview(_evt_buf)
_evt_fill = 0
_events_on = False
_evt_retry_until = -1  # S until which a pin event that found the scheduler queue full is retried


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
# of a blocking operation and carries on. So: the request socket is non-blocking, and only
# poll() waits (a signal raises there, before any byte is taken); reads copy what has come
# straight into the reader's buffer (readinto: no bytes object per reply), sends are single
# send calls, the reader keeps its buffer and fill level in an object and updates them with
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
_EAGAIN = 11


class _Reader:
    """Whole frames from a socket, resumable after any exception."""

    def __init__(self, sock, buf):
        self.sock = sock
        sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.buf = buf
        self.view = memoryview(self.buf)
        self.fill = 0
        self.end = 0  # of the last frame next() read, in buf

    def frame(self):
        """(status, payload) of the next frame."""
        status = self.next()
        return status, bytes(self.view[ipc.HEADER_SIZE : self.end])

    def next(self):
        """The status of the next frame, which stays in buf up to `end` until the next call
        (nothing allocated for it)."""
        while True:
            fill = self.fill
            buf = self.buf
            end = ipc.HEADER_SIZE
            if fill >= end:
                end = ipc.HEADER_SIZE + (buf[0] | buf[1] << 8) - 1
                if fill >= end:  # (never more: reads stop at the frame's end)
                    self.fill = 0
                    self.end = end
                    return buf[2]
            if end > len(buf):
                grown = bytearray(end)
                grown[:fill] = buf[:fill]
                self.buf = grown
                self.view = memoryview(grown)
                buf = grown
            got = self.sock.readinto(self.view[fill:end])  # what has come, in place
            if got is None:
                for _ in self.poller.ipoll(-1):  # (ipoll: no list to allocate)
                    break
                continue
            self.fill = fill + got
            if not got:
                raise OSError(104)  # the host went away: nothing sensible left to do


_reader = None
# Room for a sector's reply from the start (a buffer grown later would sit in the middle of the
# firmware's heap), made before anything else so that where it lands does not depend on the
# garbage the start leaves (the boot parameters' size, say)
_reply_buf = bytearray(ipc.HEADER_SIZE + ipc.SEQ_SIZE + ipc.SECTOR_SIZE)


def _write_all(sock, data):
    global _deferred
    sent = 0
    while sent < len(data):
        try:
            # one write(2) (see _Reader); the whole frame at once, as good as always
            sent += sock.send(data if not sent else memoryview(data)[sent:])
        except KeyboardInterrupt as e:
            _deferred = e
        except OSError as e:
            if e.errno != _EAGAIN:
                raise
            _wait_writable(sock)


def _wait_writable(sock):
    """The request socket is non-blocking (see _Reader): its host reads slowly."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    poller.poll(-1)


def _send(sock, op, payload):
    _write_all(sock, struct.pack(ipc.HEADER, len(payload) + 1, op) + payload)


def _raise_deferred():
    global _deferred
    if _deferred is not None:
        e = _deferred
        _deferred = None
        raise e


# A request's frame is built here: header, sequence number, stamp, then an optional "<I" word
# and the payload (a filesystem program of 128 bytes fits; larger ones get their own buffer)
_REQUEST_HEAD = ipc.HEADER + ipc.SEQ[1:] + ipc.STAMP[1:]
_REQUEST_HEAD_SIZE = ipc.HEADER_SIZE + ipc.SEQ_SIZE + ipc.STAMP_SIZE
_out = bytearray(_REQUEST_HEAD_SIZE + 4 + 512)
_out_view = memoryview(_out)


def request(op, payload=b"", word=None):
    """Send a request and return the reply payload; a non-zero status raises OSError(status).
    `word` (a flash address or sector) goes before the payload as "<I". The frame is built in
    place: the chip's flash calls allocate nothing (finalisers run them with the heap locked),
    and what this allocates is a few small objects, not the frames."""
    global _seq
    _seq = (_seq + 1) & 0xFFFF
    seq = _seq
    now = _sync()
    if isinstance(payload, str):
        payload = payload.encode()  # (JSON)
    at = _REQUEST_HEAD_SIZE if word is None else _REQUEST_HEAD_SIZE + 4
    end = at + len(payload)
    out = _out if end <= len(_out) else bytearray(end)
    struct.pack_into(_REQUEST_HEAD, out, 0, end - ipc.HEADER_SIZE + 1, op, seq, now)
    if word is not None:
        struct.pack_into("<I", out, _REQUEST_HEAD_SIZE, word)
    if payload:
        out[at:end] = payload
    reader = _reader
    try:
        _write_all(_req, out if end == len(out) else (_out_view if out is _out else memoryview(out))[:end])
        while True:
            status = reader.next()
            buf = reader.buf
            if buf[ipc.HEADER_SIZE] | buf[ipc.HEADER_SIZE + 1] << 8 == seq:
                break  # older ones are replies to requests an interrupt abandoned
    finally:
        _resume(now)  # the round trip is the simulation's, not the chip's
    _raise_deferred()
    if status:
        raise OSError(status)
    return bytes(reader.view[ipc.HEADER_SIZE + ipc.SEQ_SIZE : reader.end])


def post(op, payload=b""):
    """Fire-and-forget request (processed in order with the others)."""
    now = _sync()
    _send(_req, op, payload)
    _resume(now)
    _raise_deferred()


def call(name, *args):
    return json.loads(request(ipc.OP_CALL, json.dumps([name] + list(args))))


def note(name, *args):
    post(ipc.OP_NOTE, json.dumps([name] + list(args)))


# -- time -------------------------------------------------------------------------------
#
# The board's own simulated clock S (vboard/README.md, "Simulated time"), kept here in the main
# thread. What the chip would spend costs simulated time; what is only the simulation's costs
# none:
#   - running firmware code: the interpreter thread's own CPU time x cpu_factor (the host's
#     interpreter is that many times faster than an 80 MHz ESP8266); the host preempting the
#     thread, or the hypervisor running another guest on this machine's CPU, is not CPU time;
#   - a request to the host (an I2C transaction, a pin write, a flash access): nothing for the
#     round trip; the bus time it models is charged by the caller (charge_us);
#   - waiting with nothing expected from a real socket: the clock jumps to where the wait ends,
#     but never past the fleet's clock (sim = sim_anchor + (real - real_anchor) x speed, shared
#     with the host), so boards stay together and with the broker, recorder and NTP;
#   - waiting for the answer of a real socket (something was sent and nothing received since):
#     LAN_ROUND_TRIP_US if it comes, whatever the real far side took.
# The DS3231's square wave is generated here from the schedule the host sends (set_sqw), so its
# edges come at exact simulated times whatever the host's scheduling.

_anchors = (0, 0, 1000)  # the fleet's clock: real_anchor_us, sim_anchor_us, speed_milli
_cpu_milli = 1000  # cpu_factor x 1000
_s_us = 0  # S at the last sync point, from the CPU time charged
_r_us = 0  # real time at the last sync point (for sim_us()'s estimate between them)
_cpu_us = 0  # the thread's CPU time at the last sync point
# What an interval between two readings of the CPU time costs the thread by itself (the rest of
# one reading, the start of the next, the native calls around them): the simulation's, not the
# firmware's. Measured at start (_calibrate_sync_cost).
_sync_cost_us = 0
_last_interval_us = 0  # CPU time of the interval the last sync point ended (before the cost)
_reported = 0  # the largest S handed out: S never goes back
_ahead_us = 0  # how far sim_us()'s estimates ran ahead of the CPU time: taken off what follows


def real_us():
    # CLOCK_MONOTONIC, as the host's vboard/clock.real_now_us(); a small int (time_ns() is not)
    return real_time.ticks_us()


def fleet_us(real):
    a = _anchors
    return a[1] + (real - a[0]) * a[2] // 1000


# The thread's CPU time to the microsecond: the first field of /proc/thread-self/schedstat
# (se.sum_exec_runtime, ns), which the kernel brings up to date whenever the process reads its
# CPU clock (thread_group_cputime() updates the calling task first, kernel/sched/cputime.c), so
# time.clock() comes first. That clock alone counts whole milliseconds (modtime.c divides
# clock() by 1000), some 150 ms of S a step. Without the file (no CONFIG_SCHED_INFO) it is
# what there is (vboard/README.md).
_sched = None
_sched_buf = bytearray(96)


def _open_schedstat():
    global _sched
    try:
        _sched = open("/proc/thread-self/schedstat", "rb")  # noqa: SIM115 - kept open, read at every sync
    except OSError:
        _sched = None


def _probe_plain():
    native_enter()
    native_exit()


def _calibrate_sync_cost():
    """The CPU time of an interval with nothing in it but a native call's return and the next
    one's call, as the firmware makes them (a function each: the call's glue is in the
    interval): the median of many (being preempted makes a few longer)."""
    global _sync_cost_us
    seen = []
    for _ in range(49):
        _probe_plain()
        _probe_plain()  # its sync point ends the interval the first one's end began
        seen.append(_last_interval_us)
    seen.sort()
    _sync_cost_us = seen[len(seen) // 2]


def _cpu_now_us():
    """The main thread's CPU time (us). time.clock() makes a float: this allocates."""
    try:
        ms = real_time.clock()
    except MemoryError:  # the heap is locked: as if all of the time since the last sync ran
        return _cpu_us + real_us() - _r_us
    if _sched is None:
        return int(ms * 1000) * 1000
    _sched.seek(0)
    n = _sched.readinto(_sched_buf)
    buf = _sched_buf
    ns = 0
    i = 0
    while i < n:
        c = buf[i]
        if c < 48 or c > 57:
            break
        ns = ns * 10 + c - 48
        i += 1
    return ns // 1000


# Between sync points sim_us() estimates from real time; past this much real time since the
# last one, reading the clock is a sync point itself (the estimate may include time the thread
# did not run).
_SYNC_AFTER_REAL_US = 200


def sim_us():
    """S now. Within _SYNC_AFTER_REAL_US of a sync point it allocates nothing (the firmware's
    scheduled callbacks read ticks right after the wake-up that ran them)."""
    global _reported, _r_us
    if _native:
        return _native_s
    entered = real_time.ticks_us()
    ran = entered - _r_us
    if ran > _SYNC_AFTER_REAL_US:
        s = _sync_now()
    else:
        s = _s_us + ran * _cpu_milli // 1000
        if s < _reported:
            s = _reported
        _reported = s
    if 0 <= _sqw_next <= s:
        _sqw_advance(s)
    # this function is the port's C (a register read): its own time here is the simulation's
    _r_us += real_time.ticks_us() - entered
    return s


def _sync():
    """Charge the code run since the last sync point and start a new interval; returns S."""
    if _native:
        return _native_s
    return _sync_now()


def _sync_now():
    global _s_us, _r_us, _cpu_us, _reported, _ahead_us
    global _last_interval_us
    cpu = _cpu_now_us()
    _last_interval_us = cpu - _cpu_us
    ran = _last_interval_us - _sync_cost_us
    charge = ran * _cpu_milli // 1000 if ran > 0 else 0
    if _ahead_us:
        taken = charge if charge < _ahead_us else _ahead_us
        charge -= taken
        _ahead_us -= taken
    s = _s_us + charge
    if s < _reported:
        _ahead_us += _reported - s
        s = _reported
    _s_us, _cpu_us, _reported = s, cpu, s
    _read_events()
    _r_us = real_us()
    return s


def _resume(s):
    """Continue from S = s after time that is not the firmware's (a request, a wait)."""
    global _s_us, _r_us, _cpu_us, _reported, _native_s, _ahead_us
    _read_events()
    if _native:
        if s > _native_s:
            _native_s = s
        if 0 <= _sqw_next <= _native_s:
            _sqw_advance(_native_s)
        return
    if s > _reported:
        _ahead_us = 0  # a wait to a given time: what ran ahead before it is over
    else:
        s = _reported
    _s_us, _reported = s, s
    _cpu_us = _cpu_now_us()
    _r_us = real_us()
    if 0 <= _sqw_next <= s:
        _sqw_advance(s)


def charge_us(us):
    """Modelled time of the hardware (bus transfers, clock stretching), on top of S."""
    global _s_us, _native_s
    if _native:
        _native_s += us
    else:
        _s_us += us


# The port's C code (an I2C transfer, an SPI frame) is Python here, many times slower than the
# C it stands for: its CPU time is the simulation's, and only the bus time it models is charged.
_native = 0  # depth of native_enter() calls
_native_s = 0  # S while in native code


def native_enter():
    global _native, _native_s
    if not _native:
        _native_s = _sync()
    _native += 1


def native_exit():
    global _native
    _native -= 1
    if not _native:
        _resume(_native_s)


def native(f):
    """Decorator: `f` stands for the port's C code (the socket layer, the WLAN driver)."""

    def native_call(*args, **kwargs):
        native_enter()
        try:
            return f(*args, **kwargs)
        finally:
            native_exit()

    return native_call


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
    _wake_poll = make_poller()
    # the host pokes this socket after a SIGINT, so a Ctrl-C ends a long wait at once
    note("wake", port)


def make_poller():
    """A native poll object watching the wake and event sockets; add the objects to wait for."""
    p = select.poll()
    p.register(_wake, select.POLLIN)
    p.register(_evt, select.POLLIN)
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
        elif entry[0] is _evt:
            _read_events()
        else:
            out.append(entry)
    return out


# A LAN round trip as the chip sees it (station -> access point -> wired server and back): what
# an answer from a real socket costs the board's clock, whatever the real broker took (the host
# puts its answer to a datagram half of it after the board sent it: Board.answer_time).
LAN_ROUND_TRIP_US = 5000


def _waited(s0, r):
    """S after waiting from S = s0 until real time r: the fleet's clock, never back."""
    a = _anchors
    fleet = a[1] + (r - a[0]) * a[2] // 1000
    return fleet if fleet > s0 else s0


def _real_when(s):
    """The real time at which the fleet's clock reaches S = s."""
    a = _anchors
    return a[0] + (s - a[1]) * 1000 // a[2]


def wait(p, deadline, answer_us=0, real_deadline=None):
    """Wait until an object of poller `p` (None: none) is ready, a callback was scheduled, an SQW
    edge came or S reached `deadline` (None: no deadline). `answer_us`: an answer from a real
    socket is awaited; for up to that much real time the board's clock stands still while the
    far side (a real process, in real time) answers, and an answer costs LAN_ROUND_TRIP_US.
    `real_deadline`: also return once real time passed it. Returns the ready entries (empty for
    anything else); the callers loop."""
    s0 = _sync()
    if p is None:
        p = _wake_poll
    if answer_us > 0 and (deadline is None or deadline > s0):
        until = real_us() + answer_us
        while True:  # (host events wake the poll: they end no answer wait)
            left = until - real_us()
            ready = poll_real(p, (left + 999) // 1000 if left > 0 else 0)
            if ready:
                s = s0 + LAN_ROUND_TRIP_US
                _resume(s if deadline is None or s < deadline else deadline)
                return ready
            if left <= 0:
                break
        _resume(s0)
    while True:
        target = deadline
        edge = _sqw_next
        if edge >= 0 and (target is None or edge < target):
            target = edge
        r = real_us()
        s = _waited(s0, r)
        if target is not None and s >= target:
            _resume(target)
            return []
        if real_deadline is not None and r >= real_deadline:
            _resume(s)
            return []
        if target is None:
            left = -1
        else:
            left = _real_when(target) - r
            if left < 0:
                left = 0
        if real_deadline is not None and (left < 0 or left > real_deadline - r):
            left = real_deadline - r
        if 0 <= left < 1000:
            # below poll()'s millisecond: sleep it out, then look once
            real_time.sleep_us(left)
            ready = poll_real(p, 0)
        else:
            ready = poll_real(p, -1 if left < 0 else (left + 999) // 1000)
        # woken (ready, a callback scheduled by the event thread, or the time is up): back to
        # the caller, whose loop lets the VM run the callbacks
        s = _waited(s0, real_us())
        _resume(s if target is None or s < target else target)
        return ready


def sleep_until_sim(deadline_sim_us):
    # Each wake-up returns to the VM, which runs the callbacks scheduled meanwhile.
    while sim_us() < deadline_sim_us:
        wait(None, deadline_sim_us)


def sleep_until_fleet(deadline_sim_us):
    """For threads other than the main one (virtual timers): wait on the fleet's clock."""
    while True:
        left = real_us_for(deadline_sim_us - fleet_us(real_us()))
        if left <= 0:
            return
        real_time.sleep_ms((left + 999) // 1000)


def ticks_us():
    return (sim_us() - boot_sim_us) & TICKS_MAX


def ticks_ms():
    return ((sim_us() - boot_sim_us) // 1000) & TICKS_MAX


def ticks_diff(a, b):
    return ((a - b + TICKS_HALF) & TICKS_MAX) - TICKS_HALF


def ticks_add(t, delta):
    return (t + delta) & TICKS_MAX


# -- the DS3231's square wave -----------------------------------------------------------------
#
# The host sends where the next rising edge is and the period (after every I2C transaction on the
# RTC's bus, in the reply, and when something else changes the chip). The line is open drain:
# low for the first half of every DS3231 second, released (the pull-up) for the second half;
# the firmware's level reads and pin IRQs see the line here as the host sees every other pin.

_HALF_SECOND_US = 500000
_sqw_pin = -1
_sqw_host_level = 1  # what the rest of the board does to the line (pull-up, other drivers)
_sqw_low = False
_sqw_next = -1  # S of the next transition, -1: the output is off
_sqw_rise = -1  # S of the next rising edge
_sqw_period = 1000000


def set_sqw(rise_us, period_us):
    """The host's schedule: next rising edge at S = rise_us (-1: no square wave)."""
    global _sqw_next, _sqw_rise, _sqw_period
    if _sqw_pin < 0:
        return
    if rise_us < 0:
        _sqw_next = -1
        _sqw_set_low(False)
        return
    now = _reported
    _sqw_rise, _sqw_period = rise_us, period_us
    low = rise_us - now <= _HALF_SECOND_US
    _sqw_set_low(low)
    _sqw_next = rise_us if low else rise_us - _HALF_SECOND_US


def _sqw_advance(s):
    global _sqw_next, _sqw_rise
    while 0 <= _sqw_next <= s:
        if _sqw_low:  # rising edge: half a second to the fall
            _sqw_next = _sqw_rise + _HALF_SECOND_US
            _sqw_rise += _sqw_period
            _sqw_set_low(False)
        else:
            _sqw_next = _sqw_rise
            _sqw_set_low(True)


def _sqw_set_low(low):
    global _sqw_low
    if low == _sqw_low:
        return
    _sqw_low = low
    _set_level(_sqw_pin, 0 if low else _sqw_host_level)


# -- GPIO -------------------------------------------------------------------------------

IRQ_RISING = 1
IRQ_FALLING = 2
IRQ_RETRY_SIM_US = 1000000
IRQ_RETRY_REAL_US = 250000


def set_irq(gpio, trigger, handler, pin):
    pin_irqs[gpio] = (trigger, handler, pin) if handler is not None and trigger else None


def _dispatch_pin(gpio, level):
    """A level change from the host; False: the edge found the scheduler queue full, try again
    at the next sync point."""
    global _sqw_host_level, _evt_retry_until
    if gpio == _sqw_pin:
        _sqw_host_level = level
        if _sqw_low:
            return True  # the DS3231 holds the line low
    old = pin_levels[gpio]
    entry = pin_irqs[gpio]
    if entry is None or old == level or not entry[0] & (IRQ_RISING if level else IRQ_FALLING):
        pin_levels[gpio] = level
        return True
    # The queue is full when the firmware has not run callbacks for 4 edges. A level the host
    # drives (a button) may have waited in the socket while the interpreter was in a long
    # request, so the edge is retried for IRQ_RETRY_SIM_US of simulated time before it counts
    # as lost (the square wave's own edges, made in simulated time, are lost at once).
    try:
        micropython.schedule(entry[1], entry[2])
    except RuntimeError:
        if _evt_retry_until < 0:
            _evt_retry_until = _reported + IRQ_RETRY_SIM_US
        if _reported < _evt_retry_until:
            return False
        _irq_was_lost(gpio)
    _evt_retry_until = -1
    pin_levels[gpio] = level
    return True


def _set_level(gpio, level):
    """A level change made in this process's simulated time (the square wave; main thread).
    An edge that finds the scheduler queue full is lost at once, as on the chip: the firmware
    has not run callbacks for four edges."""
    old = pin_levels[gpio]
    pin_levels[gpio] = level
    entry = pin_irqs[gpio]
    if entry is None or old == level:
        return
    if not entry[0] & (IRQ_RISING if level else IRQ_FALLING):
        return
    try:
        micropython.schedule(entry[1], entry[2])
    except RuntimeError:
        _irq_was_lost(gpio)


def _irq_was_lost(gpio):
    global irq_lost
    irq_lost += 1
    _send(_evt, ipc.EV_IRQ_LOST, bytes((gpio,)))


def _read_events():
    """Act on the host's events that have come (main thread: every sync point and wake-up)."""
    global _evt_fill, _events_on, _anchors
    if not _events_on:
        return
    buf = _evt_buf
    while True:
        fill = _evt_fill
        got = None
        if fill < len(buf):
            try:
                got = _evt.readinto(_evt_view[fill:] if fill else _evt_view)
            except OSError:
                got = None
            if got == 0:
                _events_on = False  # the host went away: nothing sensible left to do
                return
            if got:
                fill += got
        start = 0
        while fill - start >= ipc.HEADER_SIZE:
            end = start + ipc.HEADER_SIZE + (buf[start] | buf[start + 1] << 8) - 1
            if end > fill:
                break
            kind = buf[start + 2]
            body = start + ipc.HEADER_SIZE
            if kind == ipc.EV_PIN:
                if not _dispatch_pin(buf[body], buf[body + 1]):
                    got = None  # the rest waits until the queue has room
                    break
            elif kind == ipc.EV_CLOCK:
                _anchors = struct.unpack_from("<qqi", buf, body)
            elif kind == ipc.EV_SQW:
                rise, period = struct.unpack_from(ipc.SQW, buf, body)
                set_sqw(rise, period)
            start = end
        if start:
            buf[: fill - start] = buf[start:fill]
        _evt_fill = fill - start
        if not got:
            return


def start(argv):
    """Connect to the host, fetch the boot parameters (start_events() starts the event thread)."""
    global params, _req, _reader, _reply_buf, _evt, _anchors, boot_sim_us, _cpu_milli, _sqw_pin
    port = int(argv[1])
    token = argv[2].encode()
    _req = _connect(port)
    _reader = _Reader(_req, _reply_buf)
    _reply_buf = None  # the reader's now
    _send(_req, ipc.OP_HELLO, b"R" + token)
    params = json.loads(_reader.frame()[1])
    _evt = _connect(port)
    _send(_evt, ipc.OP_HELLO, b"E" + token)
    _evt.setblocking(False)
    a = params["anchors"]
    _anchors = (a[0], a[1], a[2])
    boot_sim_us = params["boot_sim_us"]
    _cpu_milli = params["cpu_factor_milli"]
    _open_schedstat()
    if _sched is not None:
        _calibrate_sync_cost()
    _resume(boot_sim_us)
    # The ROM's own start (the port's C main(): mounting, the heap, the static objects) stands
    # still in simulated time until boot.py starts (vb_rom.boot calls native_exit()).
    native_enter()
    for gpio, level in params["pin_levels"]:
        pin_levels[gpio] = level
    _sqw_pin = params["sqw_pin"]
    if _sqw_pin >= 0:
        _dispatch_pin(_sqw_pin, pin_levels[_sqw_pin])
        set_sqw(params["sqw"][0], params["sqw"][1])
    _open_wake_socket()
    return params


def start_events():
    """Start acting on the host's events (pin levels, clock anchors); until then they wait in
    the socket. Called once the ROM's boot has filled the heap's holes."""
    global _events_on
    _events_on = True
    _read_events()


def halt_forever():
    """Wait to be killed by the host (after a reset request)."""
    while True:
        real_time.sleep_ms(1000)


def exit_process(code):
    sys.exit(code)
