"""The recorder service: MQTT in, journal fsync, then PUBACK; the HDF5 writer runs beside it.

One thread owns the MQTT connection (paho's `loop()` called here, not paho's own thread), so
messages, acknowledgements and reconnects happen in one order: a PUBACK only ever goes out on the
connection its message came in on, and only after the journal fsync that made the message
durable. Received messages are group-committed: one write and one fdatasync per batch, the batch
closing after `commit_delay_s` or at `batch_limit` messages, whichever comes first. The write and
fsync run on a second thread (`Committer`), one batch at a time, so the next batch is read from
the network while the previous one goes to the disk.

The HDF5 writer (recorder/writer.py) is a child process fed through a pipe with the committed
journal positions; its reports of what it made durable in HDF5 tell this side when to stop
acknowledging (writer down, disk full, HDF5 failing): the broker then holds the messages.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from recorder import journal
from recorder.config import Settings
from recorder.decode import Rejected, parse_legacy_init
from recorder.files import file_lock, read_json

log = logging.getLogger("recorder.service")

RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 8.0
WRITER_RESTART_MIN_S = 0.5
WRITER_RESTART_MAX_S = 30.0
JOURNAL_RETRY_MIN_S = 0.5
JOURNAL_RETRY_MAX_S = 10.0
# QoS 0 messages (2017 boards publish at QoS 0) are not flow-controlled by the broker: while
# acknowledgements are paused, at most this many wait in memory.
MAX_PENDING = 200_000
STATUS_LOG_PERIOD_S = 60.0
COMMIT_POLL_S = 0.002  # how often the MQTT loop looks for the end of a journal fsync
LOUD_REPEAT_S = 10.0


@dataclass
class Counters:
    received: int = 0
    committed: int = 0
    acked: int = 0
    dropped_qos0: int = 0
    commits: int = 0
    reconnects: int = 0


@dataclass
class Batch:
    """Messages on their way into the journal, with the PUBACKs they are owed."""

    records: list[bytes]
    acks: list[tuple[int, int]]  # (message id, qos)
    generation: int  # the connection they came in on
    since: float  # when the first of them arrived (monotonic)


class Committer:
    """Journal writes and fsyncs on a thread of their own: while one batch goes to the disk (the
    fsync releases the GIL) the MQTT thread reads the next. One batch at a time."""

    def __init__(self, journal_writer: journal.JournalWriter) -> None:
        self.journal = journal_writer
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.answers: queue.SimpleQueue[tuple[int, int] | OSError] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.requests.get()) is not None:
            try:
                self.answers.put(self.journal.append(data, time.time()))
            except OSError as exc:
                self.answers.put(exc)

    def submit(self, data: bytes) -> None:
        self.requests.put(data)

    def answer(self, wait: float) -> tuple[int, int] | OSError | None:
        """The journal position after the batch, or the error that stopped it; None: not yet."""
        try:
            return self.answers.get(timeout=wait) if wait > 0 else self.answers.get_nowait()
        except queue.Empty:
            return None

    def stop(self) -> None:
        self.requests.put(None)
        self.thread.join(60)


class WriterProcess:
    """The child HDF5 writer: started, fed, watched and restarted with backoff."""

    def __init__(self, settings: Settings, on_report: Callable[[dict[str, object]], None]) -> None:
        self.settings = settings
        self.on_report = on_report
        self.proc: subprocess.Popen[bytes] | None = None
        self.restart_at = 0.0
        self.backoff = WRITER_RESTART_MIN_S
        self.unsent: tuple[int, int] | None = None
        self.started_at = 0.0

    def start(self, position: tuple[int, int]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recorder", "writer", "--settings", self.settings.to_json()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.started_at = time.monotonic()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        # The writer may be slow or stuck: a full pipe must never block the MQTT thread, and only
        # the newest position matters, so a position that does not fit waits for the next try.
        os.set_blocking(self.proc.stdin.fileno(), False)
        threading.Thread(target=self._read_reports, args=(self.proc.stdout,), daemon=True).start()
        self.unsent = position

    def _read_reports(self, stream: Iterable[bytes]) -> None:
        for line in stream:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                self.on_report(report)

    def notify(self, position: tuple[int, int]) -> None:
        self.unsent = position
        self._send()

    def _send(self) -> None:
        if self.unsent is None or self.proc is None or self.proc.stdin is None:
            return
        try:
            os.write(self.proc.stdin.fileno(), b"%d %d\n" % self.unsent)
            self.unsent = None
        except BlockingIOError:
            pass
        except (BrokenPipeError, OSError):
            pass  # it died: poll() restarts it

    def poll(self, now: float, position: tuple[int, int]) -> None:
        if self.proc is None:
            if now >= self.restart_at:
                self.start(position)
            return
        code = self.proc.poll()
        if code is None:
            self._send()
            if now - self.started_at > 60:
                self.backoff = WRITER_RESTART_MIN_S
            return
        log.error(
            "HDF5 writer exited with status %s: restarting in %.1f s; acknowledgements stop when it "
            "falls %.0f s behind",
            code,
            self.backoff,
            self.settings.max_writer_lag_s,
        )
        self._close_pipes()
        self.proc = None
        self.restart_at = now + self.backoff
        self.backoff = min(self.backoff * 2, WRITER_RESTART_MAX_S)

    def _close_pipes(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def stop(self, timeout: float) -> None:
        if self.proc is None:
            return
        if self.unsent is not None and self.proc.stdin is not None:
            os.set_blocking(self.proc.stdin.fileno(), True)
            self._send()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # end of input: the writer finishes and exits
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error(
                "HDF5 writer did not finish in %.0f s: killing it (the journal keeps its work)", timeout
            )
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()
        self.proc = None


class Service:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.counters = Counters()
        self.pending: list[bytes] = []
        self.pending_acks: list[tuple[int, int]] = []
        self.pending_since = 0.0
        self.journal = journal.JournalWriter(settings.journal_path)
        self.committer = Committer(self.journal)
        self.inflight: Batch | None = None
        self.generation = 0  # +1 per lost connection: message ids of older ones must not be acked
        # (segment, offset, monotonic time) of commits the writer has not yet made durable in HDF5.
        self.unapplied: collections.deque[tuple[int, int, float]] = collections.deque()
        self.applied: tuple[int, int] = (0, 0)
        self.applied_lock = threading.Lock()
        self.writer = WriterProcess(settings, self._on_writer_report)
        self.connected = False
        self.reconnect_at = 0.0
        self.reconnect_backoff = RECONNECT_MIN_S
        self.journal_retry_at = 0.0
        self.journal_backoff = JOURNAL_RETRY_MIN_S
        self.stopping = False
        self.legacy_topics: set[str] = set()
        self.legacy_topic_bytes = settings.legacy_log_topic.encode()
        self.last_loud: dict[str, float] = {}
        self.paused_reason = ""
        # One JSON line per journal commit, for benchmarks (the writer adds one per HDF5 flush).
        self.stats = open(settings.stats_file, "a", buffering=1) if settings.stats_file else None  # noqa: SIM115
        self.client = self._make_client()

    # --- MQTT -------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.s
        if s.protocol == "5":
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=mqtt.MQTTv5, manual_ack=True
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                clean_session=False,
                protocol=mqtt.MQTTv311,
                manual_ack=True,
            )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self) -> None:
        s = self.s
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry_s
            props.ReceiveMaximum = s.receive_maximum
            self.client.connect(s.host, s.port, s.keepalive, clean_start=False, properties=props)
        else:
            self.client.connect(s.host, s.port, s.keepalive)

    def _try_connect(self, now: float) -> None:
        try:
            if self.counters.reconnects == 0:
                self._connect()
            else:
                self.client.reconnect()
            self.connected = True  # the TCP connection; CONNACK comes through loop()
        except (OSError, ValueError) as exc:
            self._loud("connect", f"cannot connect to {self.s.host}:{self.s.port}: {exc}; retrying")
            self.reconnect_at = now + self.reconnect_backoff
            self.reconnect_backoff = min(self.reconnect_backoff * 2, RECONNECT_MAX_S)
        self.counters.reconnects += 1

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._loud("connect", f"broker refused the connection: {reason_code}")
            self.reconnect_backoff = min(self.reconnect_backoff * 2, RECONNECT_MAX_S)
            return
        self.reconnect_backoff = RECONNECT_MIN_S
        log.info("connected to %s:%d (session present: %s)", self.s.host, self.s.port, flags.session_present)
        topics = self.s.filters() + sorted(self.legacy_topics)
        client.subscribe([(topic, 1) for topic in topics])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [str(code) for code in reason_codes if code.is_failure]
        if failed:
            self._loud("subscribe", f"broker refused subscriptions: {failed}")
        else:
            log.info("subscribed (%d filters)", len(reason_codes))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connection_lost(f"disconnected: {reason_code}")

    def _connection_lost(self, why: str) -> None:
        if not self.connected:
            return
        self.connected = False
        # Unacknowledged messages come again on the next connection: their PUBACKs must never
        # go out on it (their message ids are the old connection's). The records stay pending
        # and are committed; the redelivered copies are dropped as duplicates by the writer.
        self.pending_acks.clear()
        self.generation += 1
        self.reconnect_at = time.monotonic() + self.reconnect_backoff
        if not self.stopping:
            log.warning("connection to the broker lost (%s): reconnecting", why)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        topic: bytes = message._topic
        payload = bytes(message.payload)
        size = len(payload)
        if size > self.s.max_payload:
            payload = payload[: self.s.max_payload]  # rejected as oversized; the head is kept to show
        if message.qos == 0 and len(self.pending) >= MAX_PENDING:
            self.counters.dropped_qos0 += 1
            self._loud("qos0", f"dropping QoS 0 messages: {MAX_PENDING} wait for the journal")
            return
        self.pending.append(
            journal.encode_message(
                time.time(), topic, payload, size, message.retain, message.dup, message.qos
            )
        )
        if message.qos:
            self.pending_acks.append((message.mid, message.qos))
        if len(self.pending) == 1:
            self.pending_since = time.monotonic()
        self.counters.received += 1
        if self.s.legacy and topic == self.legacy_topic_bytes:
            self._follow_legacy(payload)

    def _follow_legacy(self, payload: bytes) -> None:
        try:
            init = parse_legacy_init(payload)
        except Rejected:
            return  # the writer records it in rejects
        if init is None or init.data_topic in self.legacy_topics:
            return
        self.legacy_topics.add(init.data_topic)
        log.info("legacy board announced data topic %s", init.data_topic)
        self.client.subscribe(init.data_topic, 1)

    # --- durability -------------------------------------------------------------------------

    def _on_writer_report(self, report: dict[str, object]) -> None:
        applied = report.get("applied")
        if isinstance(applied, list) and len(applied) == 2:
            with self.applied_lock:
                self.applied = (int(applied[0]), int(applied[1]))

    def _writer_lag(self, now: float) -> float:
        with self.applied_lock:
            applied = self.applied
        while self.unapplied and self.unapplied[0][:2] <= applied:
            self.unapplied.popleft()
        return now - self.unapplied[0][2] if self.unapplied else 0.0

    def _commit_due(self, now: float) -> bool:
        if not self.pending or self.inflight is not None:
            return False
        return (
            len(self.pending) >= self.s.batch_limit
            or now - self.pending_since >= self.s.commit_delay_s
            or not self.connected
            or self.stopping
        )

    def _start_commit(self, now: float) -> None:
        lag = self._writer_lag(now)
        if lag > self.s.max_writer_lag_s and not self.stopping:
            self._pause(f"the HDF5 writer is {lag:.0f} s behind")
            return
        if now < self.journal_retry_at:
            return
        self.inflight = Batch(self.pending, self.pending_acks, self.generation, self.pending_since)
        self.pending, self.pending_acks = [], []
        self.committer.submit(b"".join(self.inflight.records))

    def _finish_commit(self, wait: float = 0.0) -> None:
        """Take the committer's answer for the batch in flight, if it has one."""
        if self.inflight is None:
            return
        answer = self.committer.answer(wait)
        if answer is None:
            return
        batch, self.inflight = self.inflight, None
        if isinstance(answer, OSError):
            self._pause(f"journal write failed: {answer}")
            now = time.monotonic()
            self.journal_retry_at = now + self.journal_backoff
            self.journal_backoff = min(self.journal_backoff * 2, JOURNAL_RETRY_MAX_S)
            # Back to the head of the queue, in order; acks only if still for this connection.
            self.pending[:0] = batch.records
            if batch.generation == self.generation:
                self.pending_acks[:0] = batch.acks
            self.pending_since = batch.since
            return
        self.journal_backoff = JOURNAL_RETRY_MIN_S
        if self.paused_reason:
            log.warning("acknowledging again (was paused: %s)", self.paused_reason)
            self.paused_reason = ""
        self.unapplied.append((*answer, time.monotonic()))
        self.writer.notify(answer)
        self.counters.committed += len(batch.records)
        self.counters.commits += 1
        if self.stats is not None:
            line = {"kind": "journal", "at": time.time(), "messages": len(batch.records)}
            self.stats.write(json.dumps(line) + "\n")
        if batch.generation == self.generation and self.connected:
            for mid, qos in batch.acks:
                self.client.ack(mid, qos)
            self.counters.acked += len(batch.acks)

    def _pause(self, why: str) -> None:
        if not self.paused_reason:
            log.error("NOT acknowledging messages (the broker keeps them): %s", why)
        self.paused_reason = why
        self._loud("pause", f"still not acknowledging: {why}; {len(self.pending)} messages waiting")

    def _loud(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last_loud.get(key, -1e9) >= LOUD_REPEAT_S:
            self.last_loud[key] = now
            log.error(message)

    def _roll_journal(self, now: float) -> None:
        if (
            self.inflight is None  # the committer thread is not using the journal
            and self.journal.fd is not None
            and self.journal.offset > len(journal.MAGIC)
            and time.time() - self.journal.opened_at >= self.s.segment_s
        ):
            try:
                self.journal.start(time.time())
            except OSError as exc:
                self._loud("roll", f"cannot start a new journal segment: {exc}")

    # --- main loop ---------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        with file_lock(self.s.state_dir / "service.lock", wait_s=10):
            stored = read_json(self.s.state_dir / "legacy.json")
            if self.s.legacy and isinstance(stored, dict):
                self.legacy_topics = {str(topic) for topic in stored}
            self.journal.start(time.time())
            self.writer.start(self.journal.position)
            log.info(
                "recording %s to %s (journal %s, MQTT %s, client id %s)",
                ", ".join(self.s.filters()),
                self.s.data_dir,
                self.s.journal_path,
                self.s.protocol,
                self.s.client_id,
            )
            next_status = time.monotonic() + STATUS_LOG_PERIOD_S
            next_roll = time.monotonic() + 1.0
            # This loop runs once per received packet: it is kept to the few checks that must be
            # made that often.
            now = time.monotonic()
            while not self.stopping:
                if self.connected:
                    wait = 0.2
                    if self.inflight is not None:
                        wait = COMMIT_POLL_S
                    elif self.pending:
                        wait = max(0.0, min(wait, self.pending_since + self.s.commit_delay_s - now))
                    rc = self.client.loop(wait)
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        self._connection_lost(mqtt.error_string(rc))
                elif now >= self.reconnect_at:
                    self._try_connect(now)
                else:
                    time.sleep(min(0.05, self.reconnect_at - now))
                now = time.monotonic()
                if self.inflight is not None and not self.committer.answers.empty():
                    self._finish_commit()
                if self.pending and self._commit_due(now):
                    self._start_commit(now)
                if now >= next_roll:
                    self.writer.poll(now, self.journal.position)
                    self._roll_journal(now)
                    next_roll = now + 0.5
                if now >= next_status:
                    self._log_status(now)
                    next_status = now + STATUS_LOG_PERIOD_S
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _shutdown(self) -> None:
        now = time.monotonic()
        self._finish_commit(wait=60)
        if self.pending:
            self._start_commit(now)
            self._finish_commit(wait=60)
        if self.connected:
            with contextlib.suppress(Exception):
                self.client.loop_write()  # the last PUBACKs
                self.client.disconnect()
        self.committer.stop()
        self.journal.close()
        self.writer.stop(timeout=120)
        if self.stats is not None:
            self.stats.close()
        self._log_status(now)

    def _log_status(self, now: float) -> None:
        c = self.counters
        log.info(
            "received %d, committed %d in %d fsyncs, acknowledged %d; pending %d; writer lag %.1f s%s",
            c.received,
            c.committed,
            c.commits,
            c.acked,
            len(self.pending),
            self._writer_lag(now),
            f"; PAUSED: {self.paused_reason}" if self.paused_reason else "",
        )


def configure_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
