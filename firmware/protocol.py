# The labfleet wire protocol: MQTT topics and payloads, defined once.
#
# This module runs on the boards (MicroPython) and is imported by the recorder, the virtual
# board harness, the load generator and the tests (CPython) as `firmware.protocol`. Keep it to
# the subset both interpreters share: no annotations on variables, no f-strings with `=`, no
# imports beyond `json`.
#
# Topics (PREFIX is the configured topic prefix, DEVICE the board's device name):
#
#   PREFIX/DEVICE/status  retained, QoS 1.  b"online" on every connect; the last will
#                         (registered in CONNECT, before anything else) is retained b"offline".
#   PREFIX/DEVICE/info    retained, QoS 1.  JSON object published on every connect and when the
#                         clock has been set or checked (its "time"), see INFO_KEYS.
#   PREFIX/DEVICE/data    QoS 1, not retained.  JSON array of samples, oldest first; each sample
#                         is itself a JSON array in SAMPLE_FIELDS order.
#   PREFIX/DEVICE/health  retained, QoS 1.  JSON object every HEALTH_PERIOD_S, see HEALTH_KEYS.
#
# A sample: [boot, seq, t, kT, aT, aH, flags]
#   boot   boot counter persisted on the board's flash (increments on every start).
#   seq    per-boot sequence number, 0 for the first sample after boot, +1 per SQW second.
#   t      the DS3231 second the sample belongs to, Unix time (seconds since 1970-01-01 UTC).
#   kT     thermocouple temperature in 0.01 degC (integer) or null.
#   aT     ambient temperature in 0.01 degC (integer) or null.
#   aH     ambient relative humidity in 0.01 %RH (integer) or null.
#   flags  bitmask of FLAG_* describing why a value is null or why the sample is suspect.
# Integers in hundredths keep the payload exact on boards with single-precision floats and
# cost no float formatting; every supported sensor's resolution is a multiple of 0.01.
# (boot, seq) identifies a sample on a device: the recorder removes duplicates by
# (device, boot, seq).
#
# The board subscribes to nothing: it accepts no input from the network.

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "labfleet"

STATUS = "status"
INFO = "info"
DATA = "data"
HEALTH = "health"
KINDS = (STATUS, INFO, DATA, HEALTH)

ONLINE = b"online"
OFFLINE = b"offline"

SAMPLE_FIELDS = ("boot", "seq", "t", "kT", "aT", "aH", "flags")
I_BOOT = 0
I_SEQ = 1
I_TIME = 2
I_KT = 3
I_AT = 4
I_AH = 5
I_FLAGS = 6
VALUE_SCALE = 100  # values are sent in hundredths of their unit

# Sample flags. A null value always has at least one flag saying why.
FLAG_TC_FAULT = 0x01  # thermocouple converter absent or not answering (SPI frame all 0/1s)
FLAG_TC_OPEN = 0x02  # thermocouple open circuit (MAX6675 D2, MAX31855 OC)
FLAG_TC_SHORT = 0x04  # thermocouple shorted to GND or VCC (MAX31855 SCG/SCV)
FLAG_AMB_FAULT = 0x08  # ambient sensor absent or not answering on I2C
FLAG_AMB_CRC = 0x10  # ambient sensor reply failed its CRC check
FLAG_TIME_UNSYNCED = 0x20  # the RTC was not set from NTP since it lost power (OSF seen)
FLAG_LATE = 0x40  # the sample was read late (after the next SQW edge was already due)
FLAG_NAMES = (
    (FLAG_TC_FAULT, "tc_fault"),
    (FLAG_TC_OPEN, "tc_open"),
    (FLAG_TC_SHORT, "tc_short"),
    (FLAG_AMB_FAULT, "amb_fault"),
    (FLAG_AMB_CRC, "amb_crc"),
    (FLAG_TIME_UNSYNCED, "time_unsynced"),
    (FLAG_LATE, "late"),
)

# Keys of the info object (all present; unknown values are null).
#   v        PROTOCOL_VERSION
#   device   device name
#   fw       firmware version string
#   mpy      MicroPython version string of the board
#   cfg      hash of the config file (hex, first 16 digits of sha256)
#   boot     boot counter
#   reset    reset cause: "power", "hard", "wdt", "soft", "deepsleep", "exception"
#   mac      station MAC address "aa:bb:cc:dd:ee:ff"
#   sensors  {"tc": {"type": "MAX6675", "ok": bool}, "amb": {"type": "SHT30", "ok": bool}}
#   time     {"source": "ntp"|"rtc", "sync": "ok"|"failed"|"skipped", "osf": bool,
#             "offset_ms": int|null}   (offset of the DS3231 from NTP before correction)
#   t        Unix time of the message
#   buffer   {"ram": capacity, "flash": capacity, "flush_s": flush interval}
INFO_KEYS = ("v", "device", "fw", "mpy", "cfg", "boot", "reset", "mac", "sensors", "time", "t", "buffer")

# Keys of the health object.
#   boot, t      as in info
#   up           seconds since boot
#   rssi         WiFi RSSI in dBm or null
#   heap         free heap in bytes
#   backlog      samples waiting to be published (RAM + flash)
#   dropped      samples dropped because the buffer overflowed, since boot (never silent)
#   flash_errors flash buffer operations that failed (e.g. a full filesystem), since boot;
#                sampling goes on, the samples stay in RAM or are counted in dropped
#   reconnects   MQTT reconnects since boot
#   seq          sequence number of the newest sample
#   drift_ms     last measured DS3231 offset from NTP in ms, or null
#   paused       publishing paused by the flash button
HEALTH_KEYS = (
    "boot",
    "t",
    "up",
    "rssi",
    "heap",
    "backlog",
    "dropped",
    "flash_errors",
    "reconnects",
    "seq",
    "drift_ms",
    "paused",
)
HEALTH_PERIOD_S = 60

# Device names are used as MQTT client ids, topic levels and HDF5 node names.
DEVICE_NAME_MAX = 32
DEVICE_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_"


def valid_device_name(name: object) -> bool:
    if not isinstance(name, str) or not 0 < len(name) <= DEVICE_NAME_MAX:
        return False
    if name[0] in "-_":
        return False
    for ch in name:
        if ch not in DEVICE_NAME_CHARS:
            return False
    return True


def topic(prefix: str, device: str, kind: str) -> str:
    return prefix + "/" + device + "/" + kind


def parse_topic(prefix: str, topic_name: str) -> "tuple[str, str] | None":
    """(device, kind) for a topic of this protocol under prefix, else None."""
    head = prefix + "/"
    if not topic_name.startswith(head):
        return None
    rest = topic_name[len(head) :].split("/")
    if len(rest) != 2 or rest[1] not in KINDS or not valid_device_name(rest[0]):
        return None
    return rest[0], rest[1]


def subscriptions(prefix: str) -> "list[str]":
    """The topic filters a recorder subscribes to for every board of this protocol."""
    return [prefix + "/+/" + kind for kind in KINDS]


def to_hundredths(value: "float | None") -> "int | None":
    """A physical value as the integer hundredths sent on the wire (None stays None)."""
    if value is None:
        return None
    scaled = value * VALUE_SCALE
    return int(scaled + 0.5) if scaled >= 0 else -int(-scaled + 0.5)


def flag_names(flags: int) -> "list[str]":
    return [name for bit, name in FLAG_NAMES if flags & bit]
