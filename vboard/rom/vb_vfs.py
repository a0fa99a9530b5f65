# `vfs` as on the ESP8266 port: the unix port's filesystem classes and mount, and, on a
# FLASH_2M_ROMFS firmware, `rom_ioctl` over its ROMFS partition (ports/esp8266/vfs_rom_ioctl.c):
# 1 -> one partition, 2 -> the partition as a memoryview, 3 (id, length) -> erase that much from
# its start and return the minimum write size (4), 4 (id, offset, buf) -> write, anything else
# -> -EINVAL. `mpremote romfs query/deploy` drives exactly these.
#
# On the chip the partition is memory-mapped flash: .mpy files in it run in place and cost no
# heap. This port cannot map a file, so `map_partition` copies the partition into the heap
# before boot (the host enlarged the heap by as much, vboard/board.py) and keeps the copy
# equal to the flash through rom_ioctl's erases and writes, as the chip's flash cache shows them.

import vb_esp
import vfs as _vfs

VfsFat = _vfs.VfsFat
VfsLfs2 = _vfs.VfsLfs2
VfsPosix = _vfs.VfsPosix
VfsRom = _vfs.VfsRom
mount = _vfs.mount
umount = _vfs.umount

_EINVAL = 22
_GET_NUMBER_OF_SEGMENTS = 1
_GET_SEGMENT = 2
_WRITE_PREPARE = 3
_WRITE = 4
_MIN_WRITE = 4  # the SDK writes whole 32-bit words
ROMFS_MAGIC = b"\xd2\xcd\x31"

_offset = 0
_mapped = None


def map_partition(offset, size):
    global _offset, _mapped
    _offset = offset
    _mapped = bytearray(size)
    vb_esp.flash_read(offset, _mapped)  # straight from the image: no transient copy


def mapped_bytes():
    return len(_mapped) if _mapped is not None else 0


def mount_romfs(path):
    """Mount the partition's ROMFS at `path` as the port does at boot; False if none is there."""
    if _mapped is None or _mapped[:3] != ROMFS_MAGIC:
        return False
    try:
        mount(VfsRom(memoryview(_mapped)), path)
    except OSError:
        return False
    return True


def _rom_ioctl(op, *args):
    if op == _GET_NUMBER_OF_SEGMENTS:
        return 1
    if op == _GET_SEGMENT:
        return memoryview(_mapped)
    if op == _WRITE_PREPARE:
        length = args[1]
        first = _offset // vb_esp.SECTOR_SIZE
        last = (_offset + length + vb_esp.SECTOR_SIZE - 1) // vb_esp.SECTOR_SIZE
        for sector in range(first, last):
            vb_esp.flash_erase(sector)
        # what the cache now shows, updated here: reading it back would take heap the chip's
        # in-place flash access does not
        m = _mapped
        for i in range(min((last - first) * vb_esp.SECTOR_SIZE, len(m))):
            m[i] = 0xFF
        return _MIN_WRITE
    if op == _WRITE:
        at, data = args[1], args[2]
        if len(data) % _MIN_WRITE:
            data = bytes(data) + b"\xff" * (-len(data) % _MIN_WRITE)
        vb_esp.flash_write(_offset + at, data)
        m = _mapped
        for i in range(min(len(data), len(m) - at)):
            m[at + i] &= data[i]  # NOR flash: a write only clears bits
        return 0
    return -_EINVAL


def enable_rom_ioctl():
    global rom_ioctl
    rom_ioctl = _rom_ioctl


# -- the filesystem in flash (a board with filesystem: littlefs) --------------------------------


class FlashBdev:
    """ports/esp8266/modules/flashbdev.py, as the port freezes it: the flash's user sectors as
    a block device of 4 KiB blocks, through `esp` (here: the host's flash.bin)."""

    SEC_SIZE = 4096

    def __init__(self, start_sec, blocks):
        self.start_sec = start_sec
        self.blocks = blocks

    def readblocks(self, n, buf, off=0):
        vb_esp.flash_read((n + self.start_sec) * self.SEC_SIZE + off, buf)

    def writeblocks(self, n, buf, off=None):
        if off is None:
            vb_esp.flash_erase(n + self.start_sec)
            off = 0
        vb_esp.flash_write((n + self.start_sec) * self.SEC_SIZE + off, buf)

    def ioctl(self, op, arg):
        if op == 4:  # MP_BLOCKDEV_IOCTL_BLOCK_COUNT
            return self.blocks
        if op == 5:  # MP_BLOCKDEV_IOCTL_BLOCK_SIZE
            return self.SEC_SIZE
        if op == 6:  # MP_BLOCKDEV_IOCTL_BLOCK_ERASE
            vb_esp.flash_erase(arg + self.start_sec)
            return 0
        return None


def flash_bdev():
    """flashbdev.py's `bdev`: None below 1 MB of flash; 20 KiB at the end are the SDK's."""
    size = vb_esp.flash_size()
    if size < 1024 * 1024:
        return None
    start_sec = vb_esp.flash_user_start() // FlashBdev.SEC_SIZE
    if start_sec < 256:
        start_sec += 1  # reserve space for native code
    return FlashBdev(start_sec, (size - 20480) // FlashBdev.SEC_SIZE - start_sec)


FS_CORRUPTED = """\
The filesystem starting at sector %d with size %d sectors looks corrupt.
You may want to make a flash snapshot and try to recover it. Otherwise,
format it with vfs.VfsLfs2.mkfs(bdev), or completely erase the flash and
reprogram MicroPython.
"""


def mount_flash(on_corrupt):
    """The port's _boot.py and inisetup.setup(): mount the flash's filesystem at /; on a blank
    first block make a LittleFS v2 there ("Performing initial setup") and return True (boot.py
    is then to be written); a filesystem that does not mount and is not blank is corrupt:
    `on_corrupt(message)` is called, as inisetup.fs_corrupted() loops forever."""
    bdev = flash_bdev()
    if bdev is None:
        return False
    try:
        mount(bdev, "/")
        return False
    except OSError:
        pass
    buf = bytearray(bdev.SEC_SIZE)
    bdev.readblocks(0, buf)
    for b in buf:
        if b != 0xFF:
            on_corrupt(FS_CORRUPTED % (bdev.start_sec, bdev.blocks))
    print("Performing initial setup")
    VfsLfs2.mkfs(bdev)
    mount(VfsLfs2(bdev), "/")
    return True
