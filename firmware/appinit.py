# The app's boot-time part, run once with the config: the boot counter, the buses and sensor
# drivers with their self-tests, WiFi, the topics and the constant part of the info message.
# app.run() imports it once the store's and the MQTT client's buffers are allocated, calls
# setup(), and unloads it and the config before it loads the rest of the app (sampler, NTP): the
# heap's peak is then no higher at boot than while the app runs.

import os
import time

import network
import protocol
from app import FIRMWARE_VERSION
from drivers.errors import SensorError
from machine import SPI, Pin, SoftI2C
from micropython import const

BOOT_FILE = "boot.count"  # the boot counter, rewritten once per boot
_TC_SETTLE_MS = const(250)  # a thermocouple converter's first conversion after CS went high
_SPI_BAUD = const(4000000)  # both converters shift out at up to 4.3 MHz, SPI mode 0
_I2C_FREQ = const(400000)


def next_boot():
    """The boot counter, incremented and persisted (written to a new file, then renamed over
    the old one: a reset in between leaves both, and the larger wins)."""
    count = 0
    for name in (BOOT_FILE, BOOT_FILE + ".new"):
        try:
            with open(name) as f:
                value = int(f.read())
        except (OSError, ValueError):
            continue
        if value > count:
            count = value
    count += 1
    with open(BOOT_FILE + ".new", "w") as f:
        f.write("%d\n" % count)
    os.rename(BOOT_FILE + ".new", BOOT_FILE)
    return count


def file_hash(path):
    """First 16 hex digits of the file's sha256 (protocol.py INFO_KEYS: cfg)."""
    import binascii
    import hashlib

    h = hashlib.sha256()
    chunk = bytearray(64)  # the file may be a few kB: not all of it in the heap at once
    with open(path, "rb") as f:
        while True:
            n = f.readinto(chunk)
            if not n:
                break
            h.update(memoryview(chunk)[:n])
    return binascii.hexlify(h.digest()[:8]).decode()


def sensors(cfg, i2c):
    """(thermocouple, ambient) drivers for the sensors the config says are fitted."""
    fitted = cfg["sensors"]
    tc = amb = None
    kind = fitted["thermocouple"]
    if kind:
        spi = SPI(1, baudrate=_SPI_BAUD, polarity=0, phase=0)
        cs = Pin(cfg["pins"]["spi_cs"], Pin.OUT, value=1)
        if kind == "MAX31855":
            from drivers.max31855 import MAX31855 as TC
        else:
            from drivers.max6675 import MAX6675 as TC
        tc = TC(spi, cs)
    kind = fitted["ambient"]
    if kind == "SHT30":
        from drivers.sht3x import SHT3x

        amb = SHT3x(i2c, fitted["sht30_address"])
    elif kind == "SHT20":
        from drivers.sht2x import SHT2x

        amb = SHT2x(i2c)
    return tc, amb


def self_test(sensor, kind):
    """info's {"type", "ok"} of a sensor after one blocking measurement (nulls: not fitted)."""
    if sensor is None:
        return {"type": None, "ok": None}
    try:
        if hasattr(sensor, "measure"):
            sensor.measure()
        else:
            sensor.read()
        ok = True
    except SensorError as e:
        print("labfleet: %s self-test failed: %s" % (kind, e))
        ok = False
    return {"type": kind, "ok": ok}


def mac(wlan):
    import binascii

    try:
        return binascii.hexlify(wlan.config("mac"), ":").decode()
    except (OSError, ValueError):
        return None


def setup(app, cfg, config_file, reset):
    """What app.App needs from the config and the boot, as its attributes."""
    app.boot = boot = next_boot()
    device = cfg["device"]
    print("labfleet %s: %s, boot %d, reset: %s" % (FIRMWARE_VERSION, device, boot, reset))
    pins = cfg["pins"]
    buffer = cfg["buffer"]
    app.flush_s = buffer["flush_s"]
    app.batch = buffer["batch"]
    app.resend_ms = buffer["resend_s"] * 1000
    app.health_s = cfg["health_s"]
    app.resync_s = cfg["resync_s"]
    app.ntp_host = cfg["ntp_host"]
    app.sqw_gpio = pins["sqw"]

    i2c = SoftI2C(scl=Pin(pins["i2c_scl"]), sda=Pin(pins["i2c_sda"]), freq=_I2C_FREQ)
    from drivers.ds3231 import DS3231

    app.rtc = DS3231(i2c)
    app.tc, app.amb = tc, amb = sensors(cfg, i2c)
    if tc is not None:
        time.sleep_ms(_TC_SETTLE_MS)
    fitted = cfg["sensors"]
    tested = {"tc": self_test(tc, fitted["thermocouple"]), "amb": self_test(amb, fitted["ambient"])}
    app.button = Pin(pins["button"], Pin.IN, Pin.PULL_UP)

    app.networks = [(net["ssid"], net.get("password", "")) for net in cfg["wifi"]]
    app.wlan = wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        try:
            wlan.connect(*app.networks[0])
        except OSError as e:  # the app tries the networks again later
            print("labfleet: WiFi connect failed: %s" % e)

    app.device = device
    prefix = cfg["topic_prefix"]
    app.t_status = protocol.topic(prefix, device, protocol.STATUS).encode()
    app.t_info = protocol.topic(prefix, device, protocol.INFO).encode()
    app.t_data = protocol.topic(prefix, device, protocol.DATA).encode()
    app.t_health = protocol.topic(prefix, device, protocol.HEALTH).encode()
    # the constant part of the info message (app.run() adds "buffer", app.info() "time" and "t")
    app.info_fields = {
        "v": protocol.PROTOCOL_VERSION,
        "device": device,
        "fw": FIRMWARE_VERSION,
        "mpy": os.uname().version,
        "cfg": file_hash(config_file),
        "boot": boot,
        "reset": reset,
        "mac": mac(wlan),
        "sensors": tested,
    }
