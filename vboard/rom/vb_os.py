# `os` as on the ESP8266 port: the board's filesystem (LittleFS in its flash, mounted at /),
# uname() of the configured MicroPython release.
# The unix port's process functions (system, getenv, ...) are not on a board.

import os as _os

import vb_hal as hal

sep = "/"
chdir = _os.chdir
getcwd = _os.getcwd
listdir = _os.listdir
mkdir = _os.mkdir
remove = _os.remove
rename = _os.rename
rmdir = _os.rmdir
stat = _os.stat
urandom = _os.urandom
mount = _os.mount
umount = _os.umount
VfsFat = _os.VfsFat
VfsLfs2 = _os.VfsLfs2
unlink = _os.remove


ilistdir = _os.ilistdir
statvfs = _os.statvfs


def sync():
    pass


def dupterm(stream_object=None, index=0):
    return None


def dupterm_notify(obj):
    pass


class _UnameResult(tuple):
    sysname = property(lambda self: self[0])
    nodename = property(lambda self: self[1])
    release = property(lambda self: self[2])
    version = property(lambda self: self[3])
    machine = property(lambda self: self[4])


def uname():
    u = hal.params["uname"]
    return _UnameResult((u[0], u[1], u[2], u[3], u[4]))
