# Opening the store's flash FIFO at boot: create its directory, or recover where its records
# begin and end after a reset (see store.py for the segment files and the tail file). Store()
# imports this module, calls open_fifo() and unloads it again: this code runs once per boot, and
# on the ESP8266 every byte of resident code is heap the app cannot use.

import os
import struct

from micropython import const
from store import RECORD_SIZE, SEG_RECORDS, sealed

_FLASH_SHARE = const(4)  # the segments may take 3/4 of the filesystem's free blocks
# Bytes of a LittleFS file block that hold no data: block i > 0 of a file starts with ctz(i) + 1
# pointers of 4 bytes (lib/littlefs lfs2_ctz_extend), two on average (a whole segment's 16
# blocks: 6.5). Counted as two for the blocks a segment file holds, as three for new records.
_HELD_POINTERS = const(8)
_NEW_POINTERS = const(12)
_DIR_MODE = const(0x4000)
# The flash ring of firmware before the segment files: a 600 KB file rewritten in the middle on
# every flush, which LittleFS cannot afford. Removed (what it held is not read) for the room.
_LEGACY = ("samples.dat", "samples.dat.j0", "samples.dat.j1")


def open_fifo(store, capacity):
    """Open store.path as the store's flash FIFO of at most `capacity` records (fewer when the
    filesystem cannot hold that many segments)."""
    path = store.path
    for name in _LEGACY:
        try:
            os.remove(name)
        except OSError:
            pass
    try:
        if os.stat(path)[0] & _DIR_MODE == 0:
            os.remove(path)  # not a FIFO directory (an older firmware's ring file): replaced
            os.mkdir(path)
    except OSError:
        try:
            os.mkdir(path)
        except OSError as e:
            print("labfleet: no flash buffer (%s: %s): RAM only" % (path, e))
            return
    segments = []
    sizes = []  # of the segment files, in bytes
    for entry in os.ilistdir(path):
        name = entry[0]
        if name.isdigit():
            segments.append(int(name))
            sizes.append(entry[3] if len(entry) > 3 else 0)
        elif name.endswith(".new"):  # a rewrite a reset cut short (the segment itself is whole)
            os.remove("%s/%s" % (path, name))
    capacity = _fitting(path, capacity, sizes)
    if not capacity:
        return  # RAM only (what is on flash stays until the filesystem has room again)
    store.capacity = capacity
    tail = _read_tail(store)
    if not segments:
        store._tail = store._head = tail if tail is not None else 0
        return
    segments.sort()
    newest = segments[-1]
    head = _segment_end(store, newest)
    oldest = segments[0] * SEG_RECORDS
    if tail is None or not oldest <= tail <= head:
        tail = oldest
    if head - tail > capacity:  # the configured size shrank: keep the newest
        store._lost(head - capacity - tail)
        tail = head - capacity
    store._tail = oldest
    store._head = head
    store._move_tail(tail)


def _segment_end(store, seg):
    """The lsn after the newest segment's last valid record. A file ending in a partial or
    damaged record (a reset in the middle of a write, on a filesystem without atomic syncs) is
    replaced by its valid records, so the next append lands where its lsns say."""
    base = seg * SEG_RECORDS
    try:
        size = os.stat(store._segment_path(seg))[6]
    except OSError:
        return base + SEG_RECORDS
    records = size // RECORD_SIZE
    if records > SEG_RECORDS:
        return base + SEG_RECORDS  # not written by this store: left alone, read as damaged
    keep = records
    while keep and not _holds(store, base + keep - 1):
        keep -= 1
    if keep < records or size % RECORD_SIZE:
        _rewrite_prefix(store, seg, keep)
    return base + keep


def _holds(store, lsn):
    got = store._read_records(lsn, 1)
    store._close_reader()
    return got == RECORD_SIZE and store._valid(store._chunk, 0, lsn)


def _rewrite_prefix(store, seg, keep):
    """Segment seg replaced by its first `keep` records (a new file renamed over it)."""
    path = store._segment_path(seg)
    new = path + ".new"
    chunk = store._chunk
    per_read = len(chunk) // RECORD_SIZE
    with open(new, "wb") as out:
        done = 0
        while done < keep:
            run = keep - done if keep - done < per_read else per_read
            got = store._read_records(seg * SEG_RECORDS + done, run)
            out.write(memoryview(chunk)[:got])
            done += run
    store._close_reader()
    os.rename(new, path)


def _read_tail(store):
    buf = store._tail_buf
    try:
        with open(store._tail_path(), "rb") as f:
            got = f.readinto(buf)
    except OSError:
        return None
    if got != len(buf) or not sealed(buf, 0, 4):
        return None
    return struct.unpack_from("<I", buf, 0)[0]


def _fitting(path, wanted, sizes):
    """The FIFO's size in records: as configured, but never more than the filesystem's blocks
    hold. Segment files of `sizes` bytes are there already. Records from the oldest
    segment's start to the head are on flash: up to `wanted` pending plus the committed part of
    the oldest segment (SEG_RECORDS - 1), and one block more while an append copies the last."""
    try:
        st = os.statvfs(path)
        block_size = st[0]
        per_block = (block_size - _NEW_POINTERS) // RECORD_SIZE
        blocks = st[3]  # free, and those the segments hold:
        held = block_size - _HELD_POINTERS
        for size in sizes:
            blocks += (size + held - 1) // held
    except OSError:
        return wanted
    most = (blocks * (_FLASH_SHARE - 1) // _FLASH_SHARE - 1) * per_block - SEG_RECORDS
    if most < 0:
        most = 0
    if wanted > most:
        print("labfleet: flash buffer cut to %d samples: the filesystem is too small" % most)
        return most
    return wanted
