"""One received MQTT message in, rows out: validation, the 2017 legacy protocol, duplicates.

`Ingest.handle` is the whole decision for one message and does no I/O: every message ends as rows
of the data tables, as a dropped duplicate, or as a row of `rejects` saying why. Nothing is
guessed: a value of the wrong type is a reject, never a conversion.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeGuard

from firmware import protocol
from recorder import layout
from recorder.dedupe import SampleIndex
from recorder.journal import Record

log = logging.getLogger("recorder.decode")

NAN = float("nan")
# Unix times at or beyond this (year 5138) are not times a board can mean.
T_MAX = 1e11
INT64_MAX = 2**63 - 1
HUNDREDTHS_LIMIT = 2**31  # the firmware's small-int range; values beyond are not sensor readings
FLAGS_LIMIT = 2**32
SAMPLE_LENGTH = len(protocol.SAMPLE_FIELDS)
FLOAT32_MAX = 3.4e38  # legacy values are stored as float32: larger ones would become inf

LEGACY_TIME_FORMAT = "%Y-%m-%d %H:%M:%S GMT"
LEGACY_SAMPLE_KEYS = frozenset(("id", "kT", "aT", "aH"))
DEFAULT_LEGACY_LOG_TOPIC = "esp001log"
INFO_TEXT = ("fw", "mpy", "cfg", "reset", "mac")

Row = tuple[Any, ...]


class Rejected(ValueError):
    """Why a message (or one sample of it) is not recorded; the text goes in rejects.reason."""


@dataclass
class Outcome:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0


class LegacyInit(NamedTuple):
    data_topic: str
    base: float  # the init message's "Time" as Unix seconds (it was GMT on the board)


def _no_constants(name: str) -> Any:
    raise Rejected(f"{name} is not a number JSON allows")


_JSON = json.JSONDecoder(parse_constant=_no_constants)
# Parsed topics of the protocol, bytes -> (device, device bytes, kind): most messages come from
# a few thousand topics. Only valid topics are kept and the cache starts over when full, so
# hostile topic names cannot grow it.
TOPIC_CACHE_SIZE = 100_000


def parse_json(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("payload is not UTF-8") from None
    try:
        return _JSON.decode(text)
    except Rejected:
        raise
    except (ValueError, RecursionError) as exc:
        raise Rejected(f"invalid JSON: {str(exc)[:80]}") from None


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int  # bool is an int subclass and never a number here


def _is_number(value: object) -> TypeGuard[float]:
    return (type(value) is int or type(value) is float) and math.isfinite(value)


def _unix_time(value: object) -> TypeGuard[float]:
    return _is_number(value) and 0 <= value < T_MAX


def parse_legacy_init(payload: bytes) -> LegacyInit | None:
    """The DATA_topic and time base announced by a 2017 board's ESP_init message on the legacy log
    topic; None for a log line that is not an init (markers like <Data_begin>). The 2017 firmware
    could append garbage after the JSON: it is ignored. Raises Rejected for a broken init."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as bad:
        # Garbage that is not even UTF-8: the text before it must then hold the whole object.
        text = payload[: bad.start].decode("utf-8")
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        obj, _end = json.JSONDecoder(parse_constant=_no_constants).raw_decode(text)
    except Rejected:
        raise
    except (ValueError, RecursionError):
        raise Rejected("legacy init: malformed JSON") from None
    if not isinstance(obj, dict) or "ESP_init" not in obj:
        return None
    init = obj["ESP_init"]
    if not isinstance(init, dict):
        raise Rejected("legacy init: ESP_init is not an object")
    data_topic = init.get("DATA_topic")
    if not isinstance(data_topic, str) or not protocol.valid_device_name(data_topic):
        raise Rejected("legacy init: DATA_topic missing or not a valid device name")
    stamp = init.get("Time")
    if not isinstance(stamp, str):
        raise Rejected("legacy init: Time missing")
    try:
        base = calendar.timegm(time.strptime(stamp, LEGACY_TIME_FORMAT))
    except ValueError:
        raise Rejected("legacy init: Time is not 'YYYY-MM-DD HH:MM:SS GMT'") from None
    return LegacyInit(data_topic, float(base))


def _clip(data: bytes, width: int) -> bytes:
    return data[:width]


def _text(value: object, what: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise Rejected(f"{what} must be a string or null")
    return value.encode("utf-8", "surrogatepass")


@dataclass
class Ingest:
    """The message handler of the writer. Rows accumulate in `rows` until the writer takes them."""

    prefix: str = protocol.DEFAULT_PREFIX
    legacy_log_topic: str | None = DEFAULT_LEGACY_LOG_TOPIC
    max_payload: int = 16384  # the service's default (recorder.config.Settings.max_payload)
    index: SampleIndex = field(default_factory=SampleIndex)
    legacy: dict[str, float] = field(default_factory=dict)  # data topic -> time base
    legacy_changed: bool = False
    last_status: dict[bytes, bool] = field(default_factory=dict)
    last_info: dict[bytes, tuple[int, float]] = field(default_factory=dict)
    last_health: dict[bytes, tuple[int, float]] = field(default_factory=dict)
    rows: dict[str, list[Row]] = field(default_factory=lambda: {name: [] for name in layout.TABLES})
    topics: dict[bytes, tuple[str, bytes, str]] = field(default_factory=dict)

    def take_rows(self) -> dict[str, list[Row]]:
        taken = self.rows
        self.rows = {name: [] for name in layout.TABLES}
        return taken

    def pending_rows(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def handle(self, record: Record) -> Outcome:
        outcome = Outcome()
        try:
            self._dispatch(record, outcome)
        except Rejected as why:
            self._reject(record, str(why), outcome)
        except Exception as exc:  # a bug here must cost one message (kept in rejects), not the service
            log.exception("internal error handling a message on %r", record.topic[:200])
            self._reject(record, f"internal error: {type(exc).__name__}", outcome)
        return outcome

    def _reject(self, record: Record, reason: str, outcome: Outcome) -> None:
        self.rows["rejects"].append(
            (
                record.rx,
                _clip(record.topic, layout.TOPIC_WIDTH),
                len(record.topic),
                _clip(record.payload, layout.REJECT_PAYLOAD_WIDTH),
                record.payload_len,
                _clip(reason.encode("utf-8", "backslashreplace"), layout.REASON_WIDTH),
            )
        )
        outcome.rejected += 1

    def _dispatch(self, record: Record, outcome: Outcome) -> None:
        if record.payload_len > self.max_payload or len(record.payload) > self.max_payload:
            raise Rejected(f"payload too large: {record.payload_len} bytes (limit {self.max_payload})")
        known = self.topics.get(record.topic)
        if known is None:
            try:
                topic = record.topic.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected("topic is not UTF-8") from None
            parsed = protocol.parse_topic(self.prefix, topic)
            if parsed is not None:
                if len(self.topics) >= TOPIC_CACHE_SIZE:
                    self.topics.clear()
                known = self.topics[record.topic] = (parsed[0], parsed[0].encode(), parsed[1])
        if known is not None:
            device, dev, kind = known
            if kind == protocol.DATA:
                self._data(record, dev, outcome)
            elif kind == protocol.STATUS:
                self._status(record, dev, outcome)
            elif kind == protocol.INFO:
                self._info(record, dev, device, outcome)
            else:
                self._health(record, dev, outcome)
        elif self.legacy_log_topic is not None and topic == self.legacy_log_topic:
            self._legacy_log(record, outcome)
        elif topic in self.legacy:
            self._legacy_data(record, topic, outcome)
        elif topic.startswith(self.prefix + "/"):
            raise Rejected("not a topic of the protocol (PREFIX/DEVICE/KIND, valid device name and kind)")
        else:
            raise Rejected("unknown topic")

    # --- the labfleet protocol -------------------------------------------------------------

    def _data(self, record: Record, dev: bytes, outcome: Outcome) -> None:
        samples = parse_json(record.payload)
        if not isinstance(samples, list) or not samples:
            raise Rejected("data must be a non-empty JSON array of samples")
        rows = self.rows["samples"]
        for i, sample in enumerate(samples):
            if not _plain_sample(sample):
                problem = _sample_problem(sample)
                if problem is not None:
                    self._reject(record, f"sample {i}: {problem}", outcome)
                    continue
            boot, seq, t, kt, at, ah, flags = sample
            if not self.index.add(dev, boot, seq, record.rx):
                outcome.duplicates += 1
                continue
            rows.append(
                (
                    dev,
                    boot,
                    seq,
                    float(t),
                    record.rx,
                    NAN if kt is None else kt / protocol.VALUE_SCALE,
                    NAN if at is None else at / protocol.VALUE_SCALE,
                    NAN if ah is None else ah / protocol.VALUE_SCALE,
                    flags,
                )
            )
            outcome.stored += 1

    def _status(self, record: Record, dev: bytes, outcome: Outcome) -> None:
        if record.payload == protocol.ONLINE:
            online = True
        elif record.payload == protocol.OFFLINE:
            online = False
        else:
            raise Rejected("status must be 'online' or 'offline'")
        # A retained copy or a redelivery of the state already recorded is not a change.
        if (record.retain or record.dup) and self.last_status.get(dev) == online:
            outcome.duplicates += 1
            return
        self.last_status[dev] = online
        self.rows["status"].append((dev, record.rx, online, record.retain))
        outcome.stored += 1

    def _info(self, record: Record, dev: bytes, device: str, outcome: Outcome) -> None:
        info = parse_json(record.payload)
        if not isinstance(info, dict):
            raise Rejected("info must be a JSON object")
        if "device" in info and info["device"] != device:
            raise Rejected("info.device does not match the topic")
        v, boot, t = info.get("v"), info.get("boot"), info.get("t")
        if not _is_int(v):
            raise Rejected("info.v must be an integer")
        if not _is_int(boot) or not 0 <= boot <= INT64_MAX:
            raise Rejected("info.boot must be an integer >= 0")
        if not _unix_time(t):
            raise Rejected("info.t must be a Unix time")
        if len(record.payload) > layout.JSON_WIDTH:
            raise Rejected(f"info larger than the json column ({layout.JSON_WIDTH} bytes)")
        if not -INT64_MAX <= v <= INT64_MAX:
            raise Rejected("info.v out of range")
        columns = {
            name: _text(info.get(name), "info." + name) for name in ("fw", "mpy", "cfg", "reset", "mac")
        }
        key = (boot, float(t))
        if self.last_info.get(dev) == key:
            outcome.duplicates += 1
            return
        self.last_info[dev] = key
        self.rows["info"].append(
            (
                dev,
                record.rx,
                float(t),
                boot,
                v,
                columns["fw"],
                columns["mpy"],
                columns["cfg"],
                columns["reset"],
                columns["mac"],
                record.retain,
                record.payload,
            )
        )
        outcome.stored += 1

    def _health(self, record: Record, dev: bytes, outcome: Outcome) -> None:
        health = parse_json(record.payload)
        if not isinstance(health, dict):
            raise Rejected("health must be a JSON object")
        boot, t = health.get("boot"), health.get("t")
        if not _is_int(boot) or not 0 <= boot <= INT64_MAX:
            raise Rejected("health.boot must be an integer >= 0")
        if not _unix_time(t):
            raise Rejected("health.t must be a Unix time")
        numbers = []
        for name in layout.HEALTH_NUMBERS:
            value = health.get(name)
            if value is None:
                numbers.append(NAN)
            elif _is_number(value):
                numbers.append(float(value))
            else:
                raise Rejected(f"health.{name} must be a number or null")
        paused = health.get("paused")
        if paused is not None and type(paused) is not bool:
            raise Rejected("health.paused must be true, false or null")
        key = (boot, float(t))
        if self.last_health.get(dev) == key:
            outcome.duplicates += 1
            return
        self.last_health[dev] = key
        self.rows["health"].append(
            (dev, record.rx, float(t), boot, *numbers, -1 if paused is None else int(paused), record.retain)
        )
        outcome.stored += 1

    # --- the 2017 firmware -----------------------------------------------------------------

    def _legacy_log(self, record: Record, outcome: Outcome) -> None:
        init = parse_legacy_init(record.payload)
        if init is None:
            self.rows["legacy_log"].append(
                (
                    record.rx,
                    _clip(record.topic, layout.TOPIC_WIDTH),
                    _clip(record.payload.strip(), layout.TEXT_WIDTH),
                    record.payload_len,
                )
            )
            outcome.stored += 1
            return
        if self.legacy.get(init.data_topic) != init.base:
            self.legacy[init.data_topic] = init.base
            self.legacy_changed = True
        self.rows["legacy_init"].append(
            (init.data_topic.encode(), record.rx, init.base, _clip(record.payload, layout.JSON_WIDTH))
        )
        outcome.stored += 1

    def _legacy_data(self, record: Record, topic: str, outcome: Outcome) -> None:
        base = self.legacy[topic]
        samples = parse_json(record.payload)
        if not isinstance(samples, list) or not samples:
            raise Rejected("legacy data must be a non-empty JSON array")
        dev = topic.encode()
        boot = int(base)
        rows = self.rows["samples"]
        for i, sample in enumerate(samples):
            problem = _legacy_sample_problem(sample)
            if problem is not None:
                self._reject(record, f"legacy sample {i}: {problem}", outcome)
                continue
            seq = sample["id"]
            if not self.index.add(dev, boot, seq, record.rx):
                outcome.duplicates += 1
                continue
            values = [NAN if sample[k] is None else float(sample[k]) for k in ("kT", "aT", "aH")]
            rows.append((dev, boot, seq, base + seq, record.rx, *values, 0))
            outcome.stored += 1


def _plain_sample(sample: Any) -> bool:
    """The common case, checked in one go: a sample with every field valid and every value
    present. Anything else goes through _sample_problem, which says what is wrong."""
    if type(sample) is not list or len(sample) != SAMPLE_LENGTH:
        return False
    boot, seq, t, kt, at, ah, flags = sample
    return (
        type(boot) is int
        and type(seq) is int
        and type(kt) is int
        and type(at) is int
        and type(ah) is int
        and type(flags) is int
        and (type(t) is int or type(t) is float)
        and 0 <= boot <= INT64_MAX
        and 0 <= seq <= INT64_MAX
        and 0 <= t < T_MAX
        and -HUNDREDTHS_LIMIT <= kt < HUNDREDTHS_LIMIT
        and -HUNDREDTHS_LIMIT <= at < HUNDREDTHS_LIMIT
        and -HUNDREDTHS_LIMIT <= ah < HUNDREDTHS_LIMIT
        and 0 <= flags < FLAGS_LIMIT
    )


def _sample_problem(sample: object) -> str | None:
    if type(sample) is not list or len(sample) != len(protocol.SAMPLE_FIELDS):
        return f"not an array of the {len(protocol.SAMPLE_FIELDS)} fields {','.join(protocol.SAMPLE_FIELDS)}"
    boot, seq, t = sample[protocol.I_BOOT], sample[protocol.I_SEQ], sample[protocol.I_TIME]
    if not _is_int(boot) or not 0 <= boot <= INT64_MAX:
        return "boot must be an integer >= 0"
    if not _is_int(seq) or not 0 <= seq <= INT64_MAX:
        return "seq must be an integer >= 0"
    if not _unix_time(t):
        return "t must be a Unix time"
    for index, name in ((protocol.I_KT, "kT"), (protocol.I_AT, "aT"), (protocol.I_AH, "aH")):
        value = sample[index]
        if value is not None and (not _is_int(value) or not -HUNDREDTHS_LIMIT <= value < HUNDREDTHS_LIMIT):
            return f"{name} must be an integer (hundredths) or null"
    flags = sample[protocol.I_FLAGS]
    if not _is_int(flags) or not 0 <= flags < FLAGS_LIMIT:
        return "flags must be an integer bitmask"
    return None


def _legacy_sample_problem(sample: object) -> str | None:
    if not isinstance(sample, dict) or set(sample) != LEGACY_SAMPLE_KEYS:
        return "not an object with exactly id, kT, aT, aH"
    seq = sample["id"]
    if not _is_int(seq) or not 0 <= seq < 2**32:
        return "id must be an integer >= 0"
    for name in ("kT", "aT", "aH"):
        value = sample[name]
        if value is not None and (not _is_number(value) or abs(value) >= FLOAT32_MAX):
            return f"{name} must be a number (float32 range) or null"
    return None
