# One sample per DS3231 second, paced by the DS3231's 1 Hz square wave.
#
# The SQW rising edge on its GPIO runs `_on_edge` (a scheduled callback on the ESP8266: it must
# not allocate), which only counts the edge and notes its ticks. Everything else happens in
# `Sampler.service()`, called by the main loop: for every new edge it reads the thermocouple
# (one SPI frame) and starts the ambient conversion, then polls the ambient sensor when its
# conversion time has passed (SHT20: temperature, then humidity), never sleeping, so a slow
# sensor cannot make an edge be missed. A sensor that fails gives null and a protocol flag.
# The one wait: a thermocouple read less than its conversion time after the previous one (that
# sample was late, its read came just before this edge) would get the previous conversion, so
# it waits for the running one first (at most 220 ms, edges still counted while it sleeps).
#
# Time: the rising edge comes 500 ms into the DS3231 second it belongs to. The sampler reads the
# DS3231 once, right after an edge (the "anchor", which is not sampled itself), and from then on
# the second of edge number k is base + k. After the DS3231 is set (timesync) the edges restart
# in a new phase, so the sampler re-anchors on the first edge after the write. A value is only
# ever sent with the second it was measured in: once a sample's reads are done, the DS3231 is
# asked whether its second is still on (see _on_time); if not, the values are null with
# FLAG_LATE. Edges that came while the main loop was blocked get such samples too (their seconds
# are gone), and _push() fills short gaps (lost interrupts), so every second gets exactly one
# sample.

import time

from drivers.errors import CRCError, NotAnswering, OpenCircuit, SensorError, ShortCircuit
from machine import Pin
from micropython import const
from protocol import FLAG_AMB_CRC, FLAG_AMB_FAULT, FLAG_LATE, FLAG_TC_FAULT, FLAG_TC_OPEN, FLAG_TC_SHORT

_HALF_SECOND_MS = const(500)  # from a rising edge to the end of its DS3231 second
_ANCHOR_WITHIN_MS = const(400)  # the DS3231 read must end well before its second does
_BEHIND_MAX = const(3)  # samples in a row a second behind the DS3231 before the base moves
_JUMP_S = const(600)  # seconds between samples that _push() takes for the clock being set
_IDLE_UNKNOWN_MS = const(1000)
_WAIT_MAX_MS = const(100)  # longest the main loop waits before looking again
_WAIT_MIN_MS = const(5)

_edges = 0  # SQW rising edges since boot (written only by _on_edge)
_edge_ticks = 0  # ticks_ms of the newest edge


def _on_edge(pin):
    global _edges, _edge_ticks
    _edges += 1
    _edge_ticks = time.ticks_ms()


def tc_flag(error):
    """The protocol flag of a thermocouple driver's exception."""
    if isinstance(error, OpenCircuit):
        return FLAG_TC_OPEN
    if isinstance(error, ShortCircuit):
        return FLAG_TC_SHORT
    return FLAG_TC_FAULT


def amb_flag(error):
    """The protocol flag of an ambient sensor driver's exception."""
    return FLAG_AMB_CRC if isinstance(error, CRCError) else FLAG_AMB_FAULT


class Sampler:
    def __init__(self, store, boot, rtc, thermocouple, ambient, sqw_gpio):
        self.store = store
        self.boot = boot
        self.rtc = rtc
        self.tc = thermocouple
        self.amb = ambient
        self.enabled = True  # False: anchor, but take no samples yet (waiting for the clock)
        self.flags = 0  # flags every sample carries (FLAG_TIME_UNSYNCED)
        self.seq = 0  # seq of the next sample
        self.done = 0  # edges handled (sampled or skipped)
        self.base = None  # DS3231 second of edge number 0; None: not anchored
        # Only an edge after this may anchor; None once an edge after it came (a ticks value is
        # compared only while it is recent: ticks_diff means nothing beyond 2**29 ms, 6.2 days).
        self.anchor_after = time.ticks_ms()
        self.busy = False  # an ambient conversion of the current sample is running
        self.due = 0  # ticks_ms when to poll the ambient sensor
        self._t = 0  # the sample in progress: its second, the ticks of its edge, its kT
        self._ticks = 0
        self._kt = None
        self._tc_at = time.ticks_ms()  # the thermocouple's conversion runs since (CS high)
        self._behind = 0  # samples in a row the DS3231 showed the next second
        self._flags = 0
        self.last_t = None  # the second of the newest sample
        self.pin = Pin(sqw_gpio, Pin.IN, Pin.PULL_UP)
        self.pin.irq(trigger=Pin.IRQ_RISING, handler=_on_edge)

    # --- what the rest of the firmware asks -----------------------------------------------

    def newest_edge(self):
        """(DS3231 second, ticks_ms) of the newest edge, or None if not anchored."""
        while True:
            edges = _edges
            ticks = _edge_ticks
            if edges == _edges:
                break
        if self.base is None:
            return None
        return self.base + edges, ticks

    def now(self):
        """The current DS3231 second, or None if not anchored."""
        return None if self.base is None else self.base + _edges

    def idle_ms(self):
        """How long the main loop may be busy elsewhere before the sampler needs it again:
        until the next edge is due (no limit while not anchored: nothing to sample)."""
        if self.busy or self.done != _edges:
            return 0
        if self.base is None:
            return _IDLE_UNKNOWN_MS
        return time.ticks_diff(_edge_ticks, time.ticks_ms()) + 1000

    def reanchor(self, written_ticks):
        """The DS3231's time was written at written_ticks: its edges start a new phase, and
        its seconds a new sequence."""
        self.base = None
        self.anchor_after = written_ticks
        self.last_t = None

    # --- the main loop's part -------------------------------------------------------------

    def service(self):
        """Sample what is due; returns ms (0.._WAIT_MAX_MS) until it wants to run again."""
        edges = _edges
        if self.busy:
            if edges != self.done:  # the next edge came first: push what was measured
                self._finish(self.amb.temperature, self.amb.humidity, FLAG_LATE)
            elif time.ticks_diff(self.due, time.ticks_ms()) <= 0:
                self._poll_ambient()
        if edges != self.done:
            self._edge(edges)
        if self.busy:
            wait = time.ticks_diff(self.due, time.ticks_ms())
        else:  # the next edge is due 1000 ms after the newest
            wait = time.ticks_diff(_edge_ticks, time.ticks_ms()) + 1002
            if wait < _WAIT_MIN_MS:
                wait = _WAIT_MIN_MS
        if wait > _WAIT_MAX_MS:
            return _WAIT_MAX_MS
        return wait if wait > 0 else 0

    def _edge(self, edges):
        ticks = _edge_ticks
        if self.base is None:
            self.done = edges
            if self.anchor_after is not None:
                if time.ticks_diff(ticks, self.anchor_after) < 0:
                    return  # an edge of the DS3231's old phase
                self.anchor_after = None
            try:
                second = self.rtc.time()
            except NotAnswering:
                return
            if _edges != edges or time.ticks_diff(time.ticks_ms(), ticks) > _ANCHOR_WITHIN_MS:
                return  # too late to be sure which second the read saw: anchor on the next edge
            # The anchor edge itself is not sampled: if its read ended in the next second after
            # all (a late interrupt), the next sample's check finds out before any value is sent.
            self.base = second - edges
            return
        if self.enabled:
            while self.done + 1 < edges:  # edges the loop was too busy to sample
                self.done += 1
                self._push(self.base + self.done, None, None, None, FLAG_LATE | self.flags)
        self.done = edges
        if not self.enabled:
            return
        self._start(self.base + edges, ticks)

    def _on_time(self):
        """True while the sample in progress is still in its DS3231 second: SQW has not fallen
        (it is high for the second half of the second), no new edge, under 500 ms since the
        edge, and the DS3231 itself still shows that second.

        Reading the DS3231 every sample also keeps the edge count honest. The DS3231 a second
        behind the count: the count is ahead (an anchor read that ended in the next second), so
        the base and this sample move back a second (and the sample gets no values). A second
        ahead: the read was late, or an edge was lost; after _BEHIND_MAX in a row the base moves
        on. Anything else: re-anchor.
        _push() keeps the seconds sent contiguous across such corrections."""
        if (
            not self.pin.value()
            or _edges != self.done
            or time.ticks_diff(time.ticks_ms(), self._ticks) >= _HALF_SECOND_MS
        ):
            return False
        try:
            second = self.rtc.datetime()[5]
        except SensorError:
            return True  # no second opinion; the checks above passed
        expected = self._t % 60
        if second == expected:
            self._behind = 0
            return True
        if second == (expected + 59) % 60:
            self.base -= 1
            self._t -= 1
            self._behind = 0
            return False  # nothing says when in that second the reads were: no values
        self._behind += 1
        if second != (expected + 1) % 60:
            print(
                "labfleet: SQW edge count off the DS3231 (%d s, not %d s): re-anchoring" % (second, expected)
            )
            self.base = None
            self._behind = 0
        elif self._behind >= _BEHIND_MAX:
            self.base += 1
            self._behind = 0
        return False

    def _start(self, t, ticks):
        self._t = t
        self._ticks = ticks
        flags = self.flags
        kt = None
        tc = self.tc
        if tc is not None:
            wait = tc.conversion_ms - time.ticks_diff(time.ticks_ms(), self._tc_at)
            if 0 < wait <= tc.conversion_ms:  # (more: the last read was days ago, ticks wrapped)
                time.sleep_ms(wait)
            try:
                kt = tc.read()
            except SensorError as e:
                flags |= tc_flag(e)
            self._tc_at = time.ticks_ms()
        amb = self.amb
        wait = 0
        if amb is not None:
            try:
                wait = amb.start()
            except SensorError as e:
                flags |= amb_flag(e)
                amb = None
        if not self._on_time():
            # a value is only ever sent with the second it was measured in
            self._kt = None
            self._flags = flags | FLAG_LATE
            self._finish(None, None, 0)
            return
        self._kt = kt
        self._flags = flags
        if amb is None:
            self._finish(None, None, 0)
            return
        self.busy = True
        self.due = time.ticks_add(time.ticks_ms(), wait + 1)

    def _poll_ambient(self):
        amb = self.amb
        try:
            wait = amb.poll()
        except SensorError as e:
            self._finish(amb.temperature, None, amb_flag(e))
            return
        if wait:  # the next conversion (SHT2x humidity) started: in its second?
            if not self._on_time():
                self._finish(amb.temperature, None, FLAG_LATE)
                return
            self.due = time.ticks_add(time.ticks_ms(), wait + 1)
            return
        self._finish(amb.temperature, amb.humidity, 0)

    def _finish(self, at, ah, flags):
        self.busy = False
        self._push(self._t, self._kt, at, ah, self._flags | flags)

    def _push(self, t, kt, at, ah, flags):
        """Store a sample, keeping the seconds sent contiguous: a second already sent is not
        sent again, and a short gap (edges lost, or skipped while re-anchoring) is filled with
        nulls and FLAG_LATE. Jumps of _JUMP_S or more are the clock being set: left as they are."""
        last = self.last_t
        if last is not None:
            if t <= last:
                if last - t < _JUMP_S:
                    return
            elif t - last <= _JUMP_S:
                missing = last + 1
                while missing < t:
                    self._store(missing, None, None, None, FLAG_LATE | self.flags)
                    missing += 1
        self._store(t, kt, at, ah, flags)
        self.last_t = t

    def _store(self, t, kt, at, ah, flags):
        store = self.store
        if store.ram_depth() >= store.ram_capacity - 1:
            store.flush()  # RAM nearly full (the link is down): make room on flash
        store.push(self.boot, self.seq, t, kt, at, ah, flags)
        self.seq += 1
