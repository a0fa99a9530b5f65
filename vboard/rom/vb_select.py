# `select` as on the ESP8266 port (poll/ipoll over sockets and the REPL stream), waiting in
# simulated time in short real-time slices so scheduled callbacks keep running.

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
        self._objs[id(native)] = (obj, native)
        self._p.register(native, eventmask)

    def unregister(self, obj):
        native = _native(obj)
        self._objs.pop(id(native), None)
        self._p.unregister(native)

    def modify(self, obj, eventmask):
        self._p.modify(_native(obj), eventmask)

    def _map(self, ready):
        out = []
        for entry in ready:
            pair = self._objs.get(id(entry[0]))
            out.append((pair[0] if pair else entry[0], entry[1]))
        return out

    def poll(self, timeout=-1):
        if timeout is None or timeout < 0:
            deadline = None
        else:
            deadline = hal.sim_us() + timeout * 1000
        while True:
            if deadline is None:
                wait_ms = -1
            else:
                left = hal.real_us_for(deadline - hal.sim_us())
                wait_ms = 0 if left <= 0 else (left + 999) // 1000
            ready = hal.poll_real(self._p, wait_ms)
            if ready or wait_ms == 0:
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
