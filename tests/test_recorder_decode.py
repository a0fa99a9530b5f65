"""The message handler in-process: every message becomes rows, a dropped duplicate or a reject."""

from __future__ import annotations

import calendar
import json
import math
import time
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware import protocol
from recorder import layout
from recorder.decode import Ingest, Rejected, parse_legacy_init
from recorder.dedupe import MAX_RUNS, SampleIndex, SeqSet
from recorder.journal import Record

PREFIX = protocol.DEFAULT_PREFIX
RX = 1_740_000_000.0


def msg(topic: str | bytes, payload: bytes | str, retain: bool = False, dup: bool = False) -> Record:
    t = topic.encode() if isinstance(topic, str) else topic
    p = payload.encode() if isinstance(payload, str) else payload
    return Record(RX, t, p, len(p), retain, dup, 1)


def data(device: str, *samples: list[Any]) -> Record:
    return msg(protocol.topic(PREFIX, device, protocol.DATA), json.dumps(list(samples)))


def reasons(ingest: Ingest) -> list[str]:
    return [row[5].decode() for row in ingest.rows["rejects"]]


def test_samples_are_stored_with_units_and_nan_for_null() -> None:
    ingest = Ingest()
    out = ingest.handle(data("lab-01", [3, 0, 1_740_000_000, 2512, None, 4050, protocol.FLAG_AMB_FAULT]))
    assert (out.stored, out.duplicates, out.rejected) == (1, 0, 0)
    (row,) = ingest.rows["samples"]
    array = np.array([row], dtype=layout.SAMPLES)
    assert array["device"][0] == b"lab-01"
    assert (array["boot"][0], array["seq"][0], array["t"][0], array["rx"][0]) == (3, 0, 1_740_000_000.0, RX)
    assert array["kT"][0] == np.float32(25.12)
    assert math.isnan(array["aT"][0])
    assert array["aH"][0] == np.float32(40.5)
    assert array["flags"][0] == protocol.FLAG_AMB_FAULT


def test_duplicates_by_device_boot_seq_are_dropped() -> None:
    ingest = Ingest()
    sample = [1, 5, 1_740_000_005, 100, 100, 100, 0]
    assert ingest.handle(data("a", sample)).stored == 1
    again = ingest.handle(data("a", sample, [1, 6, 1_740_000_006, 1, 1, 1, 0]))
    assert (again.stored, again.duplicates) == (1, 1)
    # The same seq in another boot or on another device is another sample.
    assert ingest.handle(data("a", [2, 5, 1_740_000_105, 1, 1, 1, 0])).stored == 1
    assert ingest.handle(data("b", sample)).stored == 1
    assert len(ingest.rows["samples"]) == 4


def test_one_bad_sample_is_rejected_and_its_neighbours_kept() -> None:
    ingest = Ingest()
    out = ingest.handle(
        data("a", [1, 0, 1_740_000_000, 1, 1, 1, 0], [1, "x", 0, 1, 1, 1, 0], [1, 2, 1e9, 1, 1, 1, 0])
    )
    assert (out.stored, out.rejected) == (2, 1)
    assert reasons(ingest) == ["sample 1: seq must be an integer >= 0"]


def test_bad_input_is_rejected_with_a_reason() -> None:
    d = protocol.topic(PREFIX, "lab-01", protocol.DATA)
    cases = {
        "invalid JSON": msg(d, "[[1,0,"),
        "NaN": msg(d, "[[1, 0, 1740000000, NaN, 1, 1, 0]]"),
        "Infinity": msg(d, "[[1, 0, 1740000000, 1, Infinity, 1, 0]]"),
        "t must be a Unix time": msg(d, "[[1, 0, 1e999, 1, 1, 1, 0]]"),
        "kT must be an integer": msg(d, "[[1, 0, 1740000000, 25.5, 1, 1, 0]]"),
        "boot must be": msg(d, "[[true, 0, 1740000000, 1, 1, 1, 0]]"),
        "not an array of the 7 fields": msg(d, "[[1, 0, 1740000000, 1, 1, 1]]"),
        "flags must be": msg(d, "[[1, 0, 1740000000, 1, 1, 1, -1]]"),
        "non-empty JSON array": msg(d, "[]"),
        "not UTF-8": msg(d, b"\xff\xfe[]"),
        "status must be": msg(protocol.topic(PREFIX, "lab-01", protocol.STATUS), "maybe"),
        "info must be a JSON object": msg(protocol.topic(PREFIX, "lab-01", protocol.INFO), "[1]"),
        "info.device does not match": msg(
            protocol.topic(PREFIX, "lab-01", protocol.INFO), json.dumps({"v": 1, "device": "lab-02"})
        ),
        "health.rssi must be": msg(
            protocol.topic(PREFIX, "lab-01", protocol.HEALTH),
            json.dumps({"boot": 1, "t": 1e9, "rssi": "weak"}),
        ),
        "not a topic of the protocol": msg(f"{PREFIX}/../data", "[]"),
        "unknown topic": msg("elsewhere/x", "1"),
        "topic is not UTF-8": msg(b"labfleet/\xc3\x28/data", "[]"),
    }
    for expected, record in cases.items():
        ingest = Ingest()
        out = ingest.handle(record)
        assert (out.stored, out.rejected) == (0, 1), expected
        assert expected in reasons(ingest)[0], (expected, reasons(ingest))


def test_hostile_device_names_stay_values_in_rejects() -> None:
    ingest = Ingest()
    for name in ("a/b", "..", ".", "Ünïcode", "x" * 10_000, "lab.01", "-lead", "UPPER", ""):
        out = ingest.handle(msg(f"{PREFIX}/{name}/data", "[[1,0,1740000000,1,1,1,0]]"))
        assert out.rejected == 1 and out.stored == 0
    rejects = np.array(ingest.rows["rejects"], dtype=layout.REJECTS)
    assert len(rejects) == 9
    assert rejects["topic_len"].max() == len(f"{PREFIX}/{'x' * 10_000}/data")
    assert not ingest.rows["samples"]


def test_oversized_payloads_are_rejected_with_their_length() -> None:
    ingest = Ingest(max_payload=100)
    big = b"[" + b"1," * 200 + b"1]"
    out = ingest.handle(Record(RX, b"labfleet/a/data", big[:100], len(big), False, False, 1))
    assert out.rejected == 1
    row = ingest.rows["rejects"][0]
    assert row[4] == len(big) and "too large" in row[5].decode()


def test_status_info_health_and_their_retained_repeats() -> None:
    ingest = Ingest()
    status = protocol.topic(PREFIX, "a", protocol.STATUS)
    assert ingest.handle(msg(status, protocol.ONLINE, retain=True)).stored == 1
    assert ingest.handle(msg(status, protocol.ONLINE, retain=True)).duplicates == 1  # re-subscribe
    assert ingest.handle(msg(status, protocol.OFFLINE)).stored == 1
    assert ingest.handle(msg(status, protocol.ONLINE)).stored == 1
    info = {"v": 1, "device": "a", "fw": "1.0", "mpy": None, "cfg": "ab" * 8, "boot": 4, "reset": "power"}
    info |= {"mac": "aa:bb:cc:dd:ee:ff", "sensors": {}, "time": {}, "t": 1_740_000_000, "buffer": {}}
    info_topic = protocol.topic(PREFIX, "a", protocol.INFO)
    assert ingest.handle(msg(info_topic, json.dumps(info), retain=True)).stored == 1
    assert ingest.handle(msg(info_topic, json.dumps(info), retain=True)).duplicates == 1
    health: dict[str, object] = {"boot": 4, "t": 1_740_000_060, "up": 60, "rssi": -61, "heap": 2000}
    health |= {"dropped": 0, "reconnects": 1, "seq": 59, "drift_ms": None, "paused": False}
    health_topic = protocol.topic(PREFIX, "a", protocol.HEALTH)
    assert ingest.handle(msg(health_topic, json.dumps(health), retain=True)).stored == 1
    assert ingest.handle(msg(health_topic, json.dumps(health), retain=True)).duplicates == 1
    (info_row,) = np.array(ingest.rows["info"], dtype=layout.INFO)
    assert info_row["fw"] == b"1.0" and info_row["boot"] == 4 and json.loads(info_row["json"]) == info
    (health_row,) = np.array(ingest.rows["health"], dtype=layout.HEALTH)
    assert health_row["rssi"] == -61 and math.isnan(health_row["drift_ms"]) and health_row["paused"] == 0
    assert [row[2] for row in ingest.rows["status"]] == [True, False, True]


LEGACY_INIT = (
    b'{"ESP_init":{"DATA_topic":"data-esp-a6a8d500","DS3231 SetTime":"OK","NTP & RTC SyncTime":"OK",'
    b'"Time":"2017-12-11 08:24:07 GMT","Day_W":0,"Day_Y":345,"DS3231 SQW":"1Hz Out Start0",'
    b'"ambient Temperature":"22.206819 \xc2\xbaC","ambient Humidity":"23.649957 %","Sensor SHT30":"OK",'
    b'"K Thermocouple":"24.250000 \xc2\xbaC","Sensor MAX6675":"OK"}}'
)


def test_legacy_init_time_is_utc_and_data_follows_it() -> None:
    ingest = Ingest()
    assert ingest.handle(msg("esp001log", LEGACY_INIT + b"\x00\xff not even UTF-8")).stored == 1
    base = calendar.timegm((2017, 12, 11, 8, 24, 7, 0, 0, 0))
    assert ingest.legacy == {"data-esp-a6a8d500": float(base)} and ingest.legacy_changed
    out = ingest.handle(msg("data-esp-a6a8d500", '[{"id":10017,"kT":20.000000,"aT":18.591203,"aH":null}]'))
    assert out.stored == 1
    (row,) = np.array(ingest.rows["samples"], dtype=layout.SAMPLES)
    assert row["t"] == base + 10017  # 2017-12-11 11:11:04 UTC: no local-time shift
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["t"])) == "2017-12-11 11:11:04"
    assert row["device"] == b"data-esp-a6a8d500" and row["boot"] == base and row["seq"] == 10017
    assert row["kT"] == np.float32(20.0) and math.isnan(row["aH"])
    assert ingest.handle(msg("esp001log", "<Data_begin>")).stored == 1
    assert ingest.rows["legacy_log"][0][2] == b"<Data_begin>"


def test_legacy_malformed_and_unannounced() -> None:
    ingest = Ingest()
    assert ingest.handle(msg("data-esp-00000000", '[{"id":1,"kT":1,"aT":1,"aH":1}]')).rejected == 1
    for broken in (
        b'{"ESP_init":{"DATA_topic":',
        b'{"ESP_init":{"DATA_topic":"x/y","Time":"2017-12-11 08:24:07 GMT"}}',
    ):
        ingest.handle(msg("esp001log", broken))
    assert (
        ingest.handle(msg("esp001log", b'{"ESP_init":{"DATA_topic":"d-1","Time":"yesterday"}}')).rejected == 1
    )
    assert ingest.legacy == {}
    assert len(ingest.rows["rejects"]) == 4
    with_init = Ingest(legacy={"d-1": 1e9})
    out = with_init.handle(msg("d-1", '[{"id":1,"kT":1,"aT":1,"aH":1,"x":2},{"id":-1,"kT":1,"aT":1,"aH":1}]'))
    assert (out.stored, out.rejected) == (0, 2)


def test_parse_legacy_init_tells_markers_from_inits() -> None:
    assert parse_legacy_init(b"<Data_begin>") is None
    assert parse_legacy_init(b'{"other": 1}') is None
    init = parse_legacy_init(LEGACY_INIT + b"}}trailing")
    assert init is not None and init.data_topic == "data-esp-a6a8d500"
    try:
        parse_legacy_init(b"{not json")
    except Rejected as why:
        assert "malformed" in str(why)
    else:
        raise AssertionError("a broken init must be rejected")


def test_seqset_runs_merge_and_stay_bounded() -> None:
    seen = SeqSet()
    assert all(seen.add(s) for s in range(100))
    assert seen.runs == 1 and not seen.add(50)
    for s in (300, 200, 250, 201, 199):
        assert seen.add(s)
    assert seen.runs == 4 and 199 in seen and 198 not in seen
    seen.add_sorted_unique(np.arange(100, 400, dtype=np.int64))
    assert seen.runs == 1 and len(seen) == 400
    hostile = SeqSet()
    for s in range(0, 4 * MAX_RUNS, 2):
        hostile.add(s)
    assert hostile.runs == MAX_RUNS


def test_index_rebuild_from_columns_matches_adds() -> None:
    rng = np.random.default_rng(1)
    devices = rng.choice(np.array([b"a", b"b", b"c"]), 5000)
    boots = rng.integers(0, 3, 5000)
    seqs = rng.integers(0, 2000, 5000)
    index = SampleIndex()
    index.load(devices, boots, seqs, RX)
    expected = set(zip(devices.tolist(), boots.tolist(), seqs.tolist(), strict=True))
    for d in (b"a", b"b", b"c", b"z"):
        for b in range(4):
            for s in range(0, 2000, 7):
                assert index.contains(d, b, s) == ((d, b, s) in expected)
    keys = len(index)
    assert keys == len({(d, b) for d, b, _ in expected})
    assert index.forget_before(RX + 1) == keys and len(index) == 0


# --- fuzz: 10,000 messages straight into the handler -------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)
near_samples = st.lists(
    st.lists(
        st.one_of(st.integers(-5, 2**40), st.none(), st.floats(), st.text(max_size=3), st.booleans()),
        min_size=5,
        max_size=9,
    ),
    max_size=5,
)
device_names = st.one_of(
    st.sampled_from(
        ["lab-01", "b2", "x" * 32, "x" * 33, "..", "a/b", "Ü", "", "+", "#", "data-esp-a6a8d500"]
    ),
    st.text(max_size=40),
)
topics = st.one_of(
    st.builds(
        lambda d, k: f"{PREFIX}/{d}/{k}", device_names, st.sampled_from([*protocol.KINDS, "x", "", "data/x"])
    ),
    st.sampled_from(["esp001log", "data-esp-a6a8d500", "other", "", "$SYS/x"]),
    st.text(max_size=60),
).map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=40)


def _payloads() -> st.SearchStrategy[bytes]:
    as_json = st.one_of(json_values, near_samples).map(lambda v: json.dumps(v).encode())
    specials = st.sampled_from(
        [
            b"online",
            b"offline",
            b"NaN",
            b"[[1,0,1e999,1,1,1,0]]",
            b"[[1,0,1740000000,NaN,1,1,0]]",
            LEGACY_INIT,
        ]
    )
    return st.one_of(as_json, specials, st.binary(max_size=200), st.text(max_size=100).map(str.encode))


FUZZ_INGEST = Ingest(legacy={"data-esp-a6a8d500": 1.5e9}, max_payload=4096)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(topic=topics, payload=_payloads(), retain=st.booleans(), dup=st.booleans())
def test_fuzz_handler_never_crashes_and_accounts_for_every_message(
    topic: bytes, payload: bytes, retain: bool, dup: bool
) -> None:
    ingest = FUZZ_INGEST
    before = {name: len(rows) for name, rows in ingest.rows.items()}
    out = ingest.handle(Record(RX, topic, payload, len(payload), retain, dup, 1))
    added = {name: len(rows) - before[name] for name, rows in ingest.rows.items()}
    assert out.stored + out.duplicates + out.rejected >= 1
    assert added["rejects"] == out.rejected
    assert sum(added.values()) - added["rejects"] == out.stored
    for row in ingest.rows["rejects"][before["rejects"] :]:
        assert not row[5].startswith(b"internal error"), row
        assert len(row[1]) <= layout.TOPIC_WIDTH and len(row[3]) <= layout.REJECT_PAYLOAD_WIDTH
    new_samples = ingest.rows["samples"][before["samples"] :]
    if new_samples:
        array = np.array(new_samples, dtype=layout.SAMPLES)  # every stored row fits the layout
        assert np.isfinite(array["t"]).all()
        assert all(protocol.valid_device_name(d.decode()) for d in array["device"])
    if sum(len(rows) for rows in ingest.rows.values()) > 50_000:
        ingest.take_rows()
