"""The local broker launcher used by every suite: real mosquitto, kill -9 keeps what it saved."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from vboard.broker import Amqtt, Mosquitto


def _client(port: int, cid: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)
    c.connect("127.0.0.1", port)
    return c


def test_retained_message_survives_kill_9(mosquitto: Mosquitto) -> None:
    pub = _client(mosquitto.port, "pub")
    pub.loop_start()
    info = pub.publish("t/x", b"kept", qos=1, retain=True)
    info.wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()
    mosquitto.restart(hard=True)  # autosave_on_changes: saved before the kill
    got: list[bytes | bytearray] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("t/#", qos=1)
    for _ in range(50):
        sub.loop(0.1)
        if got:
            break
    assert got == [b"kept"]


def test_embedded_fallback_broker_carries_messages(tmp_path: Path) -> None:
    """`make demo` on a machine without mosquitto uses the embedded amqtt broker."""
    broker = Amqtt(tmp_path / "amqtt").start()
    try:
        got: list[bytes | bytearray] = []
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sub")
        sub.on_message = lambda c, u, m: got.append(m.payload)
        sub.connect("127.0.0.1", broker.port)
        sub.subscribe("demo/#", qos=1)
        sub.loop_start()
        pub = _client(broker.port, "pub")
        pub.loop_start()
        pub.publish("demo/x", b"through amqtt", qos=1).wait_for_publish(5)
        for _ in range(50):
            if got:
                break
            time.sleep(0.1)
        pub.loop_stop()
        sub.loop_stop()
        assert got == [b"through amqtt"]
    finally:
        broker.stop()
