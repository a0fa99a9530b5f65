# `time` as on the ESP8266 port, in simulated time.
#
# time() counts seconds since 2000-01-01 UTC (the port's epoch) from the ESP8266's own RTC,
# which starts at 2000-01-01 00:00:00 at power-up and keeps counting across soft resets,
# machine.reset() and deep sleep (the host keeps its offset). ticks_ms/ticks_us start at 0 at
# boot and wrap at 2**30 like the port's. gmtime/localtime/mktime use the 2000 epoch and
# there is no time zone (localtime == gmtime).

import vb_hal as hal

_rt = hal.real_time
EPOCH_2000 = 946684800  # Unix time of 2000-01-01T00:00:00Z
rtc_offset_us = 0  # ESP RTC (2000 epoch) minus simulated Unix time, in us


def _rtc_us():
    return hal.sim_us() - EPOCH_2000 * 1000000 + rtc_offset_us


def time():
    return _rtc_us() // 1000000


def time_ns():
    return _rtc_us() * 1000


def set_rtc_us(us_since_2000):
    global rtc_offset_us
    rtc_offset_us = us_since_2000 - (hal.sim_us() - EPOCH_2000 * 1000000)
    hal.note("rtc", rtc_offset_us)


def gmtime(secs=None):
    if secs is None:
        secs = time()
    # the port's struct_time has 8 fields: no DST flag
    return _rt.gmtime(secs + EPOCH_2000)[:8]


localtime = gmtime


def mktime(t):
    # TZ=UTC in the board's environment makes the unix port's mktime an inverse of gmtime.
    return _rt.mktime(tuple(t[:8]) + (0,) * (9 - len(t[:8]))) - EPOCH_2000


def sleep(seconds):
    hal.sleep_until_sim(hal.sim_us() + int(seconds * 1000000))


def sleep_ms(ms):
    hal.sleep_until_sim(hal.sim_us() + ms * 1000)


def sleep_us(us):
    hal.sleep_until_sim(hal.sim_us() + us)


ticks_ms = hal.ticks_ms
ticks_us = hal.ticks_us
ticks_diff = hal.ticks_diff
ticks_add = hal.ticks_add


def ticks_cpu():
    # The port's ticks_cpu is the CPU cycle counter (80 MHz): fast and wrapping.
    return (hal.sim_us() * 80) & hal.TICKS_MAX
