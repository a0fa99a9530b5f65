# The DS3231 against NTP: all sample times are the DS3231's UTC seconds, and NTP (config
# ntp_host) checks them at boot and every resync_s.
#
# The DS3231's sub-second phase is known at each SQW rising edge (500 ms into its second), so
# the offset from NTP is measured to the millisecond: the DS3231 time at the moment NTP's answer
# arrived is (second of the newest edge) + 0.5 s + (ms since that edge). When the DS3231 lost
# power (OSF) or is off by more than MAX_OFFSET_MS it is set from NTP: the write lands on an NTP
# second boundary, because writing the seconds register restarts the DS3231's countdown (its
# next edge comes 500 ms after the write); then OSF is cleared and the sampler re-anchors.
#
# SNTP (RFC 4330) is done here rather than with the port's ntptime module, which returns whole
# seconds only, and over a non-blocking socket with a select.poll deadline so a lost answer
# cannot stall sampling.

import select
import socket
import struct
import time

from drivers.errors import SensorError
from micropython import const

MAX_OFFSET_MS = const(1000)  # set the DS3231 when NTP differs by more
# Right after a set, the next check expects the DS3231 on NTP time: a write that reached the chip
# late (a busy bus, a slow host) is redone rather than left up to a second off.
SET_CHECK_MS = const(500)
ANSWER_TIMEOUT_MS = const(400)
_NTP_PORT = const(123)
_PACKET = const(48)
_CLIENT_V3 = const(0x1B)  # LI 0, version 3, mode 3 (client)
_MODE_SERVER = const(4)
_TRANSMIT_AT = const(40)  # transmit timestamp: seconds since 1900, then the fraction
_NTP_TO_UNIX = 2208988800  # seconds from 1900-01-01 to 1970-01-01 (not a small int on the ESP8266)
_UNIX_2020 = 1577836800  # any answer before this is not a real clock

# info["time"]["sync"] values
SYNC_OK = "ok"
SYNC_FAILED = "failed"
SYNC_SKIPPED = "skipped"


class TimeSync:
    def __init__(self, rtc, sampler, host):
        self.rtc = rtc
        self.sampler = sampler
        self.host = host
        self.addr = None  # resolved once: a DNS lookup can block for seconds on a board
        self.osf = False  # the DS3231 reported a stopped oscillator at boot
        self.synced = False  # NTP confirmed or set the DS3231 since boot
        self.result = SYNC_SKIPPED
        self.offset_ms = None  # DS3231 minus NTP, measured before any correction
        self.sets = 0  # times the DS3231 was set since boot
        self.just_set = False  # the last sync set the DS3231: the next one checks the result
        self._packet = bytearray(_PACKET)

    def start(self):
        """At boot: note OSF and turn on the 1 Hz square wave. Raises NotAnswering."""
        self.osf = self.rtc.osf()
        self.rtc.enable_sqw_1hz()
        return self.osf

    def query(self):
        """NTP time as (unix seconds, ms, ticks_ms): it was seconds + ms / 1000 at ticks_ms.
        Raises OSError when there is no (valid) answer within ANSWER_TIMEOUT_MS."""
        if self.addr is None:
            self.addr = socket.getaddrinfo(self.host, _NTP_PORT)[0][-1]
        packet = self._packet
        for i in range(_PACKET):
            packet[i] = 0
        packet[0] = _CLIENT_V3
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            poller = select.poll()
            poller.register(s, select.POLLIN)
            sent = time.ticks_ms()
            s.sendto(packet, self.addr)
            if not poller.poll(ANSWER_TIMEOUT_MS):
                raise OSError(110)  # ETIMEDOUT
            reply = s.recv(_PACKET)
            arrived = time.ticks_ms()
        finally:
            s.close()
        if len(reply) < _PACKET or reply[0] & 7 != _MODE_SERVER or not reply[1]:
            raise OSError(5)  # EIO: not a server answer, or a kiss-of-death (stratum 0)
        seconds = struct.unpack_from("!I", reply, _TRANSMIT_AT)[0] - _NTP_TO_UNIX
        if seconds < _UNIX_2020:
            raise OSError(5)
        # 16 bits of the fraction are plenty; the answer left the server half a round trip ago
        ms = ((reply[_TRANSMIT_AT + 4] << 8 | reply[_TRANSMIT_AT + 5]) * 1000 >> 16) + (
            time.ticks_diff(arrived, sent) >> 1
        )
        return seconds + ms // 1000, ms % 1000, arrived

    def offset(self, ntp):
        """DS3231 minus NTP in ms at the moment of the NTP answer."""
        seconds, ms, ticks = ntp
        edge = self.sampler.newest_edge()
        if edge is None:  # not anchored: one read, to the second (its phase is unknown: +500)
            return (self.rtc.time() - seconds) * 1000 + 500 - ms
        second, edge_ticks = edge
        return (second - seconds) * 1000 + 500 + time.ticks_diff(ticks, edge_ticks) - ms

    def set_rtc(self, ntp, wdt=None):
        """Write the DS3231 on the next NTP second boundary (waits up to a second)."""
        seconds, ms, ticks = ntp
        rtc = self.rtc
        started = time.ticks_ms()
        rtc.osf()  # one register read, to learn how long a bus transaction takes
        transfer = time.ticks_diff(time.ticks_ms(), started) >> 1
        # the write reaches the chip about half a transaction after it starts
        boundary = time.ticks_add(ticks, 1000 - ms - (transfer >> 1))
        seconds += 1
        while time.ticks_diff(boundary, time.ticks_ms()) < 0:
            boundary = time.ticks_add(boundary, 1000)
            seconds += 1
        if wdt is not None:
            wdt.feed()
        time.sleep_ms(time.ticks_diff(boundary, time.ticks_ms()))
        rtc.set_time(seconds)
        written = time.ticks_ms()
        rtc.clear_osf()
        self.sampler.reanchor(written)
        self.sets += 1

    def sync(self, wdt=None):
        """One NTP check; sets the DS3231 if it lost power or is off by more than
        MAX_OFFSET_MS (SET_CHECK_MS right after a set). True when NTP answered."""
        try:
            ntp = self.query()
            self.offset_ms = offset = self.offset(ntp)
            limit = SET_CHECK_MS if self.just_set else MAX_OFFSET_MS
            self.just_set = (self.osf and not self.synced) or not -limit <= offset <= limit
            if self.just_set:
                self.set_rtc(ntp, wdt)
        except (OSError, SensorError):
            self.result = SYNC_FAILED
            return False
        self.synced = True
        self.result = SYNC_OK
        return True
