"""firmware/store.py in the real MicroPython unix port: FIFO order across RAM and flash, resets,
torn records, overflow, the data payload, and heap use."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from firmware import protocol
from tests.fw_run import checked, compile_firmware, firmware_const, run_script

SEG_RECORDS = firmware_const("store", "SEG_RECORDS")  # records per segment file

T0 = 1_700_000_000

# The sample with global index i, as every script here makes it (values in hundredths, None =
# null), so CPython knows exactly what the board stored.
SAMPLE_SOURCE = f"""
def sample(boot, seq, i):
    kt = None if i % 7 == 0 else (i * 37) % 207000 - 27000
    at = None if i % 11 == 0 else (i * 13) % 17000 - 4000
    ah = None if i % 13 == 0 else (i * 7) % 10000
    return (boot, seq, {T0} + i, kt, at, ah, i & 0x7F)
"""


def sample(boot: int, seq: int, i: int) -> list[Any]:
    kt = None if i % 7 == 0 else (i * 37) % 207000 - 27000
    at = None if i % 11 == 0 else (i * 13) % 17000 - 4000
    ah = None if i % 13 == 0 else (i * 7) % 10000
    return [boot, seq, T0 + i, kt, at, ah, i & 0x7F]


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_firmware(tmp_path_factory.mktemp("fwlib"))


def run(micropython_bin: str, lib: Path, body: str, cwd: Path, **kw: Any) -> list[Any]:
    return checked(run_script(micropython_bin, lib, "import json, store\n" + SAMPLE_SOURCE + body, cwd, **kw))


# --- a model of the store, driven by the same random operations as the real one -------------


class Model:
    """The FIFO the store must behave as: what is on flash survives a reset, RAM does not."""

    def __init__(self, batch: int, ram: int = 0) -> None:
        self.ram = ram  # the script flushes before a push into full RAM; 0: never
        self.queue: list[list[Any]] = []
        self.on_flash = 0  # how many of the oldest queue entries are on flash
        self.taken = 0
        self.batches: list[int] = []
        self.batch = batch
        self.boot = 1
        self.seq = 0
        self.i = 0

    def push(self) -> None:
        if self.ram and len(self.queue) - self.on_flash >= self.ram:
            self.flush()
        self.queue.append(sample(self.boot, self.seq, self.i))
        self.seq += 1
        self.i += 1

    def take(self, n: int) -> list[list[Any]]:
        n = min(n, self.batch, len(self.queue) - self.taken)
        got = self.queue[self.taken : self.taken + n]
        self.taken += n
        self.batches.append(n)
        return got

    def commit(self) -> None:
        n = self.batches.pop(0)
        del self.queue[:n]
        self.taken -= n
        self.on_flash = max(0, self.on_flash - n)

    def rewind(self) -> None:
        self.taken = 0
        self.batches = []

    def flush(self) -> None:
        self.on_flash = len(self.queue)

    def reset(self) -> None:
        del self.queue[self.on_flash :]
        self.rewind()
        self.boot += 1
        self.seq = 0


OPS_SCRIPT = """
ops = json.load(open("ops.json"))
RAM, FLASH, BATCH = ops["ram"], ops["flash"], ops["batch"]
s = store.Store(RAM, FLASH, "fifo", batch=BATCH)
boot, seq, i = 1, 0, 0
batches = []
for op in ops["ops"]:
    kind = op[0]
    if kind == "push":
        for _ in range(op[1]):
            if s.ram_depth() >= RAM:
                s.flush()
            assert s.push(*sample(boot, seq, i))
            seq += 1
            i += 1
    elif kind == "take":
        n = s.take(op[1])
        batches.append(n)
        print(str(bytes(s.batch()), "ascii"))
    elif kind == "commit":
        s.commit(batches.pop(0))
    elif kind == "rewind":
        s.rewind()
        batches = []
    elif kind == "flush":
        s.flush()
    elif kind == "reset":
        s.close()
        s = store.Store(RAM, FLASH, "fifo", batch=BATCH)
        batches = []
        boot += 1
        seq = 0
print(json.dumps({"depth": s.depth(), "dropped": s.dropped, "overruns": s.overruns, "torn": s.torn,
                  "all": [s.record(k) for k in range(s.depth())]}))
"""


def random_ops(rng: random.Random, count: int, flash: int) -> list[list[Any]]:
    ops: list[list[Any]] = []
    outstanding = 0
    for _ in range(count):
        r = rng.random()
        if r < 0.35:
            ops.append(["push", rng.randint(1, 12)])
        elif r < 0.6:
            ops.append(["take", rng.randint(1, 40)])
            outstanding += 1
        elif r < 0.8 and outstanding:
            ops.append(["commit"])
            outstanding -= 1
        elif r < 0.86:
            ops.append(["rewind"])
            outstanding = 0
        elif r < 0.96:
            ops.append(["flush"])
        elif flash:
            ops.append(["reset"])
            outstanding = 0
    return ops


@pytest.mark.parametrize(("seed", "flash"), [(1, 5000), (2, 5000), (3, 0)])
def test_random_operations_match_the_fifo_model(
    micropython_bin: str, lib: Path, tmp_path: Path, seed: int, flash: int
) -> None:
    ram, batch = 16, 20
    ops = random_ops(random.Random(seed), 600, flash)
    if not flash:
        # RAM only: keep the backlog below what flush() keeps (overflow is tested separately).
        ops = clamp_pushes(ops, ram - ram // 4, batch)
    (tmp_path / "ops.json").write_text(json.dumps({"ram": ram, "flash": flash, "batch": batch, "ops": ops}))
    model = Model(batch, ram if flash else 0)
    expected_batches: list[list[list[Any]]] = []
    for op in ops:
        if op[0] == "push":
            for _ in range(op[1]):
                model.push()
        elif op[0] == "take":
            expected_batches.append(model.take(op[1]))
        else:
            getattr(model, op[0])()
    # The harness (the op list, the printed batches) needs more heap than the store itself.
    *batches, final = run(micropython_bin, lib, OPS_SCRIPT, tmp_path, heap="512K")
    assert batches == expected_batches
    assert final["all"] == model.queue
    assert final["depth"] == len(model.queue)
    assert (final["dropped"], final["overruns"], final["torn"]) == (0, 0, 0)


def clamp_pushes(ops: list[list[Any]], limit: int, batch: int) -> list[list[Any]]:
    """The ops without resets and with every push cut so the queue never exceeds limit."""
    model = Model(batch)
    clamped: list[list[Any]] = []
    for op in ops:
        if op[0] == "push":
            n = min(op[1], limit - len(model.queue))
            for _ in range(n):
                model.push()
            if n > 0:
                clamped.append(["push", n])
        elif op[0] != "reset":
            clamped.append(op)
            if op[0] == "take":
                model.take(op[1])
            else:
                getattr(model, op[0])()
    return clamped


# --- flash: spill, reset, torn records, overflow ---------------------------------------------

WRITE_SCRIPT = """
import sys
boot, first, count, flush_every, commit = [int(a) for a in sys.argv[1:6]]
s = store.Store(20, int(sys.argv[6]), "fifo", batch=50)
start_depth = s.depth()
for k in range(count):
    i = first + k
    if k and k % flush_every == 0:
        s.flush()
    s.push(*sample(boot, k, i))
while commit:
    n = s.take(commit)
    s.commit(n)
    commit -= n
print(json.dumps({"start_depth": start_depth, "depth": s.depth(), "flash": s.flash_depth(),
                  "dropped": s.dropped, "torn": s.torn}))
# no close(), no final flush: the process ends like a reset, RAM is lost
"""

READ_SCRIPT = """
import sys
s = store.Store(20, int(sys.argv[1]), "fifo", batch=50)
while s.pending():
    n = s.take(50)
    print(str(bytes(s.batch()), "ascii"))
    s.commit(n)
print(json.dumps({"torn": s.torn, "depth": s.depth()}))
"""


def write(micropython_bin: str, lib: Path, cwd: Path, *args: int) -> dict[str, Any]:
    result: dict[str, Any] = run(micropython_bin, lib, WRITE_SCRIPT, cwd, args=tuple(str(a) for a in args))[0]
    return result


def read_all(micropython_bin: str, lib: Path, cwd: Path, flash: int) -> dict[str, Any]:
    """Publish-and-commit everything a reopened store holds: its samples, torn count, depth."""
    *batches, final = run(micropython_bin, lib, READ_SCRIPT, cwd, args=(str(flash),))
    final["samples"] = [s for batch in batches for s in batch]
    return dict(final)


def test_spill_to_flash_survives_reset_in_order(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    # Boot 1: 500 samples, flushed every 10; the last 10 (pushed after the last flush) are lost.
    first = write(micropython_bin, lib, tmp_path, 1, 0, 500, 10, 30, 1000)
    assert first["depth"] == 470
    # Boot 2 reopens the ring: the 490 flushed survive, less the 30 committed; then 200 more.
    second = write(micropython_bin, lib, tmp_path, 2, 1000, 200, 10, 0, 1000)
    assert second["start_depth"] == 460
    got = read_all(micropython_bin, lib, tmp_path, 1000)["samples"]
    expected = [sample(1, k, k) for k in range(30, 490)] + [sample(2, k, 1000 + k) for k in range(190)]
    assert got == expected


def test_ring_wraps_many_times_and_reopens(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    # Capacity 50: several laps, committing as we go, so stale records of older laps sit in the
    # slots after the head when the ring is reopened.
    i = 0
    for boot in range(1, 6):
        write(micropython_bin, lib, tmp_path, boot, i, 61, 10, 40, 50)
        i += 61
    left = read_all(micropython_bin, lib, tmp_path, 50)["samples"]
    # Each boot flushed 60 of its 61 (the 61st was still in RAM) and committed the 40 oldest.
    expected: list[list[Any]] = []
    i = 0
    for boot in range(1, 6):
        # Overflow keeps the newest 50 while the 60 are flushed, then 40 are committed.
        expected = (expected + [sample(boot, k, i + k) for k in range(60)])[-50:]
        del expected[:40]
        i += 61
    assert left == expected


def test_torn_last_record_is_detected_and_overwritten(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    write(micropython_bin, lib, tmp_path, 1, 0, 101, 10, 0, 1000)  # 100 flushed
    data = tmp_path / "fifo" / "0"
    size = data.stat().st_size
    with data.open("r+b") as f:  # a reset in the middle of writing the 100th record
        f.truncate(size - 11)
    second = write(micropython_bin, lib, tmp_path, 2, 1000, 21, 10, 0, 1000)
    assert second["start_depth"] == 99
    got = read_all(micropython_bin, lib, tmp_path, 1000)
    assert got["samples"] == [sample(1, k, k) for k in range(99)] + [
        sample(2, k, 1000 + k) for k in range(20)
    ]
    assert got["torn"] == 0
    assert not list((tmp_path / "fifo").glob("*.new"))


def test_damaged_record_inside_the_fifo_is_skipped_and_counted(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    write(micropython_bin, lib, tmp_path, 1, 0, 51, 10, 0, 1000)
    data = tmp_path / "fifo" / "0"
    raw = bytearray(data.read_bytes())
    record = 28
    raw[20 * record + 9] ^= 0x40  # one bit of record 20's seq
    data.write_bytes(bytes(raw))
    result = read_all(micropython_bin, lib, tmp_path, 1000)
    assert result["samples"] == [sample(1, k, k) for k in range(50) if k != 20]
    assert result["torn"] == 1


def test_a_missing_segment_is_skipped_and_counted(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    seg = SEG_RECORDS
    flushed = (2 * seg + 100) // 10 * 10  # flushed every 10: segments 0, 1 and part of 2
    write(micropython_bin, lib, tmp_path, 1, 0, flushed + 1, 10, 0, 4 * seg)
    (tmp_path / "fifo" / "1").unlink()
    result = read_all(micropython_bin, lib, tmp_path, 4 * seg)
    assert result["samples"] == [sample(1, k, k) for k in range(flushed) if not seg <= k < 2 * seg]
    assert result["torn"] == seg


def test_a_damaged_tail_file_sends_the_oldest_segment_again(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    write(micropython_bin, lib, tmp_path, 1, 0, 101, 10, 30, 1000)  # tail 30
    write(micropython_bin, lib, tmp_path, 1, 500, 0, 10, 20, 1000)  # tail 50
    tail = tmp_path / "fifo" / "tail"
    tail.write_bytes(tail.read_bytes()[:-1])  # torn
    got = read_all(micropython_bin, lib, tmp_path, 1000)["samples"]
    # Back to the oldest segment's start: the 50 committed are sent again (the recorder drops
    # duplicates); nothing pending is lost.
    assert got == [sample(1, k, k) for k in range(100)]


def test_committed_segments_are_deleted(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    body = """
s = store.Store(20, 1000, "fifo", batch=5)
for i in range(3000):
    s.push(*sample(1, i, i))
    s.flush()
    if i % 3 == 2:
        while s.pending():
            s.commit(s.take(1))
print(json.dumps({"depth": s.depth(), "errors": s.flash_errors}))
"""
    assert run(micropython_bin, lib, body, tmp_path)[0] == {"depth": 0, "errors": 0}
    files = sorted(p.name for p in (tmp_path / "fifo").iterdir())
    assert files == [str(3000 // SEG_RECORDS), "tail"]  # the head's segment, and the tail
    assert read_all(micropython_bin, lib, tmp_path, 1000)["samples"] == []


def test_flash_overflow_drops_the_oldest_and_counts_them(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = """
s = store.Store(10, 50, "fifo", batch=8)
for i in range(30):
    s.push(*sample(1, i, i))
    if s.ram_depth() == 10:
        s.flush()
inflight = s.take(8)           # the 8 oldest are in flight when the overflow drops them
for i in range(30, 200):
    s.push(*sample(1, i, i))
    if s.ram_depth() == 10:
        s.flush()
s.commit(inflight)             # their PUBACK arrives after the overflow: absorbed, no error
s.rewind()
rest = []
while s.pending():
    n = s.take(8)
    rest.extend(json.loads(bytes(s.batch())))
    s.commit(n)
print(json.dumps({"dropped": s.dropped, "rest": rest}))
"""
    out = run(micropython_bin, lib, body, tmp_path)[0]
    assert out["rest"] == [sample(1, i, i) for i in range(150, 200)]
    assert out["dropped"] == 150


def test_ram_only_overflow_drops_the_oldest_and_counts(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = """
s = store.Store(20, 0, "unused", batch=50, reserve=5)
for i in range(100):
    s.push(*sample(1, i, i))
    s.flush()
n = s.take(50)
print(json.dumps({"dropped": s.dropped, "overruns": s.overruns, "batch": json.loads(bytes(s.batch()))}))
"""
    out = run(micropython_bin, lib, body, tmp_path)[0]
    assert out["batch"] == [sample(1, i, i) for i in range(85, 100)]
    assert (out["dropped"], out["overruns"]) == (85, 0)
    assert not list(tmp_path.glob("unused*"))


def test_push_into_full_ram_is_counted_not_silent(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    body = """
s = store.Store(10, 100, "fifo")
stored = [s.push(*sample(1, i, i)) for i in range(12)]
print(json.dumps({"stored": stored, "overruns": s.overruns, "depth": s.depth()}))
"""
    out = run(micropython_bin, lib, body, tmp_path)[0]
    assert out == {"stored": [True] * 10 + [False] * 2, "overruns": 2, "depth": 10}


def test_a_smaller_capacity_keeps_the_newest_and_counts_the_rest(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = """
import sys
s = store.Store(10, int(sys.argv[1]), "fifo")
print(json.dumps({"capacity": s.capacity, "depth": s.depth(), "dropped": s.dropped}))
if sys.argv[2] == "fill":
    for i in range(15):
        s.push(*sample(1, i, i))
        s.flush()
"""
    assert run(micropython_bin, lib, body, tmp_path, args=("100", "fill")) == [
        {"capacity": 100, "depth": 0, "dropped": 0}
    ]
    assert run(micropython_bin, lib, body, tmp_path, args=("40", "")) == [
        {"capacity": 40, "depth": 15, "dropped": 0}
    ]
    assert run(micropython_bin, lib, body, tmp_path, args=("10", "")) == [
        {"capacity": 10, "depth": 10, "dropped": 5}
    ]
    assert read_all(micropython_bin, lib, tmp_path, 10)["samples"] == [sample(1, i, i) for i in range(5, 15)]


# --- the payload -----------------------------------------------------------------------------


def test_batch_is_the_protocol_json_with_nulls_and_extremes(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    samples = [
        [0, 0, 0, 0, 0, 0, 0],
        [4294967295, 4294967295, 4294967295, 180000, 13000, 10000, 0x7F],
        [7, 1, T0, -27000, -4685, -600, 1],
        [7, 2, T0 + 1, None, None, None, 0x3F],
        [7, 3, T0 + 2, 2147483647, 32767, -32767, 65535],
        [7, 4, T0 + 3, -2147483647, -1, 1, 2],
        [1073741824, 1073741823, 2**31, 8388607, 9, -9, 3],
        [5, 6, T0 + 5, -8388608, 10, -10, 4],
    ]
    body = f"""
s = store.Store(10, 20, "fifo", batch=10)
for values in {samples!r}:
    s.push(*values)
s.flush()                          # half from flash, half from RAM
for values in {samples!r}:
    s.push(*values)
n = s.take(16)
print(str(bytes(s.batch()), "ascii"))
print(json.dumps([n, s.batch_samples]))
"""
    text = run_script(micropython_bin, lib, "import json, store\n" + body, tmp_path)
    lines = text.stdout.splitlines()
    assert text.returncode == 0, text.stderr
    payload = json.loads(lines[0])
    assert payload == (samples + samples)[:10]
    assert len(payload[0]) == len(protocol.SAMPLE_FIELDS)
    assert " " not in lines[0]  # compact: the bytes that go on the wire
    assert json.loads(lines[1]) == [10, 10]


def test_empty_take_gives_an_empty_array(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    body = """
s = store.Store(10, 0)
print(json.dumps([s.take(5), str(bytes(s.batch()), "ascii")]))
"""
    assert run(micropython_bin, lib, body, tmp_path) == [[0, "[]"]]


# --- heap ------------------------------------------------------------------------------------


def test_push_and_ram_take_commit_do_not_allocate(micropython_bin: str, lib: Path, tmp_path: Path) -> None:
    body = """
import micropython
s = store.Store(120, 0, batch=60)
def cycle(rounds):
    for r in range(rounds):
        for k in range(30):
            s.push(3, k, 1700000000 + k, -27000, None, 4550, 0)
        n = s.take(60)
        s.commit(n)
def locked():
    # In a function: a module-level assignment would itself allocate (the globals dict).
    micropython.heap_lock()
    try:
        cycle(50)
        error = None
    except MemoryError:
        error = "allocated"
    micropython.heap_unlock()
    return error
error = locked()
print(json.dumps({"error": error, "depth": s.depth(), "payload": str(bytes(s.batch()), "ascii")[:40]}))
"""
    out = run(micropython_bin, lib, body, tmp_path)[0]
    assert out["error"] is None
    assert out["depth"] == 0
    assert out["payload"].startswith("[[3,0,1700000000,-27000,null,4550,0]")


def test_heap_stays_bounded_over_a_long_run_with_flash(
    micropython_bin: str, lib: Path, tmp_path: Path
) -> None:
    body = """
import gc
s = store.Store(120, 2000, "fifo", batch=60)
def run(rounds):
    i = 0
    for r in range(rounds):
        for k in range(100):
            s.push(1, i, 1700000000 + i, i, -i, i % 10000, 0)
            i += 1
        s.flush()
        while s.pending():
            n = s.take(60)
            s.commit(n)
run(5)
gc.collect()
before = gc.mem_free()
run(100)
gc.collect()
after = gc.mem_free()
print(json.dumps({"before": before, "after": after, "depth": s.depth()}))
"""
    out = run(micropython_bin, lib, body, tmp_path, timeout=240)[0]
    assert out["depth"] == 0
    assert out["before"] - out["after"] < 512, out
