"""The recorder service end to end: real mosquitto on 127.0.0.1, the recorder as real processes
(`python -m recorder record`), boards as real MQTT clients, real HDF5 files read back."""

from __future__ import annotations

import calendar
import json
import random
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from firmware import protocol
from recorder.config import Settings
from recorder.decode import Ingest
from recorder.journal import Record
from recorder.read import read_all
from tests.test_recorder_helpers import (
    Board,
    LegacyBoard,
    RecorderProcess,
    all_files_open,
    raw_sample_ids,
    samples,
    wait_for,
)
from vboard.broker import Mosquitto, free_port


@pytest.fixture
def recorder(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[RecorderProcess]:
    proc = RecorderProcess(tmp_path, mosquitto.port)
    yield proc
    proc.close()


def test_discovers_50_boards_and_2_legacy_boards(recorder: RecorderProcess, mosquitto: Mosquitto) -> None:
    recorder.start()
    boards = [Board(mosquitto.port, f"lab-{i:02d}", boot=i % 3) for i in range(50)]
    legacy = [LegacyBoard(mosquitto.port, mac) for mac in ("a6a8d500", "0badf00d")]
    legacy[0].init("2017-12-11 08:24:07 GMT", garbage=b"\x00\xff}}trailing")
    legacy[1].init("2017-12-11 23:59:58 GMT")
    wait_for(lambda: recorder.log().count("legacy board announced") == 2, 10, "legacy subscriptions")
    wait_for(lambda: recorder.log().count("subscribed (") >= 3, 10, "the broker to confirm them")
    for board in boards:
        board.announce()
    for batch in range(10):  # interleaved: every board has messages in flight at once
        for board in boards:
            board.data(range(batch * 6, batch * 6 + 6))
    for board in boards:
        board.health(59)
    for n, old in enumerate(legacy):
        old.marker("<Data_begin>")
        for seq in range(20):
            old.data(seq, 20.0 + n, None if seq == 7 else 18.591203, 28.007935)
    expected = 50 * 60 + 2 * 20
    wait_for(lambda: len(samples(recorder.data_dir)) == expected, 60, f"{expected} samples")
    for board in boards:
        assert board.all_published()
    recorder.stop()
    for board in boards:
        board.close()
    for old in legacy:
        old.close()

    frame = samples(recorder.data_dir)
    assert len(raw_sample_ids(recorder.data_dir)) == expected  # exactly once, not just after read dedupe
    for i in range(50):
        rows = frame[frame["device"] == f"lab-{i:02d}"]
        assert rows["seq"].tolist() == list(range(60)) and set(rows["boot"]) == {i % 3}
    assert np.allclose(frame[frame["device"].str.startswith("lab-")]["kT"], 25.0)
    # Legacy: UTC time = init time + id, nothing shifted by a timezone, a null kept as NaN.
    old = frame[frame["device"] == "data-esp-a6a8d500"]
    base = calendar.timegm((2017, 12, 11, 8, 24, 7, 0, 0, 0))
    assert old["t"].tolist() == [float(base + seq) for seq in range(20)]
    assert old["aT"].isna().tolist() == [seq == 7 for seq in range(20)]
    late = frame[frame["device"] == "data-esp-0badf00d"]
    assert late["time"].iloc[5].isoformat() == "2017-12-12T00:00:03+00:00"  # across UTC midnight
    files = all_files_open(recorder.data_dir)
    assert files == 1
    data = recorder.data_dir
    status, info, health = read_all(data, "status"), read_all(data, "info"), read_all(data, "health")
    assert sorted(status["device"]) == [f"lab-{i:02d}" for i in range(50)] and status["online"].all()
    assert len(info) == 50 and set(info["fw"]) == {"test"}
    assert len(health) == 50 and (health["rssi"] == -60).all()
    assert len(read_all(data, "legacy_init")) == 2
    assert read_all(data, "legacy_log")["text"].tolist() == ["<Data_begin>"] * 2
    assert len(read_all(data, "rejects")) == 0


class Stream:
    """Boards publishing a steady stream in a background thread; what they sent is known."""

    def __init__(self, port: int, devices: int, rate_hz: float, batch: int = 1) -> None:
        self.boards = [Board(port, f"stream-{i}", boot=7) for i in range(devices)]
        self.period = 1.0 / rate_hz
        self.batch = batch
        self.next_seq = [0] * devices
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            for i, board in enumerate(self.boards):
                board.data(range(self.next_seq[i], self.next_seq[i] + self.batch))
                self.next_seq[i] += self.batch
            time.sleep(self.period)

    def start(self) -> Stream:
        self.thread.start()
        return self

    def finish(self, timeout: float = 60) -> set[tuple[str, int, int]]:
        """Stop, wait for the broker's PUBACK of everything; the sample ids sent."""
        self.stop_event.set()
        self.thread.join()
        wait_for(
            lambda: all(b.all_published() for b in self.boards), timeout, "the broker to take everything"
        )
        sent = {(b.device, 7, s) for b, n in zip(self.boards, self.next_seq, strict=True) for s in range(n)}
        for board in self.boards:
            board.close()
        return sent


def assert_exactly(data_dir: Path, sent: set[tuple[str, int, int]]) -> None:
    stored = raw_sample_ids(data_dir)
    missing = sent - set(stored)
    assert not missing, f"{len(missing)} samples lost, e.g. {sorted(missing)[:5]}"
    assert len(stored) == len(set(stored)), f"{len(stored) - len(set(stored))} duplicates"
    assert set(stored) == sent


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    recorder: RecorderProcess, mosquitto: Mosquitto
) -> None:
    rng = random.Random(20250220)
    # Short journal segments: kills also land while segments roll over and old ones are deleted.
    config = recorder.workdir / "recorder.toml"
    config.write_text("[commit]\nsegment_s = 0.5\n")
    recorder.args += ["--config", str(config)]
    recorder.start()
    stream = Stream(mosquitto.port, devices=4, rate_hz=25, batch=2).start()
    kills = {"all": 0, "service": 0, "writer": 0}
    for _ in range(22):
        time.sleep(rng.uniform(0.05, 1.2))
        which = rng.choice(["all", "all", "all", "service", "writer"])
        recorder.kill9(which)
        kills[which] += 1
        if which != "writer":
            # Restart at once, or after the writer children have gone, or while they still run.
            recorder.start(wait_subscribed=rng.random() < 0.5)
    sent = stream.finish()
    wait_for(lambda: len(samples(recorder.data_dir)) >= len(sent), 60, f"{len(sent)} samples after the kills")
    recorder.stop()
    assert all_files_open(recorder.data_dir) >= 1
    assert_exactly(recorder.data_dir, sent)
    assert sum(kills.values()) >= 20 and len(sent) > 1000, (kills, len(sent))


def test_broker_killed_and_restarted_mid_stream_loses_nothing(
    recorder: RecorderProcess, mosquitto: Mosquitto
) -> None:
    recorder.start()
    stream = Stream(mosquitto.port, devices=3, rate_hz=20).start()
    time.sleep(1.0)
    mosquitto.restart(hard=True)  # SIGKILL; persistence saved on every change (vboard.broker)
    time.sleep(1.0)
    mosquitto.kill()
    time.sleep(1.5)  # boards and recorder retry against a dead port
    mosquitto.start()
    time.sleep(1.0)
    sent = stream.finish()
    wait_for(lambda: len(samples(recorder.data_dir)) >= len(sent), 60, f"{len(sent)} samples")
    recorder.stop()
    assert_exactly(recorder.data_dir, sent)
    assert recorder.log().count("connection to the broker lost") >= 2


def _file_size_limit(recorder: RecorderProcess, limit: int) -> None:
    """A real write failure without a real full disk: RLIMIT_FSIZE (inherited by the writer) makes
    writes beyond `limit` bytes fail with EFBIG, as a full disk fails them with ENOSPC."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    recorder.preexec = limit_file_size


def _disk_recovers(recorder: RecorderProcess) -> None:
    for pid in (recorder.pid, *recorder.writer_pids()):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _publish_big(
    mosquitto: Mosquitto, samples: int, pause_s: float
) -> tuple[Board, set[tuple[str, int, int]]]:
    """`samples` samples in messages of 50."""
    board = Board(mosquitto.port, "big-01", boot=7)
    sent = set()
    for start in range(0, samples, 50):
        board.data(range(start, start + 50))
        sent |= {("big-01", 7, s) for s in range(start, start + 50)}
        time.sleep(pause_s)
    wait_for(board.all_published, 30, "the broker to take everything")
    return board, sent


def test_journal_write_failure_stops_acknowledging_and_resumes(
    recorder: RecorderProcess, mosquitto: Mosquitto
) -> None:
    _file_size_limit(recorder, 200_000)  # the first journal batch (120 messages, 270 kB) fails
    recorder.start()
    board, sent = _publish_big(mosquitto, 6000, pause_s=0)
    wait_for(lambda: "journal write failed" in recorder.log(), 30, "the recorder to stop acknowledging")
    time.sleep(1.5)  # retries fail too
    assert recorder.proc is not None and recorder.proc.poll() is None, "the service must not crash"
    assert len(samples(recorder.data_dir)) == 0
    _disk_recovers(recorder)
    wait_for(lambda: len(samples(recorder.data_dir)) >= len(sent), 90, "the backlog after the disk recovered")
    recorder.stop()
    board.close()
    assert_exactly(recorder.data_dir, sent)
    assert "acknowledging again" in recorder.log()


def test_hdf5_write_failure_stops_acknowledging_and_resumes(
    recorder: RecorderProcess, mosquitto: Mosquitto
) -> None:
    # Journal segments of 0.3 s stay far below the limit; the day's HDF5 file outgrows it. The
    # writer stops before HDF5 meets the limit (PyTables would not report the failed writes).
    config = recorder.workdir / "recorder.toml"
    config.write_text("[commit]\nsegment_s = 0.3\nmax_writer_lag_s = 2\n")
    recorder.args += ["--config", str(config)]
    _file_size_limit(recorder, 6_000_000)
    recorder.start()
    board, sent = _publish_big(mosquitto, 50_000, pause_s=0.005)
    wait_for(lambda: "would outgrow the file size limit" in recorder.log(), 30, "the writer to stop")
    wait_for(lambda: "HDF5 writer exited" in recorder.log(), 30, "the service to notice")
    wait_for(lambda: "writer is" in recorder.log(), 30, "the service to stop acknowledging")
    time.sleep(1)
    assert recorder.proc is not None and recorder.proc.poll() is None, "the service must not crash"
    stuck = len(samples(recorder.data_dir))
    assert 0 < stuck < len(sent)  # the file was written up to the limit, and still opens
    _disk_recovers(recorder)
    wait_for(lambda: len(samples(recorder.data_dir)) >= len(sent), 90, "the backlog after the disk recovered")
    recorder.stop()
    board.close()
    assert all_files_open(recorder.data_dir) == 1
    assert_exactly(recorder.data_dir, sent)
    assert "acknowledging again" in recorder.log()


def test_starts_before_the_broker_and_connects_when_it_comes(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # a port chosen, nothing listening yet
    recorder = RecorderProcess(tmp_path, broker.port)
    try:
        recorder.start(wait_subscribed=False)
        wait_for(lambda: "cannot connect" in recorder.log(), 20, "a failed first connection")
        with broker:
            wait_for(lambda: "subscribed (" in recorder.log(), 30, "the recorder to connect")
            board = Board(broker.port, "late-01")
            board.data(range(5))
            wait_for(lambda: len(samples(recorder.data_dir)) == 5, 20, "the samples")
            board.close()
            recorder.stop()
    finally:
        recorder.close()


def test_mqtt_311_session_works_too(recorder: RecorderProcess, mosquitto: Mosquitto) -> None:
    recorder.args += ["--protocol", "3.1.1"]
    recorder.start()
    stream = Stream(mosquitto.port, devices=2, rate_hz=50, batch=3).start()
    time.sleep(1.0)
    recorder.kill9("all")
    time.sleep(0.5)  # messages queue in the broker for the offline persistent session
    recorder.start()
    time.sleep(1.0)
    sent = stream.finish()
    wait_for(lambda: len(samples(recorder.data_dir)) >= len(sent), 60, f"{len(sent)} samples")
    recorder.stop()
    assert_exactly(recorder.data_dir, sent)


def test_legacy_board_known_from_before_a_restart(recorder: RecorderProcess, mosquitto: Mosquitto) -> None:
    recorder.start()
    board = LegacyBoard(mosquitto.port, "12345678")
    board.init("2017-12-11 08:24:07 GMT")
    wait_for(lambda: "announced data topic" in recorder.log(), 10, "the legacy subscription")
    wait_for(lambda: len(read_all(recorder.data_dir, "legacy_init")) == 1, 10, "the init in the file")
    recorder.stop()
    # A new client id: no broker session remembers the subscription, the recorder must.
    recorder.args += ["--client-id", "another-recorder"]
    recorder.start()
    board.data(3, 21.5, 18.0, None)
    wait_for(lambda: len(samples(recorder.data_dir)) == 1, 20, "the legacy sample")
    recorder.stop()
    board.close()
    (row,) = samples(recorder.data_dir).itertuples()
    assert row.time.isoformat() == "2017-12-11T08:24:10+00:00" and row.kT == 21.5


def test_shared_subscription_shards_record_everything_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    data_dir = tmp_path / "data"
    shards = [
        RecorderProcess(
            tmp_path, mosquitto.port, "--share-group", "fleet", "--shard", name, "--client-id", name
        )
        for name in ("rec-a", "rec-b")
    ]
    for shard in shards:
        shard.data_dir = data_dir
        shard.args[shard.args.index("--data-dir") + 1] = str(data_dir)
    try:
        for shard in shards:
            shard.start()
        boards = [Board(mosquitto.port, f"s-{i:02d}", boot=7) for i in range(20)]
        for start in range(0, 30, 3):
            for board in boards:
                board.data(range(start, start + 3))
        sent = {(b.device, 7, s) for b in boards for s in range(30)}
        wait_for(lambda: len(samples(data_dir)) == len(sent), 60, "both shards' samples")
        for shard in shards:
            shard.stop()
        for board in boards:
            board.close()
    finally:
        for shard in shards:
            shard.close()
    names = sorted(p.name.rsplit("-", 1)[0] for p in data_dir.glob("*.h5"))
    assert names == ["labfleet-rec-a", "labfleet-rec-b"]
    assert_exactly(data_dir, sent)  # read together: every sample once across the shards


def _tls_files(directory: Path) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    f = {name: str(directory / name) for name in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt", "san")}
    Path(f["san"]).write_text("subjectAltName=IP:127.0.0.1\n")
    new_key = ["-newkey", "rsa:2048", "-nodes"]
    for command in (
        ["req", "-x509", *new_key, "-keyout", f["ca.key"], "-out", f["ca.crt"], "-subj", "/CN=ca"],
        ["req", *new_key, "-keyout", f["srv.key"], "-out", f["srv.csr"], "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", f["srv.csr"], "-CA", f["ca.crt"], "-CAkey", f["ca.key"], "-CAcreateserial"],
    ):
        if command[0] == "x509":
            command += ["-out", f["srv.crt"], "-extfile", f["san"]]
        command += ["-days", "2"]
        subprocess.run(["openssl", *command], check=True, capture_output=True, timeout=60)
    return f


NO_TLS_TOOLS = shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None


@pytest.mark.skipif(NO_TLS_TOOLS, reason="openssl and mosquitto_passwd are needed")
def test_tls_and_credentials(tmp_path: Path) -> None:
    tls = _tls_files(tmp_path / "tls")
    passwords = tmp_path / "passwords"
    for user, password in (("recorder", "s3cret"), ("lab-01", "board")):
        flags = ["-b"] if passwords.exists() else ["-c", "-b"]
        subprocess.run(["mosquitto_passwd", *flags, str(passwords), user, password], check=True, timeout=30)
    tls_port = free_port()
    broker = Mosquitto(
        tmp_path / "broker",
        allow_anonymous=False,
        extra_config=[
            f"password_file {passwords}",
            f"listener {tls_port} 127.0.0.1",
            f"cafile {tls['ca.crt']}",
            f"certfile {tls['srv.crt']}",
            f"keyfile {tls['srv.key']}",
        ],
    )
    with broker:
        wrong = RecorderProcess(tmp_path / "wrong", tls_port, "--tls", "--ca-file", tls["ca.crt"])
        (tmp_path / "wrong").mkdir()
        wrong.args += ["--username", "recorder", "--password", "guess"]
        wrong.start(wait_subscribed=False)
        wait_for(lambda: "refused" in wrong.log(), 20, "the broker to refuse a wrong password")
        wrong.close()
        recorder = RecorderProcess(tmp_path, tls_port, "--tls", "--ca-file", tls["ca.crt"])
        recorder.args += ["--username", "recorder", "--password", "s3cret"]
        try:
            recorder.start()
            board = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lab-01")
            board.username_pw_set("lab-01", "board")
            board.connect("127.0.0.1", broker.port)
            board.loop_start()
            board.publish("labfleet/lab-01/data", json.dumps([[1, 0, 1_740_000_000, 1, 2, 3, 0]]), qos=1)
            wait_for(lambda: len(samples(recorder.data_dir)) == 1, 20, "the sample over TLS")
            board.loop_stop()
            board.disconnect()
        finally:
            recorder.close()


# --- fuzz over the real broker -------------------------------------------------------------------

hostile_names = st.one_of(
    st.sampled_from(["..", ".", "a.b", "x" * 33, "x" * 10_000, "Ünï", "UP", "-x", "ok-1", "ok-2", " "]),
    st.text(
        # What the broker itself refuses in a topic (it drops the publisher) never reaches a recorder.
        st.characters(blacklist_categories=["Cs", "Cc", "Cn"], blacklist_characters="/+#"),
        min_size=1,
        max_size=12,
    ),
)
broker_payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b"online", b"offline", b"", b"null", b"[]", b"{}", b"[[1,2]]", b"[[1,0,1e999,1,1,1,0]]"]
    ),
    st.lists(
        st.lists(st.one_of(st.integers(-3, 2**40), st.none(), st.floats(), st.text(max_size=2)), max_size=8),
        max_size=3,
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(17_000, 100_000).map(lambda n: b"[" + b"1," * (n // 2) + b"1]"),  # oversized
)


def test_fuzzed_messages_over_the_broker_all_end_up_accounted(
    recorder: RecorderProcess, mosquitto: Mosquitto
) -> None:
    cases: list[tuple[str, bytes]] = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(name=hostile_names, kind=st.sampled_from(protocol.KINDS), payload=broker_payloads)
    def collect(name: str, kind: str, payload: bytes) -> None:
        cases.append((f"{protocol.DEFAULT_PREFIX}/{name}/{kind}", payload))

    collect()
    recorder.start()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzzer")
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    sent = [client.publish(topic, payload, qos=1) for topic, payload in cases]
    wait_for(lambda: all(m.is_published() for m in sent), 30, "the broker to take the fuzz")
    # What the handler makes of the same messages in the same order, in-process.
    expected = Ingest(max_payload=Settings.max_payload)
    for topic, payload in cases:
        expected.handle(Record(0.0, topic.encode(), payload[: Settings.max_payload], len(payload)))
    want = {name: len(rows) for name, rows in expected.rows.items()}
    wait_for(lambda: len(read_all(recorder.data_dir, "rejects")) == want["rejects"], 30, "every reject")
    recorder.stop()
    client.loop_stop()
    client.disconnect()
    got = {name: len(read_all(recorder.data_dir, name)) for name in want}
    assert got == want
    assert want["rejects"] > 100 and recorder.proc is None
    assert "internal error" not in recorder.log()
