"""The board's filesystem is LittleFS v2 in its flash.bin, where the ESP8266 port puts it
(ports/esp8266/modules/flashbdev.py, inisetup.py): mpremote, esptool and the host see the same
bytes, and what the firmware does to the flash is counted and costs the chip's time."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vboard_support import mpremote
from vboard import flashfs
from vboard.board import Board, micropython_binary
from vboard.fleet import Fleet
from vboard.spec import BoardSpec

ESPTOOL = str(Path(sys.executable).parent / "esptool")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path / "fleet", speed=1) as running:
        yield running


def bare(fleet: Fleet, name: str, flash_size: str = "4MB") -> Board:
    board = fleet.add(BoardSpec(name=name, rtc=False, ambient=None, thermocouple=None, flash_size=flash_size))
    fleet.wait_repl(board)
    return board


def test_the_filesystem_sits_where_flashbdev_puts_it() -> None:
    # flashbdev.py: start = flash_user_start() // 4096 (+1 below sector 256, for native code),
    # blocks = (size - 20 KiB of SDK parameters) // 4096 - start
    assert flashfs.geometry(1 << 20) == flashfs.Geometry(0x9A000 // 4096 + 1, 256 - 5 - 155)
    assert flashfs.geometry(2 << 20) == flashfs.Geometry(256, 512 - 5 - 256)
    assert flashfs.geometry(4 << 20) == flashfs.Geometry(256, 1024 - 5 - 256)


@pytest.mark.parametrize("flash_size", ["1MB", "2MB", "4MB"])
def test_first_boot_formats_littlefs_in_flash_bin_and_the_host_reads_it(
    fleet: Fleet, flash_size: str
) -> None:
    board = bare(fleet, f"fmt-{flash_size.lower()}", flash_size)
    assert "Performing initial setup" in (board.workdir / "console.log").read_bytes().decode(errors="replace")
    geometry = flashfs.geometry(board.spec.flash_bytes)
    statvfs = mpremote(board.url, "exec", "import os; print(os.statvfs('/'))")
    assert statvfs.strip().startswith(f"(4096, 4096, {geometry.blocks}, ")
    with board.flash_image.open("rb") as f:
        f.seek(geometry.offset)
        superblock = f.read(64)
    assert b"littlefs" in superblock  # LittleFS v2's superblock entry, at the port's offset
    outside = flashfs.FlashFilesystem(board.flash_image).mount()  # littlefs-python, not the board
    assert outside.listdir() == ["boot.py"]
    assert b"gc.collect()" in outside.read_bytes("boot.py")
    # and MicroPython's own vfs.VfsLfs2, in another interpreter, over a copy of those blocks
    assert read_with_vfslfs2(board, geometry) == (["boot.py"], outside.read_bytes("boot.py"))


READ_WITH_VFSLFS2 = """
import sys, vfs
class Blocks:  # the image's filesystem region, as flashbdev.py presents it
    def __init__(self, data, count):
        self.data, self.count = data, count
    def readblocks(self, n, buf, off=0):
        at = n * 4096 + off
        buf[:] = self.data[at : at + len(buf)]
    def writeblocks(self, n, buf, off=None):
        raise OSError(30)
    def ioctl(self, op, arg):
        return {4: self.count, 5: 4096}.get(op, 0)
with open(sys.argv[1], "rb") as f:
    f.seek(int(sys.argv[2]))
    data = f.read(int(sys.argv[3]) * 4096)
vfs.mount(vfs.VfsLfs2(Blocks(data, int(sys.argv[3]))), "/board", readonly=True)
import os
print(os.listdir("/board"))
with open("/board/boot.py", "rb") as f:
    print(f.read().hex())
"""


def read_with_vfslfs2(board: Board, geometry: flashfs.Geometry) -> tuple[list[str], bytes]:
    script = board.workdir / "read_with_vfslfs2.py"
    script.write_text(READ_WITH_VFSLFS2)
    out = subprocess.run(
        [
            micropython_binary(),
            "-X",
            "heapsize=8M",
            str(script),
            str(board.flash_image),
            str(geometry.offset),
            str(geometry.blocks),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    return ast.literal_eval(out[0]), bytes.fromhex(out[1])


def test_mpremote_cp_ls_cat_act_on_the_image(fleet: Fleet, tmp_path: Path) -> None:
    board = bare(fleet, "mpremote")
    data = bytes(range(256)) * 40
    (tmp_path / "blob.bin").write_bytes(data)
    (tmp_path / "note.txt").write_text("written by mpremote\n")
    erases, programmed = sum(board.flash_erases.values()), board.flash_programmed
    mpremote(board.url, "fs", "mkdir", "data")
    mpremote(board.url, "fs", "cp", str(tmp_path / "blob.bin"), str(tmp_path / "note.txt"), ":data/")
    assert "10240 blob.bin" in mpremote(board.url, "fs", "ls", "data")
    assert mpremote(board.url, "fs", "cat", "data/note.txt") == "written by mpremote\n"
    # the board's own block device wrote the blocks: LittleFS erases before it programs
    assert sum(board.flash_erases.values()) - erases >= len(data) // 4096
    assert board.flash_programmed - programmed >= len(data)
    fs = board.files()
    assert fs.read_bytes("data/blob.bin") == data
    # and the board reads what the host writes (it is idle at its REPL; a reset mounts again)
    fs.write_bytes("from_host.txt", "written by the host\n")
    fleet.run(board.reset())
    assert mpremote(board.url, "fs", "cat", "from_host.txt") == "written by the host\n"


def test_erase_flash_wipes_it_and_the_next_boot_formats_it(fleet: Fleet, tmp_path: Path) -> None:
    board = bare(fleet, "wipe")
    mpremote(board.url, "exec", "with open('keep.txt', 'w') as f: f.write('gone after erase')")
    assert board.files().exists("keep.txt")
    firmware = tmp_path / "firmware.bin"
    with board.flash_image.open("rb") as f:
        firmware.write_bytes(f.read(0x18000))  # the board's MicroPython, to write back
    for args in (["erase-flash"], ["write-flash", "0", str(firmware)]):
        result = subprocess.run(
            [ESPTOOL, "--chip", "esp8266", "--port", board.url, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    geometry = flashfs.geometry(board.spec.flash_bytes)
    assert all(
        board.flash_erases[s] >= 1
        for s in range(geometry.start_sector, geometry.start_sector + geometry.blocks)
    )
    fleet.wait_repl(board)
    console = (board.workdir / "console.log").read_bytes().decode(errors="replace")
    assert console.count("Performing initial setup") == 2
    assert mpremote(board.url, "exec", "import os; print(os.listdir())").strip() == "['boot.py']"


def test_flash_erase_and_program_cost_the_chips_time(fleet: Fleet) -> None:
    board = bare(fleet, "timing")
    sector = flashfs.geometry(board.spec.flash_bytes).start_sector + 100  # a block LittleFS left free
    out = mpremote(
        board.url,
        "exec",
        "import esp, time\n"
        "since = lambda t: time.ticks_diff(time.ticks_us(), t)\n"
        f"t = time.ticks_us(); esp.flash_erase({sector}); e = since(t)\n"
        f"t = time.ticks_us(); esp.flash_write({sector * 4096}, bytes(4096)); w = since(t)\n"
        f"print(e, w, esp.flash_read({sector * 4096}, 8))",
    )
    erase_us, write_us, head = out.split(maxsplit=2)
    # W25Q16BV typical figures: a 4 KiB sector erase 30 ms, 16 page programs of 0.7 ms
    assert 30_000 <= int(erase_us) < 60_000, out
    assert 16 * 700 <= int(write_us) < 30_000, out
    assert head.strip() == repr(bytes(8))
    assert board.flash_erases[sector] == 1
    # modesp.c: a length that is not whole words is refused before the SDK sees it
    misaligned = mpremote(
        board.url,
        "exec",
        f"import esp\ntry:\n    esp.flash_write({sector * 4096}, b'abc')\n"
        "except ValueError as e:\n    print(e)",
    )
    assert misaligned.strip() == "len must be multiple of 4"
    # LittleFS mounts again over what the raw writes left outside its blocks in use
    fleet.run(board.reset())
    assert "boot.py" in mpremote(board.url, "fs", "ls")
