# Opening the store's flash ring file at boot: create it, or recover where its records begin and
# end after a reset (see store.py for the file format and the journal). Store() imports this
# module, calls open_ring() and unloads it again: this code runs once per boot, and on the
# ESP8266 every byte of resident code is heap the app cannot use.

import os
import struct

from micropython import const
from store import (
    CRC_AT,
    JOURNAL_ENTRY,
    JOURNAL_MAX,
    JOURNAL_SIZE,
    READ_CHUNK,
    RECORD_SIZE,
    remove_file,
    seal,
    sealed,
    u32,
)

_MAGIC = b"LFSB"
_FORMAT_VERSION = const(1)
_HEADER = "<4sHHI"  # magic, format version, record size, capacity; crc at CRC_AT
_FLASH_SHARE = const(4)  # the flash ring may take 3/4 of the free filesystem space


def open_ring(store, capacity):
    """Open store.path as the store's flash ring of `capacity` records (a new ring if the file
    is missing or not a ring; the old ring's size until it is empty if the size changed)."""
    capacity = _fitting(store.path, capacity)
    if not capacity:
        return  # RAM only
    try:
        f = open(store.path, "r+b")  # noqa: SIM115 - open for the store's lifetime
    except OSError:
        f = None
    file_capacity = _read_header(store, f) if f is not None else 0
    if not file_capacity:
        if f is not None:
            f.close()
        _create(store, capacity, 0)
        return
    store._file = f
    store.capacity = file_capacity
    entry = _read_journals(store)
    if entry is None:
        _scan(store)
    else:
        tail, head = entry
        head = _find_head(store, head)
        if tail < head - file_capacity:
            tail = head - file_capacity
        store._tail = tail
        store._head = head
    if file_capacity != capacity and store._head == store._tail:
        # The configured size changed: it takes effect once the old ring is empty, so no
        # sample is lost to a resize.
        f.close()
        store._file = None
        _create(store, capacity, store._head)


def _fitting(path, wanted):
    """The flash ring's size: as configured, but never more than the filesystem can hold."""
    try:
        st = os.statvfs("/")
        free = st[0] * st[4]
    except OSError:
        return wanted
    try:
        free += os.stat(path)[6]
    except OSError:
        pass
    most = free * (_FLASH_SHARE - 1) // _FLASH_SHARE // RECORD_SIZE
    if wanted > most:
        print("labfleet: flash ring cut to %d samples: the filesystem is too small" % most)
        return most
    return wanted


def _slot_holds(store, lsn):
    got = store._read_slots(lsn % store.capacity, 1)
    return got == RECORD_SIZE and store._valid(store._chunk, 0, lsn)


def _find_head(store, lsn):
    """The first lsn from `lsn` on that was never written. A damaged record followed by valid
    ones (a flipped bit, not a torn write at the head) does not end the ring: it is skipped and
    counted when read."""
    while True:
        if _slot_holds(store, lsn):
            lsn += 1
            continue
        for ahead in range(1, READ_CHUNK + 1):
            if _slot_holds(store, lsn + ahead):
                lsn += ahead + 1
                break
        else:
            return lsn


def _read_header(store, f):
    header = store._chunk
    f.seek(0)
    if f.readinto(header, RECORD_SIZE) != RECORD_SIZE or not sealed(header, 0, CRC_AT):
        return 0
    magic, version, record_size, capacity = struct.unpack_from(_HEADER, header, 0)
    if magic != _MAGIC or version != _FORMAT_VERSION or record_size != RECORD_SIZE:
        return 0
    return capacity


def _create(store, capacity, lsn):
    """A new, empty ring file whose next record is number lsn."""
    header = bytearray(RECORD_SIZE)
    struct.pack_into(_HEADER, header, 0, _MAGIC, _FORMAT_VERSION, RECORD_SIZE, capacity)
    seal(header, 0, CRC_AT)
    with open(store.path, "wb") as f:
        f.write(header)
    store._file = open(store.path, "r+b")  # noqa: SIM115 - open for the store's lifetime
    store.capacity = capacity
    store._tail = lsn
    store._head = lsn
    for index in (0, 1):
        remove_file(store._journal_path(index))
    store._journal = None
    store._journal_entries = JOURNAL_MAX  # the first entry starts a fresh journal file
    store._write_journal()


def _scan(store):
    """Recovery without a journal: the newest valid record, then back while contiguous."""
    cap = store.capacity
    chunk = store._chunk
    newest = -1
    slot = 0
    while slot < cap:
        run = cap - slot if cap - slot < READ_CHUNK else READ_CHUNK
        got = store._read_slots(slot, run)
        if got < RECORD_SIZE:
            break
        for j in range(got // RECORD_SIZE):
            off = j * RECORD_SIZE
            lsn = u32(chunk, off)
            if lsn > newest and lsn % cap == slot + j and sealed(chunk, off, off + CRC_AT):
                newest = lsn
        slot += run
    if newest < 0:
        store._tail = store._head = 0
        return
    tail = newest
    while tail > 0 and tail > newest - cap + 1 and _slot_holds(store, tail - 1):
        tail -= 1
    store._tail = tail
    store._head = newest + 1
    store._journal_entries = JOURNAL_MAX
    store._write_journal()


def _read_journals(store):
    """The newest valid (tail, head) of both journal files; remembers which file has it."""
    best = None
    buf = store._journal_buf
    for index in (0, 1):
        try:
            f = open(store._journal_path(index), "rb")  # noqa: SIM115 - closed in finally
        except OSError:
            continue
        try:
            entries = f.seek(0, 2) // JOURNAL_SIZE
            k = entries
            while k > 0:
                k -= 1
                f.seek(k * JOURNAL_SIZE)
                if f.readinto(buf) == JOURNAL_SIZE and sealed(buf, 0, 8):
                    tail, head, _ = struct.unpack_from(JOURNAL_ENTRY, buf, 0)
                    if tail <= head and (best is None or (tail, head) > best):
                        best = (tail, head)
                        store._journal_index = index
                        store._journal_entries = entries
                    break
        finally:
            f.close()
    return best
