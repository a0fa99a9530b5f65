"""firmware/mqtt.py in the real MicroPython unix port against a real mosquitto on 127.0.0.1, with
a paho-mqtt subscriber checking what arrives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.fw_run import checked, compile_firmware, json_lines, run_script, start_script
from vboard.broker import Mosquitto


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_firmware(tmp_path_factory.mktemp("fwlib"))


class Collector:
    """A paho subscriber that records (topic, payload, retain) of everything it receives."""

    def __init__(
        self,
        port: int,
        topics: str = "#",
        client_id: str = "collector",
        clean_session: bool = True,
        tls_ca: Path | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
        )
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
            self.client.tls_insecure_set(True)  # the test certificate names no IP address
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(10), "collector could not subscribe"

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return condition()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def collector(mosquitto: Mosquitto) -> Iterator[Collector]:
    c = Collector(mosquitto.port)
    yield c
    c.close()


def read_line(proc: subprocess.Popen[str], timeout: float = 20) -> Any:
    """The next JSON line the script prints (fails if it exits or stays silent)."""
    assert proc.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""))
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no line from the board script: {err[-2000:]}")
    return json.loads(result[0])


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> list[Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"board script did not finish in {timeout} s: {err[-2000:]}") from None
    assert proc.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return json_lines(out)


CLIENT = """
import json, time, mqtt
PORT = int(sys.argv[1])
def client(**kw):
    kw.setdefault("keepalive", 10)
    return mqtt.MQTTClient(kw.pop("client_id", "board-1"), "127.0.0.1", PORT, **kw)
def settle(c, timeout_ms=10000):
    start = time.ticks_ms()
    while c.inflight():
        c.poll(20)
        if time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
            raise OSError("acks missing")
def say(value):
    print(json.dumps(value))
"""


def board(micropython_bin: str, lib: Path, cwd: Path, port: int, body: str, heap: str = "64K") -> Any:
    return start_script(micropython_bin, lib, CLIENT + body, cwd, heap=heap, args=(str(port),))


# --- connect, last will, retained -------------------------------------------------------------


def test_will_is_registered_at_connect_and_published_when_the_board_dies(
    micropython_bin: str, lib: Path, tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    body = """
c = client()
c.set_last_will("labfleet/board-1/status", b"offline", retain=True, qos=1)
present = c.connect()
c.publish(b"labfleet/board-1/status", b"online", retain=True, qos=1)
settle(c)
say({"session_present": present})
while True:
    c.poll(100)
"""
    proc = board(micropython_bin, lib, tmp_path, mosquitto.port, body)
    try:
        assert read_line(proc) == {"session_present": False}
        assert collector.wait_for(lambda: collector.payloads("labfleet/board-1/status") == [b"online"])
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
        proc.wait(10)
        assert collector.wait_for(
            lambda: collector.payloads("labfleet/board-1/status") == [b"online", b"offline"]
        )
    finally:
        proc.kill()
        proc.communicate()
    late = Collector(mosquitto.port, "labfleet/+/status", client_id="late")
    try:
        assert late.wait_for(lambda: bool(late.messages))
        assert late.messages == [("labfleet/board-1/status", b"offline", True)]
    finally:
        late.close()


def test_clean_disconnect_does_not_publish_the_will(
    micropython_bin: str, lib: Path, tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    body = """
c = client()
c.set_last_will("w/status", "offline", retain=False, qos=1)
c.connect()
c.publish("w/status", "online", qos=1)
settle(c)
c.disconnect()
say({"connected": c.connected()})
"""
    assert finish(board(micropython_bin, lib, tmp_path, mosquitto.port, body)) == [{"connected": False}]
    assert collector.wait_for(lambda: collector.payloads("w/status") == [b"online"])
    time.sleep(0.5)
    assert collector.payloads("w/status") == [b"online"]


# --- QoS 1 window -----------------------------------------------------------------------------


def test_qos1_window_delivers_2000_exactly_once_in_order(
    micropython_bin: str, lib: Path, tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    body = """
c = client(window=16)
c.connect()
c._last_pid = 64535      # so packet ids wrap past 65535 (skipping 0) during the run
acked = []
c.on_ack = acked.append
sent = []
completed = 0
n = 0
most_in_flight = 0
while completed < 2000:
    while n < 2000 and c.window_free():
        sent.append(c.publish(b"t/seq", b"%d" % n, qos=1))
        n += 1
    most_in_flight = max(most_in_flight, c.inflight())
    completed += c.poll(20)
c.disconnect()
say({"completed": completed, "acked_in_order": acked == sent, "most_in_flight": most_in_flight,
     "zero_pid": 0 in sent, "wrapped": min(sent) < 100})
"""
    # The script keeps every packet id in lists (2 x 2000 entries): more heap than a board has.
    out = finish(board(micropython_bin, lib, tmp_path, mosquitto.port, body, heap="256K"), timeout=120)
    assert out == [
        {"completed": 2000, "acked_in_order": True, "most_in_flight": 16, "zero_pid": False, "wrapped": True}
    ]
    assert collector.wait_for(lambda: len(collector.payloads("t/seq")) >= 2000)
    assert collector.payloads("t/seq") == [str(i).encode() for i in range(2000)]


def test_payload_sizes_and_byte_lengths(
    micropython_bin: str, lib: Path, tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    body = """
def pattern(n):
    out = bytearray(n)
    for i in range(n):
        out[i] = (i * 7 + n) & 0xFF
    return out
c = client(window=4)
c.connect()
for n in (0, 1, 100, 127, 128, 1024, 16383, 16384, 20480):
    c.publish("sizes/%d" % n, pattern(n), qos=1)
    settle(c)
c.publish("sizes/text", "température 25 °C", qos=0)     # str: sent as UTF-8, length in bytes
c.publish("sizes/tést", memoryview(b"xxviewxx")[2:6], retain=True, qos=1)
settle(c)
c.disconnect()
say({"ok": True})
"""
    # A 20 KB payload held whole is more than an ESP8266's heap allows; the client copies none of it.
    assert finish(board(micropython_bin, lib, tmp_path, mosquitto.port, body, heap="256K")) == [{"ok": True}]
    sizes = (0, 1, 100, 127, 128, 1024, 16383, 16384, 20480)
    assert collector.wait_for(lambda: len(collector.messages) >= len(sizes) + 2)
    for n in sizes:
        assert collector.payloads(f"sizes/{n}") == [bytes((i * 7 + n) & 0xFF for i in range(n))]
    assert collector.payloads("sizes/text") == ["température 25 °C".encode()]
    assert collector.payloads("sizes/tést") == [b"view"]


def test_remaining_length_encoding_matches_the_spec(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    body = """
import json, mqtt
buf = bytearray(4)
out = []
for n in (0, 127, 128, 16383, 16384, 2097151, 2097152, 268435455):
    end = mqtt.encode_remaining_length(buf, 0, n)
    out.append([n, list(buf[:end])])
try:
    mqtt.encode_remaining_length(buf, 0, 268435456)
    out.append("no error")
except ValueError:
    out.append("too long")
print(json.dumps(out))
"""
    # MQTT 3.1.1 section 2.2.3, table 2.4.
    assert checked(run_script(micropython_bin, lib, body, tmp_path)) == [
        [
            [0, [0x00]],
            [127, [0x7F]],
            [128, [0x80, 0x01]],
            [16383, [0xFF, 0x7F]],
            [16384, [0x80, 0x80, 0x01]],
            [2097151, [0xFF, 0xFF, 0x7F]],
            [2097152, [0x80, 0x80, 0x80, 0x01]],
            [268435455, [0xFF, 0xFF, 0xFF, 0x7F]],
            "too long",
        ]
    ]


# --- keepalive --------------------------------------------------------------------------------


def test_pings_keep_the_link_and_a_silent_broker_is_detected(
    micropython_bin: str, lib: Path, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = """
c = client(keepalive=10, ping_interval_ms=200)
c.connect()
start = time.ticks_ms()
while time.ticks_diff(time.ticks_ms(), start) < 1500:
    c.poll(50)
say({"pings": c.pings, "connected": c.connected()})
# The test now freezes the broker (SIGSTOP): TCP stays up, nothing answers.
start = time.ticks_ms()
try:
    while True:
        c.poll(50)
except OSError as e:
    import errno
    say({"error": type(e).__name__, "timed_out": e.errno == errno.ETIMEDOUT, "text": str(e)})
"""
    proc = board(micropython_bin, lib, tmp_path, mosquitto.port, body)
    assert mosquitto.proc is not None
    try:
        idle = read_line(proc)
        assert idle["connected"] is True
        assert idle["pings"] >= 4  # ~7 intervals passed, each answered, or it would have raised
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        out = finish(proc, timeout=30)
    finally:
        os.kill(mosquitto.proc.pid, signal.SIGCONT)
        proc.kill()
    assert out[0]["error"] == "MQTTError"
    assert out[0]["timed_out"] is True
    assert "PINGRESP" in out[0]["text"]


# --- refusal and failures ---------------------------------------------------------------------


def test_connack_refusal_is_a_clear_oserror(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "lab", "s3cret-pass"], check=True)
    broker = Mosquitto(
        tmp_path / "broker", allow_anonymous=False, extra_config=[f"password_file {passwords}"]
    )
    body = """
out = []
for user, password in ((None, None), ("lab", "wrong-pass"), ("lab", "s3cret-pass")):
    c = client(user=user, password=password)
    try:
        c.connect()
        out.append("connected")
        c.disconnect()
    except mqtt.ConnectRefused as e:
        out.append([e.code, str(e), isinstance(e, OSError), c.connected()])
say(out)
"""
    with broker:
        out = finish(board(micropython_bin, lib, tmp_path / "board", broker.port, body))
    anonymous, wrong, right = out[0]
    assert anonymous[0] == 5 and "not authorized" in anonymous[1]
    assert wrong[0] in (4, 5) and "broker refused the connection" in wrong[1]
    assert anonymous[2] is True and anonymous[3] is False
    assert right == "connected"


def test_connect_to_nothing_raises_oserror(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    from vboard.broker import free_port

    body = """
try:
    client(connect_timeout_ms=1000).connect()
    say({"connected": True})
except OSError as e:
    say({"error": type(e).__name__})
"""
    assert finish(board(micropython_bin, lib, tmp_path, free_port(), body)) == [{"error": "OSError"}]


def test_broker_killed_mid_stream_raises_promptly(
    micropython_bin: str, lib: Path, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    body = """
c = client(window=8)
c.connect()
completed = 0
n = 0
told = False
try:
    while True:
        while c.window_free():
            c.publish(b"t/stream", b"%d" % n, qos=1)
            n += 1
        completed += c.poll(10)
        if completed > 300 and not told:
            say({"streaming": True})
            told = True
except OSError as e:
    say({"error": type(e).__name__, "errno": e.errno, "completed": completed})
"""
    proc = board(micropython_bin, lib, tmp_path, mosquitto.port, body)
    try:
        assert read_line(proc) == {"streaming": True}
        mosquitto.kill()
        out = finish(proc, timeout=20)
    finally:
        proc.kill()
    assert out[0]["error"] in ("OSError", "MQTTError")
    assert out[0]["completed"] > 300


# --- reconnect + store rewind: nothing lost ---------------------------------------------------


def test_broker_restart_mid_replay_loses_nothing(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    body = """
import store
s = store.Store(60, 3000, "fifo", batch=20)
TOTAL = 1500
for i in range(TOTAL):
    if s.ram_depth() == 60:
        s.flush()
    s.push(1, i, 1700000000 + i, i, None, 5000, 0)
s.flush()
c = client(window=4, timeout_ms=300)
batches = []
reconnects = 0
told = False
def connect():
    global reconnects
    delay = 50
    while True:
        try:
            c.connect()
            return
        except OSError:
            reconnects += 1
            time.sleep_ms(delay)
            delay = min(delay * 2, 500)
connect()
while s.depth():
    try:
        while c.window_free() and s.pending():
            n = s.take(20)
            c.publish(b"labfleet/board-1/data", s.batch(), qos=1)
            batches.append(n)
        for _ in range(c.poll(10)):
            s.commit(batches.pop(0))
        if not told and s.depth() < TOTAL // 2:
            say({"half": True})
            told = True
    except OSError:
        c.close()
        s.rewind()
        batches = []
        connect()
c.disconnect()
say({"done": True, "reconnects": reconnects, "dropped": s.dropped})
"""
    with broker:
        collector = Collector(broker.port, "labfleet/#", client_id="recorder", clean_session=False)
        proc = board(micropython_bin, lib, tmp_path / "board", broker.port, body)
        try:
            assert read_line(proc) == {"half": True}
            broker.restart()  # graceful: SIGTERM saves the queue, then the same port again
            out = finish(proc, timeout=90)
            assert out[0]["done"] is True
            assert out[0]["reconnects"] >= 1
            assert out[0]["dropped"] == 0

            def received() -> list[list[int]]:
                return [s for p in collector.payloads("labfleet/board-1/data") for s in json.loads(p)]

            assert collector.wait_for(lambda: {s[1] for s in received()} == set(range(1500)), timeout=30)
        finally:
            proc.kill()
            collector.close()
    samples = received()
    assert all(s == [1, s[1], 1_700_000_000 + s[1], s[1], None, 5000, 0] for s in samples)
    first_seen: list[int] = []
    for s in samples:
        if s[1] not in first_seen[-200:]:
            first_seen.append(s[1])
    assert first_seen == list(range(1500))  # in order; repeats only of what was in flight
    assert len(samples) - 1500 <= 4 * 20 * out[0]["reconnects"]


# --- an unsolicited PUBLISH from the broker ---------------------------------------------------


def test_publishes_from_the_broker_are_read_acknowledged_and_discarded(
    micropython_bin: str, lib: Path, tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    # The board subscribes to nothing, but a persistent session left by someone else under its
    # client id makes a real broker deliver QoS 1 and QoS 2 messages to it on connect.
    squatter = paho.Client(CallbackAPIVersion.VERSION2, client_id="board-1", clean_session=False)
    squatter.connect("127.0.0.1", mosquitto.port)
    squatter.subscribe("in/#", qos=2)
    squatter.loop_start()
    time.sleep(0.3)
    squatter.loop_stop()
    squatter.disconnect()
    sender = paho.Client(CallbackAPIVersion.VERSION2, client_id="sender")
    sender.connect("127.0.0.1", mosquitto.port)
    sender.loop_start()
    for qos, size in ((1, 10), (2, 30000), (1, 300), (2, 5)):
        sender.publish(f"in/q{qos}/{size}", bytes(size), qos=qos).wait_for_publish(5)
    sender.loop_stop()
    sender.disconnect()
    body = """
c = client(window=4)
present = c.connect(clean_session=False)
for i in range(20):
    c.publish(b"out/seq", b"%d" % i, qos=1)
    settle(c)
start = time.ticks_ms()
while time.ticks_diff(time.ticks_ms(), start) < 500:
    c.poll(20)
c.disconnect()
say({"session_present": present, "discarded": c.discarded})
"""
    out = finish(board(micropython_bin, lib, tmp_path, mosquitto.port, body))
    assert out == [{"session_present": True, "discarded": 4}]
    assert collector.wait_for(lambda: len(collector.payloads("out/seq")) == 20)
    assert collector.payloads("out/seq") == [str(i).encode() for i in range(20)]
    # Everything was acknowledged: the session has nothing left to deliver.
    redelivered: list[str] = []
    check = paho.Client(CallbackAPIVersion.VERSION2, client_id="board-1", clean_session=False)
    check.on_message = lambda c, u, m: redelivered.append(m.topic)
    check.connect("127.0.0.1", mosquitto.port)
    check.loop_start()
    time.sleep(1.0)
    check.loop_stop()
    check.disconnect()
    assert redelivered == []


# --- TLS --------------------------------------------------------------------------------------


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def der(cert: Path) -> bytes:
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True, capture_output=True
    ).stdout


def test_tls_publish_and_certificate_check(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "labfleet-broker")
    stranger, _ = make_certificate(tmp_path, "someone-else")
    (tmp_path / "ca.der").write_bytes(der(cert))
    (tmp_path / "stranger.der").write_bytes(der(stranger))
    broker = Mosquitto(tmp_path / "broker", extra_config=[f"certfile {cert}", f"keyfile {key}"])
    body = f"""
out = []
for ca in (None, {str(tmp_path / "ca.der")!r}, {str(tmp_path / "stranger.der")!r}):
    params = {{"server_hostname": "labfleet-broker"}}
    if ca:
        params["cadata"] = open(ca, "rb").read()
    c = client(tls=True, tls_params=params, window=2)
    try:
        c.connect()
        c.publish(b"tls/hello", b"over tls", qos=1)
        c.publish(b"tls/big", bytes(5000), qos=1)
        settle(c)
        c.disconnect()
        out.append("ok")
    except OSError as e:
        out.append("refused")
say(out)
"""
    with broker:
        collector = Collector(broker.port, "tls/#", tls_ca=cert)
        try:
            # mbedtls on this port takes its buffers from the MicroPython heap (axTLS on the
            # ESP8266 needs far less), so this test runs with a bigger heap.
            out = finish(board(micropython_bin, lib, tmp_path / "board", broker.port, body, heap="256K"))
            assert out == [["ok", "ok", "refused"]]
            assert collector.wait_for(lambda: len(collector.payloads("tls/big")) == 2)
            assert collector.payloads("tls/hello") == [b"over tls", b"over tls"]
            assert collector.payloads("tls/big") == [bytes(5000), bytes(5000)]
        finally:
            collector.close()


# --- protocol violations: a scripted broker (mosquitto never sends malformed packets) ---------


def scripted_broker(replies: list[bytes], received: list[bytes]) -> tuple[int, threading.Thread]:
    """A TCP server on 127.0.0.1 that, per connection, reads the CONNECT, records it, sends the
    next scripted reply and then holds the connection open, silent, until the client closes."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(30)

    def serve() -> None:
        with server:
            for reply in replies:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(10)
                    head = conn.recv(2)
                    length, shift, pos = 0, 0, 1
                    while True:  # remaining length (CONNECTs here are short, but decode it properly)
                        digit = head[pos]
                        length |= (digit & 0x7F) << shift
                        if not digit & 0x80:
                            break
                        head += conn.recv(1)
                        pos += 1
                        shift += 7
                    body = b""
                    while len(body) < length:
                        body += conn.recv(length - len(body))
                    received.append(head + body)
                    conn.sendall(reply)
                    try:
                        while conn.recv(64):
                            pass
                    except OSError:
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def test_connect_packet_bytes_and_protocol_violations(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    connack = b"\x20\x02\x00\x00"
    replies = [
        connack,  # 1: CONNECT bytes checked below; then a PUBACK with a wrong length
        b"\x40\x02\x00\x01",  # 2: a PUBACK where the CONNACK should be
        connack + b"\x40",  # 3: CONNACK, then the first byte of a packet and silence
        connack + b"\x40\x03\x00\x01\x00",  # 4: PUBACK with remaining length 3
    ]
    received: list[bytes] = []
    port, thread = scripted_broker(replies, received)
    body = """
import errno
def attempt(step, **kw):
    c = client(timeout_ms=200, **kw)
    try:
        c.connect()
        start = time.ticks_ms()
        while time.ticks_diff(time.ticks_ms(), start) < 1000:
            c.poll(50)
        return [step, "no error"]
    except OSError as e:
        return [step, type(e).__name__, e.errno == errno.ETIMEDOUT, str(e)]
    finally:
        c.close()
c = client(user="u", password="p")
c.set_last_will("w/s", "offline", retain=True, qos=1)
c.connect()
c.close()
say([attempt(2), attempt(3), attempt(4)])
"""
    out = finish(board(micropython_bin, lib, tmp_path, port, body))
    thread.join(10)
    # MQTT 3.1.1 section 3.1: protocol name and level, flags (user, password, will retain,
    # will QoS 1, will, clean session), keepalive 10, then the payload fields in order.
    assert received[0] == (
        b"\x10\x27\x00\x04MQTT\x04\xee\x00\x0a\x00\x07board-1\x00\x03w/s\x00\x07offline\x00\x01u\x00\x01p"
    )
    second, third, fourth = out[0]
    assert second[:2] == [2, "MQTTError"] and "expected CONNACK" in second[3]
    assert third[:3] == [3, "OSError", True]  # a packet cut off mid-way times out
    assert fourth[:2] == [4, "MQTTError"] and "malformed" in fourth[3]
