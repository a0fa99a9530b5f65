# `select` as on the ESP8266 port (poll/ipoll over sockets and the REPL stream), waiting in the
# board's simulated time (vb_hal.wait) so scheduled callbacks keep running.

import vb_hal as hal

POLLIN = 1
POLLOUT = 4
POLLERR = 8
POLLHUP = 16


def _native(obj):
    inner = getattr(obj, "_s", None)
    return inner if inner is not None else obj


class _Poll:
    def __init__(self):
        self._p = hal.make_poller()
        self._objs = {}  # id(native) -> user object

    def register(self, obj, eventmask=POLLIN | POLLOUT):
        native = _native(obj)
        self._objs[id(native)] = [obj, native, eventmask]
        self._p.register(native, eventmask)

    def unregister(self, obj):
        native = _native(obj)
        self._objs.pop(id(native), None)
        self._p.unregister(native)

    def modify(self, obj, eventmask):
        native = _native(obj)
        entry = self._objs.get(id(native))
        if entry is not None:
            entry[2] = eventmask
        self._p.modify(native, eventmask)

    def _map(self, ready):
        out = []
        for entry in ready:
            pair = self._objs.get(id(entry[0]))
            out.append((pair[0] if pair else entry[0], entry[1]))
        return out

    @hal.native
    def poll(self, timeout=-1):
        deadline = None if timeout is None or timeout < 0 else hal.sim_us() + timeout * 1000
        # an answer is awaited when a socket watched for input sent something since it last
        # received: the board's clock stands still while it comes (vb_hal.wait)
        answer = 0
        for pair in self._objs.values():
            if pair[2] & POLLIN and hasattr(pair[0], "answer_wait_us"):
                wait = pair[0].answer_wait_us()
                if wait > answer:
                    answer = wait
        while True:
            ready = hal.wait(self._p, deadline, answer)
            if answer and not ready:
                # none came in that time: it was a message without an answer (MQTT QoS 0)
                for pair in self._objs.values():
                    if hasattr(pair[0], "answer_wait_us"):
                        pair[0].give_up_answer()
                answer = 0
            if ready or (deadline is not None and hal.sim_us() >= deadline):
                return self._map(ready)

    def ipoll(self, timeout=-1, flags=0):
        return iter(self.poll(timeout))


def poll():
    return _Poll()


def select(rlist, wlist, xlist, timeout=None):
    p = _Poll()
    for obj in rlist:
        p.register(obj, POLLIN)
    for obj in wlist:
        p.register(obj, POLLOUT)
    ready = p.poll(-1 if timeout is None else int(timeout * 1000))
    r = [o for o, ev in ready if ev & POLLIN and o in rlist]
    w = [o for o, ev in ready if ev & POLLOUT and o in wlist]
    return r, w, []
