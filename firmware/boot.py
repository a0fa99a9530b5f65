# Runs first after every reset. The ESP8266's access point starts by default ("MicroPython-xxxxxx",
# open to anyone nearby): the board accepts no network input, so it goes off before anything else
# (only when on: the SDK saves the WiFi mode to flash on every change).
import network

_ap = network.WLAN(network.AP_IF)
if _ap.active():
    _ap.active(False)
del _ap, network
