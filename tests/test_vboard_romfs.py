"""The FLASH_2M_ROMFS firmware variant on a virtual board: its ROMFS partition as the ESP8266
port maps it (vboard/rom/vb_vfs.py), driven by the real mpremote (`romfs query/deploy`) and
esptool, and the heap it saves: modules imported from /rom run in place.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fw_run import mpy_cross
from tests.vboard_support import MPREMOTE, mpremote
from vboard import esprom
from vboard.board import Board
from vboard.fleet import Fleet
from vboard.spec import BoardSpec, SpecError

# A module whose constant is big enough that where it lives shows in gc.mem_alloc().
BIG_MODULE = "DATA = b'" + "\\x5a" * 12000 + "'\ndef size():\n    return len(DATA)\n"
HEAP_PROBE = (
    "import gc\ngc.collect()\nbefore = gc.mem_alloc()\nimport big\ngc.collect()\n"
    "print(big.size(), big.__file__, gc.mem_alloc() - before)"
)


def bare_board(fleet: Fleet, name: str, variant: str) -> Board:
    spec = BoardSpec(name=name, rtc=False, ambient=None, thermocouple=None, firmware_variant=variant)
    return fleet.add(spec)


@pytest.fixture
def boards(tmp_path: Path) -> Iterator[tuple[Fleet, Board, Board]]:
    """A board with the FLASH_2M_ROMFS variant and one with the default, both at their REPL."""
    with Fleet(tmp_path / "fleet", speed=1) as fleet:
        romfs, plain = bare_board(fleet, "romfs", esprom.ROMFS_VARIANT), bare_board(fleet, "plain", "")
        fleet.wait_repl(romfs)
        fleet.wait_repl(plain)
        yield fleet, romfs, plain


def heap_probe(board: Board) -> tuple[int, str, int]:
    size, where, cost = mpremote(board.url, "exec", HEAP_PROBE).split()
    return int(size), where, int(cost)


def test_mpremote_deploys_a_romfs_image_that_is_mounted_at_rom_and_runs_in_place(
    boards: tuple[Fleet, Board, Board], tmp_path: Path
) -> None:
    _, board, plain = boards

    query = mpremote(board.url, "romfs", "query")
    assert f"ROMFS0 partition has size {esprom.ROMFS_SIZE} bytes" in query
    assert "Not a valid ROMFS" in query  # a freshly flashed board: the partition is erased
    assert "ROMFS is not enabled on this device" in mpremote(plain.url, "romfs", "query")

    source = tmp_path / "app"
    (source / "lib").mkdir(parents=True)
    (tmp_path / "big.py").write_text(BIG_MODULE)
    big_mpy = source / "big.mpy"
    subprocess.run([mpy_cross(), "-o", str(big_mpy), "-s", "big.py", str(tmp_path / "big.py")], check=True)
    (source / "lib" / "helper.py").write_text("NAME = 'helper'\n")
    deployed = mpremote(board.url, "romfs", "deploy", str(source), timeout=90)
    assert "ROMFS image deployed" in deployed
    romfs = tmp_path / "a.romfs"
    subprocess.run(
        [MPREMOTE, "romfs", "-o", str(romfs), "build", str(source)], capture_output=True, check=True
    )
    built = romfs.read_bytes()
    with board.flash_image.open("rb") as f:  # the image is in the board's flash, where the port maps it
        f.seek(esprom.ROMFS_OFFSET)
        assert f.read(len(built)) == built

    # mounted at the next boot, with /rom and /rom/lib on sys.path as the port does
    out = mpremote(
        board.url,
        "soft-reset",
        "exec",
        "import sys, os, helper; print(sys.path, sorted(os.listdir('/rom')), helper.NAME)",
    )
    assert "['', '.frozen', '/rom', '/rom/lib', '/lib'] ['big.mpy', 'lib'] helper" in out

    # The same .mpy: imported from ROMFS its 12 kB constant stays in the partition, from the
    # filesystem it is read into the heap.
    size, where, cost_rom = heap_probe(board)
    assert (size, where) == (12000, "/rom/big.mpy")
    mpremote(plain.url, "fs", "cp", str(big_mpy), ":big.mpy")
    size, where, cost_file = heap_probe(plain)
    assert (size, where) == (12000, "big.mpy")
    assert cost_file > 12000 > 4 * cost_rom, (cost_file, cost_rom)


def test_the_partition_copy_is_not_counted_as_heap_and_the_variant_follows_the_flashed_image(
    boards: tuple[Fleet, Board, Board], tmp_path: Path
) -> None:
    fleet, board, plain = boards
    assert board.heapsize > plain.heapsize + esprom.ROMFS_SIZE
    assert board.heap_at_boot is not None and plain.heap_at_boot is not None
    assert board.heap_holes_at_boot is not None and plain.heap_holes_at_boot is not None
    # what the ROM's objects take (without the holes between them it filled) and what is free
    # before boot.py: as on a board without the partition
    rom_objects = board.heap_at_boot[0] - board.heap_holes_at_boot
    assert abs(rom_objects - (plain.heap_at_boot[0] - plain.heap_holes_at_boot)) < 2048, (
        board.heap_at_boot,
        plain.heap_at_boot,
    )
    assert abs(board.heap_at_boot[1] - plain.heap_at_boot[1]) < 2048, (
        board.heap_at_boot,
        plain.heap_at_boot,
    )

    # esptool writing the default variant's image turns the partition off
    image = tmp_path / "default.bin"
    image.write_bytes(esprom.build_firmware_image("1.27.0", "2025-12-09", size=0x18000))
    esptool = str(Path(sys.executable).parent / "esptool")
    subprocess.run(
        [esptool, "--chip", "esp8266", "--port", board.url, "write-flash", "0", str(image)],
        capture_output=True,
        timeout=90,
        check=True,
    )
    fleet.wait_repl(board)
    assert board.firmware.variant == ""
    assert "ROMFS is not enabled on this device" in mpremote(board.url, "romfs", "query")


def test_the_spec_refuses_romfs_where_the_port_has_none() -> None:
    with pytest.raises(SpecError, match="FLASH_2M_ROMFS needs flash_size >= 2MB"):
        BoardSpec.from_dict("small", {"firmware_variant": "FLASH_2M_ROMFS", "flash_size": "1MB"})
    with pytest.raises(SpecError, match=r"mpy_version >= 1\.25"):
        BoardSpec.from_dict("old", {"firmware_variant": "FLASH_2M_ROMFS", "mpy_version": "1.24.1"})
    with pytest.raises(SpecError, match="firmware_variant must be one of"):
        BoardSpec.from_dict("typo", {"firmware_variant": "FLASH_2M_ROMF"})
    with pytest.raises(SpecError, match="heapsize must be auto or a size"):
        BoardSpec.from_dict("heap", {"heapsize": "148KiB"})
