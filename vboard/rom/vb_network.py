# `network` as on the ESP8266 port. The radio, the access points and the link state live in
# the host (vboard/net.py); every call here is a round trip to it. As on a real ESP8266, the
# station connects asynchronously (poll isconnected()/status()), reconnects by itself after
# the link drops, and the interface modes and last credentials survive resets.

import vb_hal as hal

STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_WRONG_PASSWORD = 2
STAT_NO_AP_FOUND = 3
STAT_CONNECT_FAIL = 4
STAT_GOT_IP = 5
MODE_11B = 1
MODE_11G = 2
MODE_11N = 3
AUTH_OPEN = 0
AUTH_WEP = 1
AUTH_WPA_PSK = 2
AUTH_WPA2_PSK = 3
AUTH_WPA_WPA2_PSK = 4


@hal.native
def _call(name, *args):
    result = hal.call(name, *args)
    if isinstance(result, dict) and "error" in result:
        raise OSError(result["error"])
    return result


class WLAN:
    def __new__(cls, interface_id=STA_IF):
        if interface_id not in (STA_IF, AP_IF):
            raise ValueError("invalid WLAN interface identifier")
        return _INTERFACES[interface_id]

    def __init__(self, interface_id=STA_IF):
        pass

    def __repr__(self):
        return "<WLAN %s>" % ("STA_IF" if self._if == STA_IF else "AP_IF")

    def _require(self, if_id):
        if self._if != if_id:
            raise OSError("STA required" if if_id == STA_IF else "AP required")

    def active(self, is_active=None):
        if is_active is None:
            return _call("wlan.active", self._if)
        _call("wlan.active", self._if, bool(is_active))
        return None

    def connect(self, ssid=None, key=None, *, bssid=None):
        self._require(STA_IF)
        if ssid is not None and len(ssid) > 32:
            raise ValueError("SSID too long")
        if key is not None and len(key) > 64:
            raise ValueError("key too long")
        _call("wlan.connect", ssid, key)

    def disconnect(self):
        self._require(STA_IF)
        _call("wlan.disconnect")

    def status(self, param=None):
        if param is None:
            return _call("wlan.status", self._if)
        if param == "rssi":
            self._require(STA_IF)
            return _call("wlan.rssi")
        raise ValueError("unknown status param")

    def isconnected(self):
        return _call("wlan.isconnected", self._if)

    def scan(self):
        self._require(STA_IF)
        nets = _call("wlan.scan")
        return [(n[0].encode(), bytes(n[1]), n[2], n[3], n[4], n[5]) for n in nets]

    def ifconfig(self, config=None):
        if config is None:
            return tuple(_call("wlan.ifconfig", self._if))
        _call("wlan.ifconfig", self._if, list(config))
        return None

    def ipconfig(self, *args, **kwargs):
        if args:
            if args[0] == "addr4":
                cfg = self.ifconfig()
                return (cfg[0], cfg[1])
            raise ValueError("unexpected key")
        return None

    def config(self, *args, **kwargs):
        if args and kwargs:
            raise TypeError("either pos or kw args are allowed")
        if kwargs:
            _call("wlan.config", self._if, kwargs)
            return None
        if len(args) != 1:
            raise TypeError("can query only one param")
        value = _call("wlan.config", self._if, args[0])
        if args[0] == "mac":
            return bytes(value)
        return value


def _interface(interface_id):
    wlan = object.__new__(WLAN)
    wlan._if = interface_id
    return wlan


# static in the port (network_wlan.c: wlan_objs[]): WLAN() allocates nothing on a board
_INTERFACES = (_interface(STA_IF), _interface(AP_IF))

_hostname = "espressif"


def hostname(name=None):
    global _hostname
    if name is None:
        return _hostname
    _hostname = name
    return None


def phy_mode(mode=None):
    if mode is None:
        return MODE_11N
    return None


def country(code=None):
    return "01" if code is None else None
