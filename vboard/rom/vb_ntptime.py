# `ntptime` as frozen into the ESP8266_GENERIC firmware: one SNTP request over UDP to
# `host` port 123, answered on the virtual LAN by the harness's NTP responder (vboard/net.py)
# with simulated time. Written from the SNTP protocol (RFC 4330), not copied.

import struct

import vb_machine
import vb_socket
import vb_time

host = "pool.ntp.org"
timeout = 1
NTP_DELTA_2000 = 3155673600  # seconds from 1900-01-01 (NTP era 0) to 2000-01-01
_MODE_CLIENT_V3 = 0x1B


def _query():
    packet = bytearray(48)
    packet[0] = _MODE_CLIENT_V3
    addr = vb_socket.getaddrinfo(host, 123)[0][-1]
    s = vb_socket.socket(vb_socket.AF_INET, vb_socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(packet, addr)
        reply = s.recv(48)
    finally:
        s.close()
    secs, frac = struct.unpack("!II", reply[40:48])
    return secs - NTP_DELTA_2000, frac


def time():
    """Seconds since 2000-01-01 UTC from the NTP server."""
    return _query()[0]


def settime():
    secs, frac = _query()
    t = vb_time.gmtime(secs)
    vb_machine.RTC().datetime((t[0], t[1], t[2], t[6] + 1, t[3], t[4], t[5], (frac * 1000000) >> 32))
