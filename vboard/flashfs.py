"""The ESP8266 port's filesystem inside a board's flash image, read and written from the host.

The port keeps LittleFS v2 on 4 KiB flash sectors from esp.flash_user_start() to 20 KiB before
the end of the flash (ports/esp8266/modules/flashbdev.py), mounted at / by _boot.py and made by
inisetup.py on a blank first boot. The virtual board's ROM does the same over the board's
flash.bin (vboard/rom/vb_vfs.py); this module is the host's view of the same bytes, through
littlefs-python (the same littlefs v2 code, disk version 2.1 as MicroPython's lib/littlefs),
for tests and tools that put files on a board before it boots or read them after it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from littlefs import LittleFS, UserContext
from littlefs.errors import LittleFSError

from vboard import esprom

SECTOR = 4096
SDK_PARAMS_BYTES = 20 * 1024  # flashbdev.py: "20K at the flash end is reserved for SDK params"
NATIVE_CODE_SECTORS_BELOW = 256  # flashbdev.py: below sector 256 one sector is kept for native code
# extmod/vfs_lfs.c: VfsLfs2(bdev, readsize=32, progsize=32, lookahead=32), as mkfs uses them
READ_SIZE = 32
PROG_SIZE = 32
LOOKAHEAD = 32


@dataclass(frozen=True)
class Geometry:
    start_sector: int
    blocks: int

    @property
    def offset(self) -> int:
        return self.start_sector * SECTOR

    @property
    def size(self) -> int:
        return self.blocks * SECTOR


def geometry(flash_bytes: int) -> Geometry:
    """Where flashbdev.py puts the filesystem on a board with this much flash."""
    if flash_bytes < 1 << 20:
        raise ValueError(f"a {flash_bytes}-byte flash has no filesystem (flashbdev.py: bdev = None)")
    start = esprom.filesystem_start(flash_bytes) // SECTOR
    if start < NATIVE_CODE_SECTORS_BELOW:
        start += 1
    return Geometry(start, (flash_bytes - SDK_PARAMS_BYTES) // SECTOR - start)


class FlashFilesystem:
    """The LittleFS in `image` (a board's flash.bin) as it was when loaded: reads come from that
    snapshot, every change is written back to the image at once. For a board that is stopped
    or idle (it would not see the change before it mounts again)."""

    def __init__(self, image: Path, flash_bytes: int | None = None) -> None:
        self.image = image
        self.geometry = geometry(flash_bytes or image.stat().st_size)
        g = self.geometry
        with image.open("rb") as f:
            f.seek(g.offset)
            data = f.read(g.size)
        self._context = UserContext(buffer=bytearray(data.ljust(g.size, b"\xff")))
        self.fs = LittleFS(
            context=self._context,
            mount=False,
            block_size=SECTOR,
            block_count=g.blocks,
            read_size=READ_SIZE,
            prog_size=PROG_SIZE,
            lookahead_size=LOOKAHEAD,
        )

    @classmethod
    def open(cls, image: Path, flash_bytes: int | None = None) -> FlashFilesystem:
        """Mounted; a blank filesystem region is formatted first, as inisetup.setup() would
        (without its boot.py: what the host writes is all there is)."""
        flash = cls(image, flash_bytes)
        if flash.blank:
            flash.fs.format()
            flash.save()
        return flash.mount()

    def mount(self) -> FlashFilesystem:
        """Mounted as it is (LittleFSError if it holds no filesystem)."""
        self.fs.mount()
        return self

    @property
    def blank(self) -> bool:
        """As inisetup.check_bootsec() sees it: the first block is all 0xFF."""
        return self._context.buffer[:SECTOR] == b"\xff" * SECTOR

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return bytes(f.read())

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode()

    def exists(self, path: str) -> bool:
        try:
            self.fs.stat(path)
        except LittleFSError as e:
            if e.code == LittleFSError.Error.LFS_ERR_NOENT:
                return False
            raise
        return True

    def listdir(self, path: str = "/") -> list[str]:
        return sorted(self.fs.listdir(path))

    def write_bytes(self, path: str, data: bytes | str) -> None:
        self._write(path, data)
        self.save()

    def write_tree(self, files: Mapping[str, bytes | str | None]) -> None:
        """Several files at once (paths relative to /; None: remove it if it is there), one
        write-back."""
        for path, data in files.items():
            if data is not None:
                self._write(path, data)
            elif self.exists(path):
                self.fs.remove(path)
        self.save()

    def remove(self, path: str) -> None:
        self.fs.remove(path)
        self.save()

    def _write(self, path: str, data: bytes | str) -> None:
        parent = path.strip("/").rpartition("/")[0]
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)

    def walk_files(self) -> list[str]:
        """Every file's path relative to /, sorted."""
        found = []
        for top, _dirs, names in self.fs.walk("/"):
            base = top.strip("/")
            found += [f"{base}/{n}" if base else n for n in names]
        return sorted(found)

    def dirs(self, path: str = "/") -> list[str]:
        return sorted(e.name for e in self.fs.scandir(path) if e.type == 2)

    def save(self) -> None:
        with self.image.open("r+b") as f:
            f.seek(self.geometry.offset)
            f.write(bytes(self._context.buffer))


def tree(root: Path) -> dict[str, bytes]:
    """The files under a host directory, by their path relative to it (for write_tree)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
