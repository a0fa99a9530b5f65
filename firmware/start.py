# What main.py needs before the app runs, and after it failed; imported, used and unloaded.
#
# Safe mode (the app is not started, the REPL is free for debugging) when the safe-mode pin
# (config pins.safe_mode, GPIO13 without a usable config) is grounded at boot, when the
# maintenance file config.SAFE_MODE_FILE is on the flash (provisioning puts it there), or when
# config.json is missing or invalid: the reasons are printed on the console and the board stays
# in the REPL, so a bad config never becomes a reset loop.
#
# After an exception from the app, log_crash() prints its traceback and appends it to CRASH_LOG
# (only the newest CRASH_LOG_MAX bytes are kept), and leaves CRASH_MARK and the count of crashes
# in a row in RTC memory (it survives a reset, not a power cut): the next boot reports its reset
# cause as "exception" (the ESP8266 itself reports machine.reset() as a soft reset). A crash
# within CRASH_RUN_MS of boot counts as one more in a row; from the CRASH_LOOP-th in a row on,
# the app starts only after a growing delay (Ctrl-C then leaves the board in the REPL), which
# also spares the flash a boot counter rewrite every few seconds.

CRASH_LOG = "crash.log"
CRASH_LOG_MAX = 2048
CRASH_MARK = b"crash"
BOOT_MARK = b"boot"  # RTC memory during a boot after a crash: BOOT_MARK + crashes in a row
CRASH_RUN_MS = 60000
CRASH_LOOP = 3
CRASH_DELAY_MAX_S = 600
# protocol.py INFO_KEYS "reset", by the ESP8266 SDK's rst_reason (3 is the software watchdog)
RESET_CAUSES = ("power", "wdt", "exception", "wdt", "soft", "deepsleep", "hard")


def _count(mark, prefix):
    """The count after prefix in an RTC memory mark, or None if the mark is not prefix's."""
    n = len(prefix)
    return mark[n] if len(mark) > n and mark[:n] == prefix else None


def reset_cause():
    """(reset cause, crashes in a row before this boot)."""
    import machine

    rtc = machine.RTC()
    crashes = _count(rtc.memory(), CRASH_MARK)
    if crashes is not None:
        rtc.memory(BOOT_MARK + bytes((crashes,)))
        return "exception", crashes
    rtc.memory(b"")
    cause = machine.reset_cause()
    return (RESET_CAUSES[cause] if 0 <= cause < len(RESET_CAUSES) else None), 0


def config():
    """[cfg, config file name, reset cause] to start the app with, or None for safe mode."""
    import sys
    import time

    import config
    from machine import Pin

    try:
        open(config.SAFE_MODE_FILE).close()
        print(
            "labfleet: SAFE MODE: the file %r is on the flash (maintenance); the app is not started"
            % config.SAFE_MODE_FILE
        )
        return None
    except OSError:
        pass
    cfg, errors = config.load()
    name = config.CONFIG_FILE
    gpio = (cfg["pins"] if cfg else config.DEFAULT_PINS)["safe_mode"]
    del config
    sys.modules.pop("config")  # only needed at boot: its heap goes to the app
    if not Pin(gpio, Pin.IN, Pin.PULL_UP).value():
        print("labfleet: SAFE MODE: GPIO%d is grounded; the app is not started" % gpio)
        return None
    if errors:
        print("labfleet: SAFE MODE: %s is not usable; the app is not started:" % name)
        for error in errors:
            print("  - " + error)
        return None
    cause, crashes = reset_cause()
    if crashes >= CRASH_LOOP:
        delay = 10 << (crashes - CRASH_LOOP)
        if delay > CRASH_DELAY_MAX_S:
            delay = CRASH_DELAY_MAX_S
        print(
            "labfleet: the app failed %d times in a row (%s); starting it in %d s"
            % (crashes, CRASH_LOG, delay)
        )
        time.sleep(delay)
    # a list, so that the app can drop the config once it has taken what it needs
    return [cfg, name, cause]


def log_crash(error):
    import io
    import sys
    import time

    import machine

    rtc = machine.RTC()
    mark = rtc.memory()
    crashes = (
        mark[len(BOOT_MARK)] if mark[: len(BOOT_MARK)] == BOOT_MARK and len(mark) > len(BOOT_MARK) else 0
    )
    crashes = crashes + 1 if time.ticks_ms() < CRASH_RUN_MS else 1
    rtc.memory(CRASH_MARK + bytes((crashes if crashes < 255 else 255,)))
    text = io.StringIO()
    sys.print_exception(error, text)
    text = text.getvalue()
    print(text)
    try:
        with open(CRASH_LOG) as f:
            text = f.read() + text
    except OSError:
        pass
    with open(CRASH_LOG, "w") as f:
        f.write(text[-CRASH_LOG_MAX:])
