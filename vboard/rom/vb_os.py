# `os` as on the ESP8266 port: the board's filesystem (its flash directory, mounted at /),
# uname() of the configured MicroPython release, statvfs() of the simulated flash size.
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


def ilistdir(path="."):
    # FAT and littlefs on the board report sizes; VfsPosix's entries lack them.
    base = path if path not in ("", ".") else ""
    for entry in _os.ilistdir(path):
        full = (base + "/" + entry[0]) if base else entry[0]
        size = 0 if entry[1] == 0x4000 else _os.stat(full)[6]
        yield (entry[0], entry[1], 0, size)


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


def _used_bytes(path):
    total = 0
    for entry in ilistdir(path):
        child = path + "/" + entry[0] if path != "/" else "/" + entry[0]
        if entry[1] == 0x4000:
            total += _used_bytes(child)
        else:
            # whole blocks, as a FAT/littlefs filesystem allocates them
            total += (entry[3] + 4095) // 4096 * 4096
    return total


def statvfs(path):
    block = 4096
    blocks = hal.params["fs_size"] // block
    free = max(0, blocks - _used_bytes("/") // block)
    return (block, block, blocks, free, free, 0, 0, 0, 0, 255)
