# The per-device config schema, defined once.
#
# The board reads CONFIG_FILE (JSON) at boot and checks it with `validate`; the provisioning
# build renders the same file from the inventory (templates/config.json.j2) and checks it with
# this very function before anything is uploaded, so a config the board would refuse never
# leaves the build. MicroPython-compatible: annotations only in signatures; imports only
# `json` and `protocol`.
#
# {
#   "schema": 1,
#   "device": "lab-01",                 # name: MQTT client id and topic level (protocol.py rules)
#   "wifi": [{"ssid": "lab", "password": "..."}, ...],   # tried in order; 1..8 networks
#   "broker": {"host": "192.168.1.10", "port": 1883, "user": null, "password": null,
#              "tls": false, "keepalive": 60},
#   "ntp_host": "pool.ntp.org",
#   "topic_prefix": "labfleet",
#   "sensors": {"thermocouple": "MAX6675" | "MAX31855" | null,
#               "ambient": "SHT30" | "SHT20" | null,
#               "sht30_address": 68},    # 0x44 (ADDR low) or 0x45 (ADDR high)
#   "pins": {"i2c_scl": 5, "i2c_sda": 4, "spi_cs": 15, "sqw": 2, "button": 0, "safe_mode": 13},
#   "buffer": {"ram_samples": 60,       # RAM queue in front of the flash spill file
#              "flash_samples": 21600,  # flash ring capacity (6 h at 1 Hz by default)
#              "flush_s": 10,           # longest a sample stays in RAM only (the reset-loss bound)
#              "batch": 30,             # most samples in one MQTT publish
#              "resend_s": 8},          # acknowledged samples are kept this long and sent again
#                                       # if the connection breaks: more than the broker's
#                                       # autosave_interval (mosquitto acknowledges, then saves)
#   "health_s": 60,                     # health message period
#   "resync_s": 86400                   # NTP resync period
# }
# Omitted sections/keys take DEFAULTS. Unknown keys are errors (they are usually typos).

if False:  # for type checkers only: MicroPython has no typing module
    from typing import Any

try:
    from protocol import DEVICE_NAME_MAX, valid_device_name  # type: ignore[import-not-found]
except ImportError:  # CPython tools import the firmware as a package
    from firmware.protocol import DEVICE_NAME_MAX, valid_device_name

CONFIG_FILE = "config.json"
# While this file is on the flash the board boots in safe mode (app and watchdog not started).
# Provisioning creates it before touching a board's files and removes it when done: once the
# app has started the ESP8266's watchdog nothing stops it (a soft reset neither), so a board
# interrupted at its REPL would reset in the middle of an upload (roles/board_port).
SAFE_MODE_FILE = "safemode"
SCHEMA_VERSION = 1

THERMOCOUPLE_TYPES = ("MAX6675", "MAX31855")
AMBIENT_TYPES = ("SHT30", "SHT20")
SHT30_ADDRESSES = (0x44, 0x45)

# The seed's wiring (NodeMCU / ESP-12E): I2C SCL GPIO5 / SDA GPIO4, HSPI with CS GPIO15,
# DS3231 SQW on GPIO2, flash button GPIO0, safe-mode jumper GPIO13.
DEFAULT_PINS = {"i2c_scl": 5, "i2c_sda": 4, "spi_cs": 15, "sqw": 2, "button": 0, "safe_mode": 13}
# HSPI (SPI(1)) owns these pins; a config must not reuse them for anything else.
HSPI_PINS = {14: "HSPI SCK", 13: "HSPI MOSI", 12: "HSPI MISO"}
# GPIO 6..11 drive the SPI flash chip on every ESP8266 module.
FLASH_PINS = (6, 7, 8, 9, 10, 11)
VALID_GPIOS = (0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16)

DEFAULTS = {  # type: dict[str, Any]
    "schema": SCHEMA_VERSION,
    "broker": {"port": 1883, "user": None, "password": None, "tls": False, "keepalive": 60},
    "ntp_host": "pool.ntp.org",
    "topic_prefix": "labfleet",
    "sensors": {"thermocouple": "MAX6675", "ambient": "SHT30", "sht30_address": 0x44},
    "pins": DEFAULT_PINS,
    # RAM is what an ESP8266 lacks most: 60 samples (28 bytes each) are six flush intervals, and
    # batches of 30 (up to 67 bytes each in the payload buffer) replay a backlog far beyond 20x
    "buffer": {"ram_samples": 60, "flash_samples": 21600, "flush_s": 10, "batch": 30, "resend_s": 8},
    "health_s": 60,
    "resync_s": 86400,
}
REQUIRED = ("device", "wifi", "broker")
SECTIONS = ("broker", "sensors", "pins", "buffer")
TOP_KEYS = (
    "schema",
    "device",
    "wifi",
    "broker",
    "ntp_host",
    "topic_prefix",
    "sensors",
    "pins",
    "buffer",
    "health_s",
    "resync_s",
)
MAX_WIFI_NETWORKS = 8


def with_defaults(cfg: "dict[str, Any]") -> "dict[str, Any]":
    """A copy of cfg with every omitted section key filled in from DEFAULTS."""
    out = {}
    for key, value in DEFAULTS.items():
        if isinstance(value, dict):
            merged = dict(value)
            given = cfg.get(key)
            if isinstance(given, dict):
                merged.update(given)
                out[key] = merged
            else:
                out[key] = merged if given is None else given
        else:
            out[key] = cfg.get(key, value)
    for key in cfg:
        if key not in out:
            out[key] = cfg[key]
    return out


def _is_int(value: "Any") -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(errors: "list[str]", name: str, value: "Any", low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        errors.append("%s must be an integer in %d..%d, got %r" % (name, low, high, value))


def _check_str(errors: "list[str]", name: str, value: "Any", max_len: int, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or len(value) > max_len or (not allow_empty and not value):
        errors.append(
            "%s must be a %sstring of at most %d characters"
            % (name, "" if allow_empty else "non-empty ", max_len)
        )


def _check_wifi(errors: "list[str]", wifi: "Any") -> None:
    if not isinstance(wifi, list) or not 1 <= len(wifi) <= MAX_WIFI_NETWORKS:
        errors.append("wifi must be a list of 1..%d networks" % MAX_WIFI_NETWORKS)
        return
    for i, net in enumerate(wifi):
        where = "wifi[%d]" % i
        if not isinstance(net, dict):
            errors.append(where + " must be an object with ssid and password")
            continue
        for key in net:
            if key not in ("ssid", "password"):
                errors.append("%s has unknown key %r" % (where, key))
        _check_str(errors, where + ".ssid", net.get("ssid"), 32)
        # WPA2-PSK passphrases are 8..63 characters; an open network has an empty password.
        password = net.get("password", "")
        if not isinstance(password, str) or (password and not 8 <= len(password) <= 63):
            errors.append(where + ".password must be empty (open network) or 8..63 characters")


def _check_broker(errors: "list[str]", broker: "dict[str, Any]") -> None:
    _check_str(errors, "broker.host", broker.get("host"), 253)
    _check_int(errors, "broker.port", broker.get("port"), 1, 65535)
    for key in ("user", "password"):
        if broker.get(key) is not None:
            _check_str(errors, "broker." + key, broker.get(key), 64)
    if (broker.get("user") is None) != (broker.get("password") is None):
        errors.append("broker.user and broker.password must be given together")
    if not isinstance(broker.get("tls"), bool):
        errors.append("broker.tls must be true or false")
    _check_int(errors, "broker.keepalive", broker.get("keepalive"), 10, 600)


def _check_sensors(errors: "list[str]", sensors: "dict[str, Any]") -> None:
    tc = sensors.get("thermocouple")
    if tc is not None and tc not in THERMOCOUPLE_TYPES:
        errors.append(
            "sensors.thermocouple must be one of %s or null, got %r" % ("|".join(THERMOCOUPLE_TYPES), tc)
        )
    amb = sensors.get("ambient")
    if amb is not None and amb not in AMBIENT_TYPES:
        errors.append("sensors.ambient must be one of %s or null, got %r" % ("|".join(AMBIENT_TYPES), amb))
    if sensors.get("sht30_address") not in SHT30_ADDRESSES:
        errors.append("sensors.sht30_address must be 68 (0x44) or 69 (0x45)")


def _check_pins(errors: "list[str]", pins: "dict[str, Any]", uses_spi: bool) -> None:
    owner = {}  # type: dict[int, str]
    for name in pins:
        gpio = pins[name]
        if not _is_int(gpio) or gpio not in VALID_GPIOS:
            errors.append(
                "pins.%s must be a usable GPIO (%s), got %r"
                % (name, ", ".join([str(g) for g in VALID_GPIOS]), gpio)
            )
            continue
        if gpio in owner:
            errors.append("pins.%s and pins.%s both use GPIO%d" % (owner[gpio], name, gpio))
        owner[gpio] = name
        # The safe-mode jumper is only read at boot, before SPI is set up, so it may share a pin.
        if uses_spi and gpio in HSPI_PINS and name != "safe_mode":
            errors.append("pins.%s uses GPIO%d, which is %s" % (name, gpio, HSPI_PINS[gpio]))


def _check_buffer(errors: "list[str]", buf: "dict[str, Any]") -> None:
    _check_int(errors, "buffer.ram_samples", buf.get("ram_samples"), 10, 2000)
    _check_int(errors, "buffer.flash_samples", buf.get("flash_samples"), 0, 10000000)
    _check_int(errors, "buffer.flush_s", buf.get("flush_s"), 1, 3600)
    _check_int(errors, "buffer.batch", buf.get("batch"), 1, 500)
    _check_int(errors, "buffer.resend_s", buf.get("resend_s"), 0, 3600)
    if _is_int(buf.get("resend_s")) and _is_int(buf.get("flush_s")) and buf["resend_s"] >= buf["flush_s"]:
        # an acknowledged sample waits in RAM, and RAM is flushed to flash after flush_s
        errors.append("buffer.resend_s must be less than buffer.flush_s")
    if (
        _is_int(buf.get("flush_s"))
        and _is_int(buf.get("ram_samples"))
        and buf["flush_s"] > buf["ram_samples"]
    ):
        errors.append("buffer.flush_s must not exceed buffer.ram_samples (1 sample per second)")


def validate(cfg: "Any") -> "list[str]":
    """A list of human-readable errors (empty when cfg is valid). cfg as read from CONFIG_FILE."""
    errors = []
    if not isinstance(cfg, dict):
        return ["the config must be a JSON object"]
    for key in cfg:
        if key not in TOP_KEYS:
            errors.append("unknown key %r" % key)
    for key in REQUIRED:
        if key not in cfg:
            errors.append("missing %r" % key)
    for key in SECTIONS:
        if key in cfg and not isinstance(cfg[key], dict):
            errors.append("%s must be an object" % key)
    if errors:
        return errors
    full = with_defaults(cfg)
    for key in SECTIONS:
        for sub in full[key]:
            if sub not in DEFAULTS[key] and not (key == "broker" and sub == "host"):
                errors.append("unknown key %s.%s" % (key, sub))
    if full["schema"] != SCHEMA_VERSION:
        errors.append("schema must be %d, got %r" % (SCHEMA_VERSION, full["schema"]))
    if not valid_device_name(full.get("device")):
        errors.append(
            "device must be 1..%d characters of a-z 0-9 - _ (not starting with - or _), got %r"
            % (DEVICE_NAME_MAX, full.get("device"))
        )
    _check_wifi(errors, full["wifi"])
    _check_broker(errors, full["broker"])
    _check_str(errors, "ntp_host", full["ntp_host"], 253)
    _check_str(errors, "topic_prefix", full["topic_prefix"], 64)
    prefix = full["topic_prefix"]
    if isinstance(prefix, str) and (
        "+" in prefix
        or "#" in prefix
        or prefix.startswith("$")
        or prefix.startswith("/")
        or prefix.endswith("/")
    ):
        errors.append("topic_prefix must not contain + or #, start with $ or /, or end with /")
    _check_sensors(errors, full["sensors"])
    _check_pins(errors, full["pins"], full["sensors"].get("thermocouple") is not None)
    _check_buffer(errors, full["buffer"])
    _check_int(errors, "health_s", full["health_s"], 10, 3600)
    _check_int(errors, "resync_s", full["resync_s"], 600, 604800)
    return errors


def load(path: str = CONFIG_FILE) -> "tuple[dict[str, Any] | None, list[str]]":
    """(config with defaults, errors). A missing or unparsable file is an error, not an exception."""
    import json

    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError:
        return None, ["no %s on the board's flash" % path]
    except ValueError as e:
        return None, ["%s is not valid JSON: %s" % (path, e)]
    errors = validate(cfg)
    if errors:
        return None, errors
    return with_defaults(cfg), []
