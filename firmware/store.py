# The store-and-forward sample buffer: one FIFO of fixed-size binary records, oldest first.
#
# The oldest samples live in a ring file on flash, the newest in a RAM ring in front of it;
# publishing always takes the oldest. Samples move RAM -> flash only in flush(), which the app
# calls every `buffer.flush_s` seconds while samples are pending (so a reset loses at most that
# many) and when RAM is nearly full. While the link is up, samples are acknowledged within a
# second and never touch flash.
#
#     store = Store(ram_samples=120, flash_samples=21600, path="samples.dat", batch=60)
#     store.push(boot, seq, t, kT, aT, aH, flags)     # ints in hundredths, None for null
#     n = store.take(60)          # mark up to 60 oldest untaken samples in flight and encode them
#     pid = client.publish(topic, store.batch(), qos=1)   # the protocol's JSON array payload
#     store.commit(n)             # when that publish's PUBACK came (batches complete in order)
#     store.rewind()              # after a disconnect: everything in flight is pending again
#
# Concurrency: push() may run in a scheduled (soft IRQ) callback that interrupts any other method.
# The RAM ring is single-producer/single-consumer: push() writes only `_in` and the slot it
# fills, every other method (the main loop's) writes only `_out`, so neither can lose the other's
# update. push() never touches flash and never allocates; if RAM is full (the app did not flush
# in time) the new sample is not stored and is counted in `overruns`.
#
# Flash ring file (`path`): a header record, then `capacity` slots of RECORD_SIZE bytes. Record
# number `lsn` (a log sequence number, +1 per record for the life of the file) lives in slot
# lsn % capacity and carries its own lsn and a CRC, so a slot left torn or stale by a reset is
# recognised. Writes are appends at the head; nothing is rewritten per sample. Which records are
# still pending is kept in a small append-only journal (`path` + ".j0" / ".j1", alternating when
# one grows past JOURNAL_MAX entries) of (tail, head) pairs written when the tail moves (a commit
# of flash records, or an overflow). On open, the head is found by reading forward from the last
# journalled head while the slots hold the expected lsns, so recovery reads only what was written
# since. On overflow the journal entry for the new tail is written *before* the slots it frees are
# overwritten, so a reset between the two never resurrects overwritten slots.
#
# Wear: on a FAT filesystem every file flush rewrites the directory sector; format the board's
# filesystem as LittleFS (vfs.VfsLfs2), which spreads writes, when the spill file will be used.

import os
import struct

from micropython import const
from protocol import SAMPLE_FIELDS

# The record stores the sample fields in exactly the protocol's order.
if tuple(SAMPLE_FIELDS) != ("boot", "seq", "t", "kT", "aT", "aH", "flags"):
    raise ImportError("store.py's record layout does not match protocol.SAMPLE_FIELDS")
del SAMPLE_FIELDS

# lsn, boot, seq, t (u32) | kT (i32) | aT, aH (i16) | flags (u16) | crc (u16)
_RECORD = "<IIIIihhHH"
RECORD_SIZE = const(28)
CRC_AT = const(26)
_AT_BOOT = const(4)
_AT_SEQ = const(8)
_AT_TIME = const(12)
_AT_KT = const(16)
_AT_AT = const(20)
_AT_AH = const(22)
_AT_FLAGS = const(24)
# Null sentinels: outside every sensor's range (kT -270..1800 C, aT -46..130 C, aH -6..120 %RH).
NULL_KT = -0x80000000
NULL_16 = -0x8000

JOURNAL_ENTRY = "<IIH"  # tail lsn, head lsn, crc of the first 8 bytes
JOURNAL_SIZE = const(10)
JOURNAL_MAX = const(400)  # entries per journal file before switching to the other one
READ_CHUNK = const(16)  # flash records read per file read while encoding (and recovering)
# Longest encoding of one record: [u32,u32,u32,i32,i16,i16,u16], plus a separating comma.
_JSON_RECORD_MAX = const(67)

# CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) with a 16-entry table: two lookups per byte.
_CRC_TABLE = (
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50A5, 0x60C6, 0x70E7,
    0x8108, 0x9129, 0xA14A, 0xB16B, 0xC18C, 0xD1AD, 0xE1CE, 0xF1EF,
)  # fmt: skip


def crc16(buf, start, end):
    table = _CRC_TABLE
    crc = 0xFFFF
    for i in range(start, end):
        b = buf[i]
        crc = ((crc << 4) & 0xFFFF) ^ table[(crc >> 12) ^ (b >> 4)]
        crc = ((crc << 4) & 0xFFFF) ^ table[(crc >> 12) ^ (b & 0x0F)]
    return crc


def seal(buf, off, end):
    """Write the CRC of buf[off:end] little-endian at buf[end]."""
    crc = crc16(buf, off, end)
    buf[end] = crc & 0xFF
    buf[end + 1] = crc >> 8


def sealed(buf, off, end):
    return crc16(buf, off, end) == buf[end] | buf[end + 1] << 8


def remove_file(path):
    try:
        os.remove(path)
    except OSError:
        pass


def u32(buf, at):
    return buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16 | buf[at + 3] << 24


class Store:
    def __init__(self, ram_samples, flash_samples=0, path="samples.dat", batch=60, reserve=0):
        if ram_samples < 1 or flash_samples < 0 or batch < 1:
            raise ValueError("ram_samples and batch must be >= 1, flash_samples >= 0")
        self.ram_capacity = ram_samples
        self._ram = bytearray(ram_samples * RECORD_SIZE)
        self._ram_view = memoryview(self._ram)
        self._in = 0  # samples ever pushed into RAM (written by push only)
        self._out = 0  # samples ever moved out of RAM (written by the main loop only)
        # RAM-only mode: flush() drops the oldest so that this many slots stay free for push().
        self.reserve = reserve or max(1, ram_samples // 4)
        self.capacity = 0  # flash slots (0: RAM only)
        self._tail = 0  # lsn of the oldest record on flash
        self._head = 0  # lsn the next record written to flash gets
        self._taken = 0  # oldest records in flight (taken, not yet committed)
        self._ghosts = 0  # in-flight records dropped by an overflow; their commit is absorbed
        self.dropped = 0  # oldest samples dropped because the buffer overflowed
        self.overruns = 0  # new samples push() could not store: RAM full, not flushed in time
        self.torn = 0  # flash records found damaged (a reset while writing) and skipped
        self._torn_upto = -1  # highest lsn counted in torn
        self.batch_max = batch
        self.batch_samples = 0  # samples encoded by the last take()
        self._out_buf = bytearray(2 + batch * _JSON_RECORD_MAX)
        self._out_view = memoryview(self._out_buf)
        self._out_len = 0
        self._digits = bytearray(10)
        self._chunk = bytearray(READ_CHUNK * RECORD_SIZE)
        self._journal_buf = bytearray(JOURNAL_SIZE)
        self.path = path
        self._file = None
        self._journal = None
        self._journal_index = 0
        self._journal_entries = 0
        if flash_samples:
            # opening (and recovering) the ring is boot-time code: loaded for it, then unloaded
            import sys

            import store_open

            store_open.open_ring(self, flash_samples)
            sys.modules.pop("store_open")

    # --- the sampling side ---------------------------------------------------------------

    def push(self, boot, seq, t, kT, aT, aH, flags):
        """Append a sample (values in hundredths or None). Allocation-free; never blocks."""
        n = self._in
        if n - self._out >= self.ram_capacity:
            self.overruns += 1
            return False
        struct.pack_into(
            _RECORD,
            self._ram,
            (n % self.ram_capacity) * RECORD_SIZE,
            0,
            boot,
            seq,
            t,
            NULL_KT if kT is None else kT,
            NULL_16 if aT is None else aT,
            NULL_16 if aH is None else aH,
            flags,
            0,
        )
        self._in = n + 1
        return True

    # --- depths ----------------------------------------------------------------------------

    def depth(self):
        """Samples held (RAM + flash), including those in flight."""
        return self._head - self._tail + self._in - self._out

    def ram_depth(self):
        return self._in - self._out

    def flash_depth(self):
        return self._head - self._tail

    def pending(self):
        """Samples not yet taken for publishing."""
        return self.depth() - self._taken

    def inflight(self):
        return self._taken

    def ram_oldest_seq(self):
        """seq of the oldest sample in RAM, or -1: lets the app flush once it is flush_s old."""
        if self._in == self._out:
            return -1
        return struct.unpack_from("<I", self._ram, (self._out % self.ram_capacity) * RECORD_SIZE + _AT_SEQ)[0]

    # --- publishing ------------------------------------------------------------------------

    def take(self, n):
        """Mark up to n of the oldest untaken samples as in flight and encode them as the
        protocol's data payload (see batch()). Returns how many FIFO positions were taken: pass
        that number to commit() once the publish is acknowledged. batch_samples says how many
        samples the payload holds: 0 only if every taken flash record was damaged (counted in
        `torn`), and then commit() at once instead of publishing "[]"."""
        pending = self.pending()
        if n > pending:
            n = pending
        if n > self.batch_max:
            n = self.batch_max
        out = self._out_buf
        out[0] = 0x5B  # [
        pos = 1
        samples = 0
        flash = self._head - self._tail
        index = self._taken
        end = index + n
        while index < end:
            if index < flash:
                lsn = self._tail + index
                slot = lsn % self.capacity
                run = end - index
                if run > flash - index:
                    run = flash - index
                if run > READ_CHUNK:
                    run = READ_CHUNK
                if run > self.capacity - slot:
                    run = self.capacity - slot
                chunk = self._chunk
                got = self._read_slots(slot, run)
                for j in range(run):
                    off = j * RECORD_SIZE
                    if off + RECORD_SIZE <= got and self._valid(chunk, off, lsn + j):
                        pos = self._encode(chunk, off, pos, samples)
                        samples += 1
                    elif lsn + j > self._torn_upto:
                        self.torn += 1
                        self._torn_upto = lsn + j
                index += run
            else:
                off = ((self._out + index - flash) % self.ram_capacity) * RECORD_SIZE
                pos = self._encode(self._ram, off, pos, samples)
                samples += 1
                index += 1
        out[pos] = 0x5D  # ]
        self._out_len = pos + 1
        self._taken += n
        self.batch_samples = samples
        return n

    def batch(self):
        """The payload encoded by the last take(): a memoryview valid until the next take()."""
        return self._out_view[: self._out_len]

    def commit(self, n):
        """Drop the n oldest in-flight samples: their publish was acknowledged."""
        ghosts = n if n < self._ghosts else self._ghosts
        self._ghosts -= ghosts
        n -= ghosts
        if n > self._taken:
            raise ValueError("commit(%d) but only %d samples are in flight" % (n, self._taken))
        self._taken -= n
        flash = self._head - self._tail
        from_flash = n if n < flash else flash
        if from_flash:
            self._tail += from_flash
            self._write_journal()
        self._out += n - from_flash

    def rewind(self):
        """After a disconnect: nothing is in flight any more, the next take() starts oldest."""
        self._taken = 0
        self._ghosts = 0

    def record(self, i):
        """The i-th oldest sample as a tuple in SAMPLE_FIELDS order (None for null values), or
        None if its flash record is damaged. Allocates: for tests, debugging and health reports."""
        flash = self._head - self._tail
        if not 0 <= i < self.depth():
            raise IndexError("store index out of range")
        if i < flash:
            lsn = self._tail + i
            got = self._read_slots(lsn % self.capacity, 1)
            if got < RECORD_SIZE or not self._valid(self._chunk, 0, lsn):
                return None
            buf, off = self._chunk, 0
        else:
            buf, off = self._ram, ((self._out + i - flash) % self.ram_capacity) * RECORD_SIZE
        fields = struct.unpack_from(_RECORD, buf, off)
        kt, at, ah = fields[4], fields[5], fields[6]
        return (
            fields[1],
            fields[2],
            fields[3],
            None if kt == NULL_KT else kt,
            None if at == NULL_16 else at,
            None if ah == NULL_16 else ah,
            fields[7],
        )

    # --- RAM -> flash ----------------------------------------------------------------------

    def flush(self):
        """Move every sample in RAM to flash (RAM-only: drop the oldest beyond the reserve).
        Returns how many samples were written."""
        end = self._in
        n = end - self._out
        if not self.capacity:
            excess = n - (self.ram_capacity - self.reserve)
            if excess > 0:
                self._out += excess
                self._lost(excess)
            return 0
        if not n:
            return 0
        cap = self.capacity
        excess = self._head - self._tail + n - cap
        if excess > 0:
            from_flash = excess if excess < self._head - self._tail else self._head - self._tail
            self._tail += from_flash
            self._lost(from_flash)
            excess -= from_flash
            if excess:  # more new samples than flash slots: keep only the newest cap
                self._out += excess
                self._lost(excess)
                n -= excess
            # The new tail is on flash before its slots are overwritten: a reset in between must
            # not make recovery take the overwritten slots for the oldest records.
            self._write_journal()
        ram = self._ram
        rcap = self.ram_capacity
        src = self._out
        lsn = self._head
        left = n
        f = self._file
        while left:
            slot = lsn % cap
            first = src % rcap
            run = left
            if run > rcap - first:
                run = rcap - first
            if run > cap - slot:
                run = cap - slot
            for k in range(run):
                off = (first + k) * RECORD_SIZE
                struct.pack_into("<I", ram, off, lsn + k)
                seal(ram, off, off + CRC_AT)
            f.seek((1 + slot) * RECORD_SIZE)
            f.write(self._ram_view[first * RECORD_SIZE : (first + run) * RECORD_SIZE])
            lsn += run
            src += run
            left -= run
        f.flush()
        self._head = lsn
        self._out = src
        return n

    def _lost(self, k):
        """k of the oldest samples were dropped; any of them in flight become ghosts."""
        self.dropped += k
        in_flight = k if k < self._taken else self._taken
        self._taken -= in_flight
        self._ghosts += in_flight

    # --- JSON encoding (allocation-free; 32-bit values as two 16-bit halves, because the
    # --- ESP8266's small ints have 31 bits and a Unix time does not fit) ------------------

    def _encode(self, buf, off, pos, index):
        out = self._out_buf
        if index:
            out[pos] = 0x2C  # ,
            pos += 1
        out[pos] = 0x5B
        pos = self._put_u32(buf, off + _AT_BOOT, pos + 1)
        out[pos] = 0x2C
        pos = self._put_u32(buf, off + _AT_SEQ, pos + 1)
        out[pos] = 0x2C
        pos = self._put_u32(buf, off + _AT_TIME, pos + 1)
        out[pos] = 0x2C
        pos = self._put_i32(buf, off + _AT_KT, pos + 1)
        out[pos] = 0x2C
        pos = self._put_i16(buf, off + _AT_AT, pos + 1)
        out[pos] = 0x2C
        pos = self._put_i16(buf, off + _AT_AH, pos + 1)
        out[pos] = 0x2C
        pos = self._put_int(buf[off + _AT_FLAGS] | buf[off + _AT_FLAGS + 1] << 8, pos + 1)
        out[pos] = 0x5D
        return pos + 1

    def _put_u32(self, buf, at, pos):
        lo = buf[at] | buf[at + 1] << 8
        hi = buf[at + 2] | buf[at + 3] << 8
        digits = self._digits
        n = 0
        while True:  # long division of hi:lo by 10, with every intermediate < 2**20
            rem = hi % 10
            hi //= 10
            x = rem << 16 | lo
            lo = x // 10
            digits[n] = 0x30 + x - lo * 10
            n += 1
            if not hi and not lo:
                break
        out = self._out_buf
        while n:
            n -= 1
            out[pos] = digits[n]
            pos += 1
        return pos

    def _put_i32(self, buf, at, pos):
        low = buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16
        top = buf[at + 3]
        if top == 0:
            return self._put_int(low, pos)
        if top == 0xFF:
            return self._put_int(low - 0x1000000, pos)
        if top == 0x80 and low == 0:
            return self._put_null(pos)
        # Beyond +-2**23 hundredths: never a real reading, but encode it faithfully.
        text = b"%d" % struct.unpack_from("<i", buf, at)[0]
        self._out_buf[pos : pos + len(text)] = text
        return pos + len(text)

    def _put_i16(self, buf, at, pos):
        value = buf[at] | buf[at + 1] << 8
        if value == 0x8000:
            return self._put_null(pos)
        return self._put_int(value - 0x10000 if value & 0x8000 else value, pos)

    def _put_int(self, value, pos):
        out = self._out_buf
        if value < 0:
            out[pos] = 0x2D  # -
            pos += 1
            value = -value
        digits = self._digits
        n = 0
        while True:
            q = value // 10
            digits[n] = 0x30 + value - q * 10
            n += 1
            value = q
            if not value:
                break
        while n:
            n -= 1
            out[pos] = digits[n]
            pos += 1
        return pos

    def _put_null(self, pos):
        out = self._out_buf
        out[pos] = 0x6E  # n
        out[pos + 1] = 0x75  # u
        out[pos + 2] = 0x6C  # l
        out[pos + 3] = 0x6C  # l
        return pos + 4

    # --- the flash ring file -------------------------------------------------------------

    def _read_slots(self, slot, count):
        """Read count records from slot on into _chunk; returns the bytes read."""
        f = self._file
        f.seek((1 + slot) * RECORD_SIZE)
        got = f.readinto(self._chunk, count * RECORD_SIZE)
        return got or 0

    def _valid(self, buf, off, lsn):
        return u32(buf, off) == lsn and sealed(buf, off, off + CRC_AT)

    # --- the journal of (tail, head) -----------------------------------------------------

    def _journal_path(self, index):
        return "%s.j%d" % (self.path, index)

    def _write_journal(self):
        buf = self._journal_buf
        struct.pack_into(JOURNAL_ENTRY, buf, 0, self._tail, self._head, 0)
        seal(buf, 0, 8)
        if self._journal_entries >= JOURNAL_MAX:
            # Start the other file with this entry, then drop the full one: at every moment one
            # of the two holds the newest entry (both are read on open, the larger pair wins).
            old = self._journal_index
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self._journal_index = 1 - old
            with open(self._journal_path(self._journal_index), "wb") as f:
                f.write(buf)
            remove_file(self._journal_path(old))
            self._journal_entries = 1
            return
        if self._journal is None:
            self._journal = open(self._journal_path(self._journal_index), "ab")  # noqa: SIM115
        self._journal.write(buf)
        self._journal.flush()
        self._journal_entries += 1

    def close(self):
        for f in (self._file, self._journal):
            if f is not None:
                f.close()
        self._file = None
        self._journal = None
