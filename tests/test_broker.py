"""The local broker launcher used by every suite: real mosquitto, kill -9 keeps what it saved."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from vboard.broker import Mosquitto


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
    got: list[bytes] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("t/#", qos=1)
    for _ in range(50):
        sub.loop(0.1)
        if got:
            break
    assert got == [b"kept"]
