"""firmware/store.py on the ESP8266 port's own filesystem: LittleFS v2 (the unix port's
`vfs.VfsLfs2`, the same extmod/lib/littlefs code the ESP8266 build links) on a block device
shaped like the port's `modules/flashbdev.py` (4 KiB sectors, erase before a block write), sized
as the port sizes it for a board's flash. The block device is RAM in the test's MicroPython
process and counts every sector erase and every byte programmed.

The virtual board's filesystem is this LittleFS too, in its flash.bin; here, without a board's
clock, a week of flushes runs in seconds and every erase is counted: where the store meets
LittleFS's copy-on-write (a write into the middle of a file copies everything after it on every
flush, an append copies at most the file's last block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fw_run import checked, compile_firmware, firmware_const, run_script
from vboard import flashfs

SECTOR = 4096
SEG_RECORDS = firmware_const("store", "SEG_RECORDS")  # records per segment file


# where flashbdev.py puts the filesystem (vboard/flashfs.py, the virtual board's own geometry)
BOARDS = {
    "2MB": flashfs.geometry(2 << 20).blocks,  # 251 sectors, ~1 MB
    "4MB": flashfs.geometry(4 << 20).blocks,  # 763 sectors, ~3 MB
}

BLOCK_DEVICE = """
import os, sys, vfs, json, store
from array import array

class FlashBdev:
    # ports/esp8266/modules/flashbdev.py over RAM: writeblocks without an offset erases the
    # sector first; ioctl 6 erases. NOR flash programs by clearing bits (AND).
    SEC_SIZE = 4096

    def __init__(self, blocks):
        self.blocks = blocks
        self.data = bytearray(b"\\xff" * (blocks * self.SEC_SIZE))
        self.view = memoryview(self.data)
        self.erases = 0
        self.reads = 0  # readblocks calls: on a board each is a Python call into esp.flash_read
        self.programmed = 0
        self.per_block = array("I", bytes(4 * blocks))  # erases per sector

    def readblocks(self, n, buf, off=0):
        self.reads += 1
        start = n * self.SEC_SIZE + off
        buf[:] = self.view[start : start + len(buf)]

    def writeblocks(self, n, buf, off=None):
        if off is None:
            self.ioctl(6, n)
            off = 0
        start = n * self.SEC_SIZE + off
        end = start + len(buf)
        if self.view[start:end] == b"\xff" * len(buf):
            self.view[start:end] = buf
        else:  # NOR flash programs by clearing bits
            data = self.data
            for i in range(len(buf)):
                data[start + i] &= buf[i]
        self.programmed += len(buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.SEC_SIZE
        if op == 6:
            self.erases += 1
            self.per_block[arg] += 1
            start = arg * self.SEC_SIZE
            self.view[start : start + self.SEC_SIZE] = b"\\xff" * self.SEC_SIZE
            return 0

bdev = FlashBdev(int(sys.argv[1]))
vfs.VfsLfs2.mkfs(bdev)  # inisetup.setup(), as on a board's first boot
vfs.mount(vfs.VfsLfs2(bdev), "/flash")
os.chdir("/flash")
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_firmware(tmp_path_factory.mktemp("fwlib"))


def run_on_littlefs(
    micropython_bin: str, lib: Path, cwd: Path, blocks: int, body: str, *args: str, timeout: float = 120
) -> Any:
    # The RAM flash image is in the interpreter's heap (up to 3 MB, made from a bytes of
    # the same size), plus the harness.
    heap = f"{2 * blocks * SECTOR // 1024 + 2048}K"
    result = run_script(
        micropython_bin, lib, BLOCK_DEVICE + body, cwd, heap=heap, args=(str(blocks), *args), timeout=timeout
    )
    return checked(result)[-1]


def test_the_board_filesystem_sizes_follow_the_port() -> None:
    assert BOARDS == {"2MB": 251, "4MB": 763}


# A week without a link, as the app drives the store: a sample a second, a flush every
# buffer.flush_s (10) seconds, a reset on day 3 (what RAM held is lost, the flash survives),
# then the link comes back and everything buffered is published and committed in batches of 30.
WEEK_OUTAGE = """
DAY = 86400
days = int(sys.argv[2])
s = store.Store(60, 21600, "fifo", batch=30)
capacity = s.capacity
hist = {}
pushed = 0
lost_at_reset = 0
dropped_before = 0
flush_reads = open_reads = 0
boot = 1
seq = 0
for i in range(days * DAY):
    if i == 3 * DAY:  # a reset: RAM is gone, the store reopens what flash holds
        lost_at_reset = s.ram_depth()
        dropped_before = s.dropped
        s.close()
        reads = bdev.reads
        s = store.Store(60, 21600, "fifo", batch=30)
        open_reads = bdev.reads - reads
        boot += 1
        seq = 0
    s.push(boot, seq, 1700000000 + i, i % 100000, i % 3000, i % 10000, 0)
    seq += 1
    pushed += 1
    if s.ram_depth() >= 10:
        before = bdev.erases
        reads = bdev.reads
        s.flush()
        reads = bdev.reads - reads
        if reads > flush_reads:
            flush_reads = reads
        if s.dropped or dropped_before:  # the buffer has wrapped
            erased = bdev.erases - before
            hist[erased] = hist.get(erased, 0) + 1
s.flush()
dropped = dropped_before + s.dropped
errors = s.flash_errors
got = []
while s.pending():
    n = s.take(30)
    for row in json.loads(bytes(s.batch())):
        got.append(row[2] - 1700000000)
    s.commit(n)
files = [name for name, *_ in os.ilistdir("fifo")]
print(json.dumps({"capacity": capacity, "pushed": pushed, "dropped": dropped, "lost": lost_at_reset,
                  "errors": errors, "torn": s.torn, "first": got[0], "count": len(got),
                  "in_order": all(got[k] + 1 == got[k + 1] for k in range(len(got) - 1)),
                  "last": got[-1], "hist": hist, "erases": bdev.erases,
                  "programmed": bdev.programmed, "worst_block": max(bdev.per_block),
                  "files": files, "free": os.statvfs("/flash")[3],
                  "flush_reads": flush_reads, "open_reads": open_reads}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("board", sorted(BOARDS))
def test_a_week_without_a_link_on_littlefs(
    micropython_bin: str, lib: Path, tmp_path: Path, board: str
) -> None:
    days = 7
    out = run_on_littlefs(micropython_bin, lib, tmp_path, BOARDS[board], WEEK_OUTAGE, str(days), timeout=600)
    seconds = days * 86400
    assert out["errors"] == 0 and out["torn"] == 0, out
    assert out["capacity"] == 21600
    # Afterwards the newest samples arrive, each once and in order (overflow drops the oldest
    # a whole segment at a time: at least capacity - SEG_RECORDS are kept); every other one was
    # dropped as the oldest and counted (less the few that RAM held at the reset).
    assert out["capacity"] - SEG_RECORDS <= out["count"] <= out["capacity"]
    assert out["in_order"] and out["last"] == seconds - 1
    assert out["dropped"] + out["lost"] + out["count"] == out["pushed"] == seconds
    # What a flush costs once the buffer has wrapped: one sector for the segment's block,
    # a second when the flush crosses into the next segment, and LittleFS's own metadata
    # compactions on top now and then (a ring file rewritten in the middle took 133-149).
    hist = {int(k): v for k, v in out["hist"].items()}
    flushes = sum(hist.values())
    mean = sum(k * v for k, v in hist.items()) / flushes
    assert flushes > 50_000
    assert mean <= 1.1, hist
    assert max(hist) <= 4, hist
    assert sum(v for k, v in hist.items() if k > 2) <= flushes // 100, hist
    # What the worst flush and the reopening cost in flash reads (each a Python call into
    # esp.flash_read on a board, tens of microseconds): LittleFS's allocator rescans every file
    # and compacts the directory's log now and then, so the count follows the files. One-block
    # segments (148 files) read ~98,000 times in one flush, seconds past the SDK watchdog.
    assert out["flush_reads"] <= 10_000, out["flush_reads"]
    assert out["open_reads"] <= 5_000, out["open_reads"]
    # Everything was committed: only the newest segment and the tail file are left.
    assert "tail" in out["files"] and len(out["files"]) <= 2, out["files"]
    print(
        f"{board}: {flushes} flushes after the wrap, {mean:.3f} erases each {hist}; "
        f"{out['erases']} erases, {out['programmed'] / 1e6:.0f} MB programmed in {days} days, "
        f"the most erased sector {out['worst_block']}; the worst flush read {out['flush_reads']} "
        f"times, the reopening {out['open_reads']}"
    )


def test_a_full_filesystem_never_stops_sampling(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    body = """
s = store.Store(20, 21600, "fifo", batch=30)
for i in range(300):
    s.push(1, i, 1700000000 + i, i, 0, 0, 0)
    if s.ram_depth() >= 10:
        s.flush()
# something else fills the filesystem (a crash log, a config upload)
junk = open("junk", "wb")
try:
    while True:
        junk.write(b"x" * 512)
        junk.flush()
except OSError as e:
    full_errno = e.args[0]
junk.close()
pushed_full = 0
for i in range(300, 600):
    assert s.push(1, i, 1700000000 + i, i, 0, 0, 0)
    pushed_full += 1
    if s.ram_depth() >= 10:
        s.flush()  # must not raise
errors = s.flash_errors
os.remove("junk")
for i in range(600, 700):
    s.push(1, i, 1700000000 + i, i, 0, 0, 0)
    if s.ram_depth() >= 10:
        s.flush()
s.flush()
got = []
while s.pending():
    n = s.take(30)
    got.extend(row[1] for row in json.loads(bytes(s.batch())))
    s.commit(n)
print(json.dumps({"full_errno": full_errno, "errors": errors, "after": s.flash_errors,
                  "dropped": s.dropped, "overruns": s.overruns, "got": got}))
"""
    # 40 sectors: room for a segment or two only.
    out = run_on_littlefs(micropython_bin, lib, tmp_path, 40, body)
    assert out["full_errno"] == 28  # ENOSPC
    assert out["errors"] > 0 and out["after"] == out["errors"]  # counted, and over once room came back
    assert out["overruns"] == 0  # push() always had room: sampling went on
    got = out["got"]
    assert len(got) == len(set(got)) and got == sorted(got)
    assert got[-100:] == list(range(600, 700))  # after the filesystem had room again: nothing lost
    assert out["dropped"] + len(got) == 700  # what could not be kept was dropped as the oldest, and counted
