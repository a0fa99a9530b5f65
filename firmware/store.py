# The store-and-forward sample buffer: one FIFO of fixed-size binary records, oldest first.
#
# The oldest samples live in segment files on flash, the newest in a RAM ring in front of them;
# publishing always takes the oldest. Samples move RAM -> flash only in flush(), which the app
# calls every `buffer.flush_s` seconds while samples are pending (so a reset loses at most that
# many) and when RAM is nearly full. While the link is up, samples are acknowledged within a
# second and never touch flash.
#
#     store = Store(ram_samples=120, flash_samples=21600, path="fifo", batch=60)
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
# Flash FIFO (`path`, a directory): append-only segment files, because the port's filesystem is
# LittleFS v2 on 4 KiB blocks (ports/esp8266/modules/flashbdev.py, inisetup.py) and LittleFS is
# copy-on-write: a write into the middle of a file copies everything after it into new blocks on
# every flush (a 600 KB ring file rewritten per flush ran the 1 MB filesystem of a 2 MB board out
# of space). An append copies at most the file's last block (littlefs lfs_ctz_extend), and a
# whole-file delete frees blocks without writing any. So: record number `lsn` (a log sequence
# number, +1 per record for the life of the FIFO) lives in segment file `path/<lsn // SEG_RECORDS>`
# at record lsn % SEG_RECORDS; a segment is 16 flash blocks; flush() appends to the
# newest segment (one block erased and programmed per flush), a segment is deleted once every
# record in it is committed or dropped, and the tail (the oldest pending lsn)
# is written to `path/tail` (6 bytes, replaced whole) when a commit moves it. Each record carries
# its own lsn and a CRC, so a record a reset left torn (not on LittleFS, whose syncs are atomic)
# or a missing one is recognised and skipped. The FIFO holds at most `capacity` records; on
# overflow the oldest are dropped (counted) a whole segment at a time and their files deleted.
# A flush that fails (OSError, ENOSPC included) never raises: it is counted in `flash_errors`,
# what reached the file stays, the rest stays in RAM (the oldest dropped and counted if RAM
# fills), and an ENOSPC drops the oldest segment to make room for the next try.
#
# Why segments of several blocks: LittleFS's cost per flush is mostly per file, not per byte. Its
# block allocator rescans the whole filesystem whenever its lookahead window (256 blocks) is used
# up, about every 60 flushes here, reading every file's directory entry through a 32-byte read
# (extmod/vfs_lfsx.c: readsize 32, cache 128), and the directory's log is compacted about as
# often, with reads growing with the entries in it. With one-block segments a full 6-hour FIFO
# (148 files) made the worst of 3,000 flushes read the flash ~98,000 times (several seconds on a
# chip, past the SDK watchdog's 1.6 s) and opening the FIFO ~21,000 times; 16-block segments (10
# files) ~8,100 and ~3,500 (8 blocks: 14,200 and 6,400); in a week's outage 9,044 and 2,818
# (tests/test_fw_store_littlefs.py counts and bounds them). Larger segments would not save much
# more (a directory compaction alone reads ~7,400 times), would drop more at once on overflow (a
# segment, 39 minutes of samples, at a time) and would not fit a 6-hour FIFO on a 2 MB board (see
# store_open._fitting).

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

# Records per segment file: 65,408 bytes, 16 LittleFS blocks of 4 KiB less the 104 bytes of
# pointers that blocks 1-15 of a file begin with (lib/littlefs lfs2_ctz_extend), and 24 spare.
SEG_RECORDS = const(2336)
TAIL_FILE = "tail"  # in the FIFO's directory: "<I" tail lsn + crc16
_ENOSPC = const(28)
_ENOENT = const(2)
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


def u32(buf, at):
    return buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16 | buf[at + 3] << 24


class Store:
    def __init__(self, ram_samples, flash_samples=0, path="fifo", batch=60, reserve=0):
        if ram_samples < 1 or flash_samples < 0 or batch < 1:
            raise ValueError("ram_samples and batch must be >= 1, flash_samples >= 0")
        self.ram_capacity = ram_samples
        self._ram = bytearray(ram_samples * RECORD_SIZE)
        self._ram_view = memoryview(self._ram)
        self._in = 0  # samples ever pushed into RAM (written by push only)
        self._out = 0  # samples ever moved out of RAM (written by the main loop only)
        # RAM-only mode: flush() drops the oldest so that this many slots stay free for push().
        self.reserve = reserve or max(1, ram_samples // 4)
        self.capacity = 0  # flash FIFO records at most (0: RAM only)
        self._tail = 0  # lsn of the oldest record on flash
        self._head = 0  # lsn the next record written to flash gets
        self._taken = 0  # oldest records in flight (taken, not yet committed)
        self._ghosts = 0  # in-flight records dropped by an overflow; their commit is absorbed
        self.dropped = 0  # oldest samples dropped because the buffer overflowed
        self.overruns = 0  # new samples push() could not store: RAM full, not flushed in time
        self.torn = 0  # flash records found damaged or missing (a reset while writing) and skipped
        self.flash_errors = 0  # flash operations that failed (OSError), sampling went on
        self._torn_upto = -1  # highest lsn counted in torn
        self.batch_max = batch
        self.batch_samples = 0  # samples encoded by the last take()
        self._out_buf = bytearray(2 + batch * _JSON_RECORD_MAX)
        self._out_view = memoryview(self._out_buf)
        self._out_len = 0
        self._digits = bytearray(10)
        self._chunk = bytearray(READ_CHUNK * RECORD_SIZE)
        self._tail_buf = bytearray(6)
        self.path = path
        self._rfile = None  # the segment file open for reading, and its number
        self._rseg = -1
        if flash_samples:
            # opening (and recovering) the FIFO is boot-time code: loaded for it, then unloaded
            import sys

            import store_open

            store_open.open_fifo(self, flash_samples)
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
                slot = lsn % SEG_RECORDS
                run = end - index
                if run > flash - index:
                    run = flash - index
                if run > READ_CHUNK:
                    run = READ_CHUNK
                if run > SEG_RECORDS - slot:
                    run = SEG_RECORDS - slot
                chunk = self._chunk
                got = self._read_records(lsn, run)
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
            self._move_tail(self._tail + from_flash)
            self._write_tail()
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
            got = self._read_records(lsn, 1)
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
        Returns how many samples were written. Never raises for the flash: see the top."""
        n = self._in - self._out
        if not self.capacity:
            self._drop_ram_beyond_reserve()
            return 0
        if not n:
            return 0
        flash = self._head - self._tail
        excess = flash + n - self.capacity
        if excess > 0:
            tail = self._tail + (excess if excess < flash else flash)
            if tail % SEG_RECORDS and self.capacity >= 2 * SEG_RECORDS:
                # Whole segments: the tail stays at a segment's start, which recovery finds
                # from the files alone (no tail write per flush while the buffer overflows).
                boundary = tail - tail % SEG_RECORDS + SEG_RECORDS
                if boundary <= self._head:
                    tail = boundary
            excess -= tail - self._tail
            self._lost(tail - self._tail)
            self._move_tail(tail)
            if tail % SEG_RECORDS:
                self._write_tail()  # within a segment: a reset must not bring the dropped back
            if excess > 0:  # more new samples than the FIFO holds: keep only the newest
                self._out += excess
                self._lost(excess)
                n -= excess
        written = 0
        while written < n:
            head = self._head
            try:
                written += self._append(n - written)
            except OSError as e:
                self.flash_errors += 1
                written += self._recover_head(head)
                if e.args and e.args[0] == _ENOSPC:
                    self._make_room()
                break
        if written < n:
            self._drop_ram_beyond_reserve()
        return written

    def _append(self, left):
        """Append up to `left` of the oldest RAM samples to the head's segment file (never past
        its end); returns how many."""
        lsn = self._head
        seg = lsn // SEG_RECORDS
        slot = lsn % SEG_RECORDS
        if left > SEG_RECORDS - slot:
            left = SEG_RECORDS - slot
        if self._rseg == seg:
            self._close_reader()  # it would not see the appended records
        ram = self._ram
        rcap = self.ram_capacity
        src = self._out
        f = open(self._segment_path(seg), "ab" if slot else "wb")  # noqa: SIM115 - closed below
        try:
            done = 0
            while done < left:
                first = (src + done) % rcap
                run = left - done
                if run > rcap - first:
                    run = rcap - first
                for k in range(run):
                    off = (first + k) * RECORD_SIZE
                    struct.pack_into("<I", ram, off, lsn + done + k)
                    seal(ram, off, off + CRC_AT)
                size = run * RECORD_SIZE
                if f.write(self._ram_view[first * RECORD_SIZE : first * RECORD_SIZE + size]) != size:
                    raise OSError(_ENOSPC)
                done += run
        finally:
            f.close()
        self._head = lsn + left
        self._out = src + left
        return left

    def _recover_head(self, head):
        """After a failed append at `head`: what reached the segment file is written (its samples
        leave RAM); returns how many. A file left with a partial record, or shorter than the
        head, is not appended to again: the head moves to the next segment, and the records in
        between are missing (skipped and counted in `torn` when read)."""
        seg = head // SEG_RECORDS
        base = seg * SEG_RECORDS
        try:
            size = os.stat(self._segment_path(seg))[6]
        except OSError:
            size = 0
        end = base + size // RECORD_SIZE
        moved = end - head if end > head else 0
        self._out += moved
        self._head = head + moved
        if size % RECORD_SIZE or end < head:
            self._head = base + SEG_RECORDS
        return moved

    def _make_room(self):
        """The filesystem is full: drop the oldest segment and hold no more than is left."""
        flash = self._head - self._tail
        if not flash:
            return
        end = (self._tail // SEG_RECORDS + 1) * SEG_RECORDS
        if end > self._head:
            end = self._head
        self._lost(end - self._tail)
        self._move_tail(end)
        held = self._head - self._tail
        self.capacity = held if held > SEG_RECORDS else SEG_RECORDS
        print("labfleet: the filesystem is full: flash buffer cut to %d samples" % self.capacity)

    def _drop_ram_beyond_reserve(self):
        """Keep `reserve` RAM slots free for push(): drop the oldest RAM samples beyond."""
        excess = self._in - self._out - (self.ram_capacity - self.reserve)
        if excess > 0:
            self._out += excess
            self._lost(excess)

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

    # --- the segment files -------------------------------------------------------------

    def _segment_path(self, seg):
        return "%s/%d" % (self.path, seg)

    def _tail_path(self):
        return "%s/%s" % (self.path, TAIL_FILE)

    def _read_records(self, lsn, count):
        """Read count records from lsn on (one segment) into _chunk; returns the bytes read (0
        for a missing segment)."""
        seg = lsn // SEG_RECORDS
        try:
            if self._rseg != seg:
                self._close_reader()
                self._rfile = open(self._segment_path(seg), "rb")  # noqa: SIM115 - kept open
                self._rseg = seg
            f = self._rfile
            f.seek((lsn % SEG_RECORDS) * RECORD_SIZE)
            return f.readinto(self._chunk, count * RECORD_SIZE) or 0
        except OSError:
            return 0

    def _close_reader(self):
        if self._rfile is not None:
            self._rfile.close()
        self._rfile = None
        self._rseg = -1

    def _valid(self, buf, off, lsn):
        return u32(buf, off) == lsn and sealed(buf, off, off + CRC_AT)

    def _move_tail(self, tail):
        """The oldest pending record is now `tail`: delete the segments wholly before it."""
        seg = self._tail // SEG_RECORDS
        self._tail = tail
        first = tail // SEG_RECORDS
        while seg < first:
            if self._rseg == seg:
                self._close_reader()
            try:
                os.remove(self._segment_path(seg))
            except OSError as e:
                if e.args[0] != _ENOENT:  # a missing segment is a hole already counted
                    self.flash_errors += 1
            seg += 1

    def _write_tail(self):
        buf = self._tail_buf
        struct.pack_into("<I", buf, 0, self._tail)
        seal(buf, 0, 4)
        try:
            with open(self._tail_path(), "wb") as f:
                f.write(buf)
        except OSError:
            self.flash_errors += 1  # a reset sends the committed ones again: the recorder drops them

    def close(self):
        self._close_reader()
