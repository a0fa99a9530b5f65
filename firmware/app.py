# The board application: sample once per DS3231 second, keep every sample until the broker has
# acknowledged it, publish over MQTT. main.py calls run() with the config start.py checked;
# appinit.py builds the objects (and is unloaded), this module is what runs for months.
#
# One loop, never sleeping longer than ~100 ms and never blocking long while a sample is due:
#   - the sampler (sampler.py) turns SQW edges into samples in the store (store.py);
#   - samples the broker has not acknowledged stay in the store: RAM first, moved to the flash
#     ring once the oldest has waited buffer.flush_s seconds (so a reset loses at most that
#     many), so a WiFi or broker outage loses nothing but grows the backlog;
#   - while connected, the oldest pending samples go out in batches of up to buffer.batch as
#     QoS 1 publishes, WINDOW of them in flight; a batch is committed (dropped from the store)
#     buffer.resend_s after its PUBACK. A backlog is replayed many times faster than real time
#     while live samples queue up behind it;
#   - network work that can block for a moment (WiFi status, NTP, MQTT connect, info, health)
#     runs just after a sample was taken, when the next SQW edge is most of a second away.
# WiFi: the configured networks are tried in order; once associated, the ESP8266 reconnects by
# itself after a drop, so the next network is only tried after WIFI_SWITCH_MS without a link,
# and after every round through them the wait doubles (up to _WIFI_SWITCH_MAX_MS): each connect
# with other credentials writes the SDK's config sector (wifi_station_set_config), so a day
# without any network costs ~180 sector writes with two networks, not ~2,900.
# Ticks: no stored ticks_ms older than a few seconds is ever compared (ticks_diff is only
# meaningful within 2**29 ms, 6.2 days): how long the link has been down is counted in the
# loop's own steps, as the uptime is.
# MQTT: clean session, client id = device name, the retained `offline` last will in CONNECT;
# on every connect retained `online` and info, then data; retained health every health_s.
# Reconnects back off exponentially (capped, jittered). The board subscribes to nothing.
# Why commits wait buffer.resend_s: mosquitto sends a PUBACK before it saves the message (every
# autosave_interval seconds, or on its next loop pass with autosave_on_changes), so a broker
# killed or powered off in between loses what it acknowledged last. A connection that breaks
# sends the batches acknowledged in the last resend_s again; the recorder drops the duplicates
# by (device, boot, seq). Acknowledged samples are never flushed to flash (no wear for them):
# when a flush is due they are committed first.
# The flash button held for BUTTON_HOLD_MS pauses/resumes publishing data (sampling goes on).

import gc
import io
import json
import os
import time
from array import array

import machine
from drivers.errors import SensorError
from micropython import const
from protocol import FLAG_TIME_UNSYNCED, HEALTH_KEYS, OFFLINE, ONLINE

FIRMWARE_VERSION = "0.1.0"
SAMPLES_DIR = "fifo"  # the store's flash FIFO (a directory of segment files)

_WIFI_CHECK_MS = const(2000)
WIFI_SWITCH_MS = const(30000)  # no link for this long: associate with the next network
_WIFI_SWITCH_MAX_MS = const(480000)
_LINK_LOST_MS = const(10000)  # no link for this long: the MQTT connection is dead, close it
_BACKOFF_FIRST_MS = const(1000)
_BACKOFF_MAX_MS = const(60000)
_SYNC_RETRY_S = const(60)
_SYNC_CHECK_S = const(30)  # after the DS3231 was set: check it against NTP this soon
_RTC_RETRY_MS = const(10000)  # a DS3231 that did not answer is tried again this often
# Before the next SQW edge is due, the loop must be back in time to take its sample: work that
# may block for a moment (WiFi status, NTP, connect, info, health) starts only with at least
# _BLOCKING_IDLE_MS to go, the encoding of a data batch with at least _BATCH_IDLE_MS.
_BLOCKING_IDLE_MS = const(700)
_BATCH_IDLE_MS = const(300)
BUTTON_HOLD_MS = const(2000)
# A CONNACK comes within milliseconds from a healthy broker; waiting longer only delays samples.
CONNECT_TIMEOUT_MS = const(2000)
_SETTLE_SLOTS = const(32)  # acknowledged batches kept at most (beyond: the oldest is committed)
# The longest info message: every field at its longest (device name 32, MicroPython version
# string ~80 bytes, buffer sizes at their config maxima) is ~620 bytes.
_MESSAGE_MAX = const(768)


class JSONOut(io.IOBase):
    """A fixed buffer that json.dump() writes into. After boot the free heap is in small pieces:
    the info and health messages, built every minute for months, take no new block."""

    def __init__(self, size):
        self.view = memoryview(bytearray(size))
        self.end = 0

    def write(self, data):
        end = self.end + len(data)
        self.view[self.end : end] = data  # ValueError beyond the buffer
        self.end = end
        return len(data)

    def dump(self, obj):
        """obj as JSON: a memoryview valid until the next dump()."""
        self.end = 0
        json.dump(obj, self)
        return self.view[: self.end]


class App:
    WINDOW = 8  # QoS 1 publishes in flight
    BOOT_SYNC_WAIT_MS = 20000  # OSF set at boot: how long sampling waits for NTP

    def __init__(self):
        now = time.ticks_ms()
        self.paused = False
        self.pressed_at = None  # ticks_ms when the flash button went down
        self.toggled = False
        self.net_index = 0
        self.wifi_up = False
        self.wifi_down_ms = 0  # how long the link has been down (counted up to WIFI_SWITCH_MS)
        self.wifi_wait_ms = 0  # down time since the last network switch (likewise, to the wait)
        self.wifi_switch_ms = WIFI_SWITCH_MS  # the wait before the next switch
        self.wifi_checked = now
        # what each in-flight publish holds, in publish order: n > 0 a data batch of n FIFO
        # positions, 0 anything else, -n a batch of damaged records completing with its
        # predecessors (nothing was published for it)
        self.ring = array("i", bytes(4 * 2 * self.WINDOW))
        self.ring_head = 0
        self.ring_len = 0
        # acknowledged FIFO positions not committed yet, oldest at settle_head: count, ticks_ms
        self.settle_n = array("i", bytes(4 * _SETTLE_SLOTS))  # arrays: half a list's bytes here
        self.settle_at = array("i", bytes(4 * _SETTLE_SLOTS))
        self.settle_head = 0
        self.settle_len = 0
        self.settling = 0  # their total
        self.connected_once = False
        self.reconnects = 0
        self.backoff_ms = 0
        self.connect_at = now
        self.info_due = False
        self.rtc_tried = now
        self.last_ticks = now
        self.up_s = 0  # uptime, accumulated from ticks (ticks_ms wraps after 12 days)
        self.up_ms = 0
        self.sync_at = 0  # uptime second of the next NTP check
        self.health_at = 0
        # Set by appinit.setup() and run(). Declared here, so that the instance's attribute
        # table reaches its final size now, not by reallocations while boot fills the heap.
        self.boot = self.flush_s = self.batch = self.resend_ms = self.health_s = None
        self.resync_s = self.ntp_host = self.sqw_gpio = self.networks = None
        self.device = self.t_status = self.t_info = self.t_data = self.t_health = None
        self.rtc = self.tc = self.amb = self.button = self.wlan = self.info_fields = None
        self.store = self.client = self.sampler = self.timesync = self.wdt = self.rtc_ok = None
        self.health_fields = None
        self.out = JSONOut(_MESSAGE_MAX)

    def start_rtc(self):
        try:
            self.timesync.start()
            return True
        except SensorError:
            print("labfleet: the DS3231 does not answer: no sampling until it does")
            return False

    # --- the loop ----------------------------------------------------------------------------

    def loop(self):
        sampler = self.sampler
        client = self.client
        self.health_at = self.health_s
        while True:
            self.wdt.feed()
            wait = sampler.service()
            now = time.ticks_ms()
            self.up_ms += time.ticks_diff(now, self.last_ticks)
            self.last_ticks = now
            if self.up_ms >= 1000:
                self.up_s += self.up_ms // 1000
                self.up_ms %= 1000
            self.settle(now)
            self.flush_due()
            self.check_button(now)
            if not sampler.enabled:
                ts = self.timesync
                if ts.synced or self.up_s * 1000 >= self.BOOT_SYNC_WAIT_MS:
                    if not ts.synced:
                        print("labfleet: no NTP answer: sampling flagged time_unsynced")
                    sampler.enabled = True
            if not self.rtc_ok and time.ticks_diff(now, self.rtc_tried) >= _RTC_RETRY_MS:
                self.rtc_tried = now
                self.rtc_ok = self.start_rtc()
            if sampler.idle_ms() >= _BLOCKING_IDLE_MS:
                self.network(now)
            if client.sock is None:
                time.sleep_ms(wait)
                continue
            try:
                self.publish_data(sampler)
                self.acked(client.poll(wait))
            except OSError as e:
                self.drop(e)

    def flush_due(self):
        store = self.store
        oldest = store.ram_oldest_seq()
        if oldest >= 0 and self.sampler.seq - oldest >= self.flush_s:
            if self.settle_len:  # acknowledged ones need no flash: commit them, then look again
                while self.settle_len:
                    self.commit_oldest()
                oldest = store.ram_oldest_seq()
                if oldest < 0 or self.sampler.seq - oldest < self.flush_s:
                    return
            store.flush()

    def check_button(self, now):
        if self.button.value():  # released (pulled up)
            self.pressed_at = None
        elif self.pressed_at is None:
            self.pressed_at = now
            self.toggled = False
        elif not self.toggled and time.ticks_diff(now, self.pressed_at) >= BUTTON_HOLD_MS:
            self.toggled = True
            self.paused = not self.paused
            self.health_at = self.up_s  # tell the recorder now
            print("labfleet: publishing %s" % ("paused" if self.paused else "resumed"))

    # --- network -----------------------------------------------------------------------------

    def network(self, now):
        """At most one operation that may block for a moment per call."""
        elapsed = time.ticks_diff(now, self.wifi_checked)
        if elapsed >= _WIFI_CHECK_MS:
            self.wifi_checked = now
            self.check_wifi(now, elapsed)
            return
        if not self.wifi_up:
            return
        ts = self.timesync
        # the offset is measured at an SQW edge: wait for the sampler's anchor unless the time
        # is known to be wrong anyway
        if self.up_s >= self.sync_at and self.rtc_ok and (ts.osf or self.sampler.base is not None):
            if ts.sync(self.wdt):
                self.sync_at = self.up_s + (_SYNC_CHECK_S if ts.just_set else self.resync_s)
                self.sampler.flags &= ~FLAG_TIME_UNSYNCED
                self.info_due = True
            else:
                self.sync_at = self.up_s + _SYNC_RETRY_S
            return
        client = self.client
        try:
            if client.sock is None:
                if time.ticks_diff(now, self.connect_at) >= 0:
                    self.connect(now)
            elif client.window_free():
                if self.info_due:
                    self.info_due = False
                    self.publish(self.t_info, self.info())
                elif self.up_s >= self.health_at:
                    self.health_at = self.up_s + self.health_s
                    self.publish(self.t_health, self.health())
        except OSError as e:
            self.drop(e)

    def check_wifi(self, now, elapsed):
        up = self.wlan.isconnected()
        if up and not self.wifi_up:
            self.backoff_ms = 0  # the link is back: the broker may well be reachable again
            self.connect_at = now
        self.wifi_up = up
        if up:
            self.wifi_down_ms = 0
            self.wifi_wait_ms = WIFI_SWITCH_MS  # a link lost later: the next network after that long
            self.wifi_switch_ms = WIFI_SWITCH_MS
            return
        # counted only as far as they are compared, so they stay small ints for months
        down = self.wifi_down_ms + elapsed
        self.wifi_down_ms = down if down < WIFI_SWITCH_MS else WIFI_SWITCH_MS
        wait = self.wifi_wait_ms + elapsed
        self.wifi_wait_ms = wait if wait < _WIFI_SWITCH_MAX_MS else _WIFI_SWITCH_MAX_MS
        if self.client.sock is not None and down >= _LINK_LOST_MS:
            self.drop(None)
        if down >= WIFI_SWITCH_MS and self.wifi_wait_ms >= self.wifi_switch_ms:
            self.net_index = (self.net_index + 1) % len(self.networks)
            self.wifi_wait_ms = 0
            if self.net_index == 0 and self.wifi_switch_ms < _WIFI_SWITCH_MAX_MS:
                self.wifi_switch_ms *= 2  # a whole round without a link: try less often
            try:
                self.wlan.connect(*self.networks[self.net_index])
            except OSError as e:
                print("labfleet: WiFi connect failed: %s" % e)

    def connect(self, now):
        client = self.client
        try:
            client.connect()
        except OSError as e:
            print("labfleet: MQTT connect failed: %s" % e)
            self.backoff(now)
            return
        self.rewind()
        if self.connected_once:
            self.reconnects += 1
        self.connected_once = True
        self.backoff_ms = 0
        self.info_due = False
        self.publish(self.t_status, ONLINE)
        self.publish(self.t_info, self.info())

    def backoff(self, now):
        delay = self.backoff_ms * 2 if self.backoff_ms else _BACKOFF_FIRST_MS
        if delay > _BACKOFF_MAX_MS:
            delay = _BACKOFF_MAX_MS
        self.backoff_ms = delay
        jitter = delay * (os.urandom(1)[0] - 128) // 512  # +-25 %
        self.connect_at = time.ticks_add(now, delay + jitter)

    def drop(self, error):
        if error is not None:
            print("labfleet: MQTT connection lost: %s" % error)
        self.client.close()
        self.rewind()
        self.backoff(time.ticks_ms())

    def rewind(self):
        """Everything in flight or settling is pending again: sent again on the next connection."""
        self.store.rewind()
        self.ring_len = 0
        self.settle_len = 0
        self.settling = 0

    # --- publishing --------------------------------------------------------------------------

    def publish(self, topic, payload):
        """A retained QoS 1 publish (status, info, health)."""
        self.client.publish(topic, payload, retain=True, qos=1)
        self.ring_push(0)

    def publish_data(self, sampler):
        if self.paused:
            return
        client = self.client
        store = self.store
        # one slot is kept for info and health
        while client.window_free() > 1 and store.pending() and sampler.idle_ms() >= _BATCH_IDLE_MS:
            n = store.take(self.batch)
            if store.batch_samples:
                client.publish(self.t_data, store.batch(), qos=1)
                self.ring_push(n)
            elif self.ring_len:
                self.ring_push(-n)
            else:
                self.commit_later(n)

    def ring_push(self, value):
        ring = self.ring
        ring[(self.ring_head + self.ring_len) % len(ring)] = value
        self.ring_len += 1

    def ring_pop(self):
        value = self.ring[self.ring_head]
        self.ring_head = (self.ring_head + 1) % len(self.ring)
        self.ring_len -= 1
        return value

    def acked(self, completed):
        ring = self.ring
        for _ in range(completed):
            n = self.ring_pop()
            if n:
                self.commit_later(n)
            while self.ring_len and ring[self.ring_head] < 0:
                self.commit_later(-self.ring_pop())

    def commit_later(self, n):
        """Commit n FIFO positions resend_s from now (after those settling before them)."""
        if self.settle_len == _SETTLE_SLOTS:
            self.commit_oldest()
        slot = (self.settle_head + self.settle_len) % _SETTLE_SLOTS
        self.settle_n[slot] = n
        self.settle_at[slot] = time.ticks_ms()
        self.settle_len += 1
        self.settling += n

    def settle(self, now):
        while self.settle_len and time.ticks_diff(now, self.settle_at[self.settle_head]) >= self.resend_ms:
            self.commit_oldest()

    def commit_oldest(self):
        n = self.settle_n[self.settle_head]
        self.store.commit(n)
        self.settling -= n
        self.settle_head = (self.settle_head + 1) % _SETTLE_SLOTS
        self.settle_len -= 1

    # --- messages ----------------------------------------------------------------------------

    def now(self):
        t = self.sampler.now()
        if t is None:
            try:
                t = self.rtc.time()
            except SensorError:
                t = 0
        return t

    def info(self):
        ts = self.timesync
        fields = self.info_fields
        time_fields = fields["time"]
        time_fields["source"] = "ntp" if ts.synced else "rtc"
        time_fields["sync"] = ts.result
        time_fields["osf"] = ts.osf
        time_fields["offset_ms"] = ts.offset_ms
        fields["t"] = self.now()
        return self.out.dump(fields)

    def health(self):
        gc.collect()
        store = self.store
        try:
            rssi = self.wlan.status("rssi")
        except (OSError, ValueError):
            rssi = None
        fields = self.health_fields
        fields["t"] = self.now()
        fields["up"] = self.up_s
        fields["rssi"] = rssi
        fields["heap"] = gc.mem_free()
        fields["backlog"] = max(0, store.depth() - self.settling)  # acknowledged: not backlog
        fields["dropped"] = store.dropped + store.overruns
        fields["flash_errors"] = store.flash_errors
        fields["reconnects"] = self.reconnects
        fields["seq"] = self.sampler.seq - 1
        fields["drift_ms"] = self.timesync.offset_ms
        fields["paused"] = self.paused
        return self.out.dump(fields)


def run(box):
    """box: [config, config file name, reset cause] from start.py, emptied here so the config's
    heap is freed once appinit has taken what the app needs. Never returns."""
    import sys

    # The long-lived objects with the largest blocks first, while the heap above what boot
    # left is still in one piece: the app's attribute table, the store's buffers, the MQTT
    # client's buffers.
    app = App()
    cfg = box[0]
    from store import Store

    buffer = cfg["buffer"]
    app.store = store = Store(buffer["ram_samples"], buffer["flash_samples"], SAMPLES_DIR, buffer["batch"])
    from mqtt import MQTTClient

    broker = cfg["broker"]
    app.client = client = MQTTClient(
        cfg["device"],
        broker["host"],
        broker["port"],
        user=broker["user"],
        password=broker["password"],
        keepalive=broker["keepalive"],
        tls=broker["tls"],
        window=App.WINDOW,
        connect_timeout_ms=CONNECT_TIMEOUT_MS,
    )
    del cfg, buffer, broker
    import appinit

    appinit.setup(app, box.pop(0), box.pop(0), box.pop(0))
    del appinit
    sys.modules.pop("appinit")
    gc.collect()
    from sampler import Sampler

    # every module took the protocol constants it needs (`from protocol import ...`, sampler.py
    # the last): the rest of protocol.py (the recorder's helpers, the key lists) gives its heap
    # back before NTP is loaded
    sys.modules.pop("protocol", None)
    gc.collect()
    from timesync import TimeSync

    client.set_last_will(app.t_status, OFFLINE, retain=True, qos=1)
    # the messages' dicts are built once and updated in place, and written into one buffer
    app.info_fields["buffer"] = {"ram": store.ram_capacity, "flash": store.capacity, "flush_s": app.flush_s}
    app.info_fields["time"] = {"source": None, "sync": None, "osf": None, "offset_ms": None}
    app.health_fields = {key: None for key in HEALTH_KEYS}
    app.health_fields["boot"] = app.boot
    app.sampler = sampler = Sampler(store, app.boot, app.rtc, app.tc, app.amb, app.sqw_gpio)
    app.timesync = TimeSync(app.rtc, sampler, app.ntp_host)
    app.rtc_ok = app.start_rtc()
    if app.timesync.osf:
        # the DS3231 lost power: its time is not to be trusted. Sampling starts once NTP set it,
        # or, if NTP stays out of reach, flagged unsynced after BOOT_SYNC_WAIT_MS
        sampler.enabled = False
        sampler.flags = FLAG_TIME_UNSYNCED
    # The watchdog starts with the loop that feeds it: boot before it (recovering a flash ring
    # without its journal reads the whole ring, loading the modules, the DS3231) may take seconds.
    app.wdt = machine.WDT()
    app.loop()
