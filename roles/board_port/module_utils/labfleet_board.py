"""Talking to a MicroPython board over its serial console, for the labfleet board modules.

Runs on the USB host the boards are plugged into (a remote Pi or the controller itself), with the
Python that has mpremote and pyserial (the project's `provision` dependencies). Every board
operation goes through the real mpremote: its command line (`run_mpremote`), or, where one board
needs several steps, its own transport in this process (`BoardSession`: the same raw-REPL
protocol, one connection for all the steps, no mpremote process per step). The only thing
mpremote cannot do is restart the application after its raw-REPL session, which `restart_app`
does on the console itself, exactly as a person at the REPL would (Ctrl-C, Ctrl-B, Ctrl-D).

Console contract (real ESP8266 MicroPython, and the virtual board speaks the same):
  - mpremote's raw REPL (Ctrl-A, soft reset with Ctrl-D, exec) works;
  - at the friendly REPL, Ctrl-D soft-resets and prints "soft reboot", then boot.py and main.py
    run (main.py starts the logging application);
  - after a soft reset in raw-REPL mode main.py does NOT run, so a board left by mpremote is idle
    until restart_app.
"""

from __future__ import annotations

import binascii
import contextlib
import fcntl
import glob
import io
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any

RESULT_MARK = "@@labfleet@@"  # prefixes the one JSON line a board-side script prints
# The firmware's maintenance file (firmware/config.py SAFE_MODE_FILE; a test checks they agree):
# while it is on the flash the board boots into safe mode, without the app and its watchdog.
SAFE_MODE_FILE = "safemode"
SOFT_REBOOT = b"soft reboot"
# MicroPython's ESP8266_GENERIC variant for 2 MB+ flash (>= 1.25) whose linker script
# (ports/esp8266/boards/esp8266_2MiB_ROMFS.ld) maps a ROMFS partition at flash offset 0xB0000;
# the port mounts a valid image there at /rom and puts /rom before /lib on sys.path, and the
# modules in it run in place from flash instead of being loaded into the heap. The roles' modules
# run on hosts without the repository: this is their one copy (vboard/esprom.py is the virtual
# board's, and a test checks they agree).
ROMFS_VARIANT = "FLASH_2M_ROMFS"
ROMFS_SIZE = 320 * 1024
ROMFS_MOUNT = "/rom"
DEFAULT_BOOT_FAILURE = r"Traceback \(most recent call last\)|[Ss]afe mode|SAFE MODE"


class BoardError(Exception):
    """The board is there but an operation on it failed."""


class BoardNotConnected(BoardError):
    """Nothing answers where the board should be (unplugged, powered off, wrong port)."""


# ---------------------------------------------------------------- finding the serial port


def _is_url(port: str) -> bool:
    return "://" in port


def _socket_address(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("?", 1)[0].rstrip("/")
    host, _, port = rest.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def port_present(port: str, timeout: float = 2.0) -> bool:
    """Is something there? A device node that exists, or a TCP console that accepts."""
    if port.startswith(("socket://", "rfc2217://")):
        try:
            with socket.create_connection(_socket_address(port), timeout=timeout):
                pass
        except OSError:
            return False
        # A console serves one client at a time (as a USB adapter does): give it a moment to
        # see this probe hang up before mpremote connects.
        time.sleep(0.3)
        return True
    if _is_url(port):
        return True  # another pyserial URL: only opening it will tell
    return os.path.exists(port)


def find_by_usb_serial(usb_serial: str, dev_root: str = "/dev", sys_root: str = "/sys") -> list[str]:
    """Ports of USB adapters with this serial number (/dev/serial/by-id, then sysfs)."""
    found = []
    for link in sorted(glob.glob(os.path.join(dev_root, "serial", "by-id", "*"))):
        name = os.path.basename(link)
        # usb-<vendor>_<product>_<serial>-if00-port0
        if re.search(r"_" + re.escape(usb_serial) + r"-if\d+", name) or name.endswith("_" + usb_serial):
            found.append(link)
    if found:
        return found
    for tty in sorted(glob.glob(os.path.join(sys_root, "class", "tty", "tty*"))):
        device = os.path.join(tty, "device")
        if not os.path.exists(device):
            continue
        node = os.path.realpath(device)
        # Walk up from the interface to the USB device, which carries the serial attribute.
        for _ in range(4):
            serial_file = os.path.join(node, "serial")
            if os.path.exists(serial_file):
                with open(serial_file) as f:
                    if f.read().strip() == usb_serial:
                        found.append(os.path.join(dev_root, os.path.basename(tty)))
                break
            node = os.path.dirname(node)
    return found


def find_by_usb_path(usb_path: str, dev_root: str = "/dev") -> list[str]:
    """Ports at this physical USB location: a /dev/serial/by-path name or a part of one."""
    if usb_path.startswith("/"):
        return [usb_path] if os.path.exists(usb_path) else []
    return [
        link
        for link in sorted(glob.glob(os.path.join(dev_root, "serial", "by-path", "*")))
        if usb_path in os.path.basename(link)
    ]


def scan_candidates(dev_root: str = "/dev") -> list[str]:
    return sorted(glob.glob(os.path.join(dev_root, "ttyUSB*")) + glob.glob(os.path.join(dev_root, "ttyACM*")))


# ---------------------------------------------------------------- mpremote


def run_mpremote(mpremote: str, port: str, args: list[str], timeout: float, retry: bool = True) -> str:
    """stdout of `mpremote connect PORT ARGS...`; BoardNotConnected / BoardError on failure.

    mpremote interrupts the application with a single Ctrl-C; a board that resets in a loop
    (a crashing application, a bad config) can miss it. Then the console is held at the REPL
    first (break_in) and mpremote tried once more."""
    try:
        return _run_mpremote(mpremote, port, args, timeout)
    except BoardNotConnected:
        raise
    except BoardError as e:
        if not retry or "could not enter raw repl" not in str(e):
            raise
    break_in(port)
    return _run_mpremote(mpremote, port, args, timeout)


def _run_mpremote(mpremote: str, port: str, args: list[str], timeout: float) -> str:
    command = [mpremote, "connect", port, *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BoardError(f"mpremote on {port} did not finish within {timeout:.0f} s") from None
    except OSError as e:
        raise BoardError(f"cannot run {mpremote}: {e}") from None
    if result.returncode != 0:
        text = (result.stderr.strip() or result.stdout.strip())[-1500:]
        # Only a port that cannot be opened means "not connected"; a board that is there but
        # does not answer at its REPL (crashed, not MicroPython, port busy) is a failure.
        if "failed to access" in text or "No such file" in text or "Connection refused" in text:
            raise BoardNotConnected(f"{port}: {text}")
        raise BoardError(f"mpremote on {port} failed: {text}")
    return result.stdout


def parse_result(stdout: str) -> Any:
    """The JSON a board-side script printed after RESULT_MARK."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise BoardError(f"the board printed no result: {stdout.strip()[-800:]!r}")


def board_exec(mpremote: str | None, port: str, code: str, timeout: float = 30.0) -> Any:
    """The JSON `code` printed on the board. mpremote: the mpremote program to run; None: a
    BoardSession (mpremote's transport) in this process."""
    if mpremote is None:
        with BoardSession(port) as board:
            return board.exec(code, timeout)
    return parse_result(run_mpremote(mpremote, port, ["exec", code], timeout))


class BoardSession:
    """One raw-REPL session on the board through mpremote's own transport
    (mpremote.transport_serial.SerialTransport, what `mpremote connect PORT` opens and its `exec`
    and `fs cp` drive), in this process: the steps of a chain like `mpremote connect PORT exec A +
    fs cp f :f + exec B`, but the next step may depend on what the last one printed, and no
    mpremote process (a Python and its imports, about 0.1 CPU-s) is started per step.

    Entering it interrupts the running program (Ctrl-C) and soft-resets the board in raw-REPL
    mode (main.py does not run), as mpremote's first command does; soft_reset=False is mpremote's
    `resume`. A board that misses the Ctrl-C (resetting in a loop) is held at its REPL first and
    tried once more, as run_mpremote does."""

    # A board at its REPL or in its app answers within a second (the app reacts to Ctrl-C
    # within its longest blocking call, the MQTT connect's 2 s). One that resets meanwhile (its
    # watchdog fired, it crash-loops) boots its app again and never answers: the first try gives
    # up after this, not after mpremote's 10 s, and break_in holds the board for the second.
    FIRST_TRY_S = 3.0
    RETRY_S = 10.0  # mpremote's own

    def __init__(self, port: str, soft_reset: bool = True) -> None:
        self.port = port
        self.transport: Any = None  # mpremote's SerialTransport while connected
        try:
            self._open(soft_reset, self.FIRST_TRY_S)
        except BoardNotConnected:
            raise
        except BoardError as e:
            if "could not enter raw repl" not in str(e):
                raise
            break_in(port)
            self._open(soft_reset, self.RETRY_S)

    def _open(self, soft_reset: bool, timeout: float) -> None:
        try:
            from mpremote.transport import TransportError
            from mpremote.transport_serial import SerialTransport
        except ImportError as e:
            raise BoardError(
                f"mpremote is not importable by this Python ({sys.executable}): run the board modules "
                f"with the USB host's labfleet_venv python (ansible_python_interpreter): {e}"
            ) from None
        try:
            self.transport = SerialTransport(self.port, baudrate=115200)
        except TransportError as e:  # "failed to access <port>": nothing there, or busy
            raise BoardNotConnected(
                f"nothing answers at {self.port} (unplugged, or in use by another program): {e}"
            ) from None
        # mpremote reads without a timeout where its process's own time limit protected it; a
        # board that stops answering must not hang this one.
        self.transport.serial.timeout = 10
        try:
            self._call("connect", self.transport.enter_raw_repl, soft_reset, timeout)
        except BoardError:
            self.close()
            raise

    def _call(self, what: str, function: Callable[..., Any], *args: Any) -> Any:
        """A transport call; mpremote's errors (and what it would have printed) as BoardError."""
        from mpremote.transport import TransportError, TransportExecError

        printed = io.StringIO()  # a module's stdout is its JSON result: keep mpremote's prints off it
        try:
            with contextlib.redirect_stdout(printed):
                return function(*args)
        except TransportExecError as e:
            raise BoardError(
                f"{self.port}: {what} failed on the board: {e.error_output.strip()[-1500:]}"
            ) from None
        except (TransportError, OSError) as e:
            said = printed.getvalue().strip()[-400:]
            raise BoardError(
                f"mpremote on {self.port} failed ({what}): {e}{'; ' + said if said else ''}"
            ) from None

    def run(self, code: str, timeout: float = 30.0) -> str:
        """What `code` printed on the board (mpremote exec); BoardError if it raised."""
        self._call("exec", self.transport.exec_raw_no_follow, code)
        out, err = self._call("exec", self.transport.follow, timeout)
        if err:
            raise BoardError(
                f"mpremote on {self.port} failed: {err.decode('utf-8', 'replace').strip()[-1500:]}"
            )
        return str(out.decode("utf-8", "replace"))

    def exec(self, code: str, timeout: float = 30.0) -> Any:
        """The JSON a board-side script printed after RESULT_MARK."""
        return parse_result(self.run(code, timeout))

    def put(self, local: str, remote: str) -> int:
        """Write a local file to the board (mpremote fs cp LOCAL :REMOTE); returns its size."""
        with open(local, "rb") as f:
            data = f.read()
        self._call(f"fs cp {local} :{remote}", self.transport.fs_writefile, remote, data)
        return len(data)

    def soft_reset(self) -> None:
        """Soft-reset the board in raw-REPL mode (mpremote soft-reset): a fresh heap, without the
        globals earlier steps left; main.py does not run."""
        self._call("soft-reset", self.transport.enter_raw_repl, True)

    # mpremote writes 4 KiB at a time. Each chunk takes several buffers of its size on the board,
    # and at an ESP8266-sized heap (the virtual board's default) the largest free block fell to
    # 8 KiB during a 4 KiB deploy, failing now and then; 2 KiB chunks keep a wide margin.
    ROMFS_CHUNK = 2048

    def deploy_romfs(self, image: bytes, chunk_size: int = ROMFS_CHUNK) -> int:
        """Write a ROMFS image into the board's partition as `mpremote romfs deploy` does:
        unmount /rom, erase as much of the partition as the image needs (rom_ioctl 3), then write
        it chunk by chunk (rom_ioctl 4), each deflated and base64-encoded when the board can
        inflate (mpremote's fastest path), else base64 only. Returns the bytes of code sent."""
        prepare = (
            "import vfs, json\n"
            f"try:\n vfs.umount({ROMFS_MOUNT!r})\nexcept OSError:\n pass\n"
            "from binascii import a2b_base64\n"
            "try:\n from deflate import DeflateIO, RAW\n from io import BytesIO\n z = 1\n"
            "except ImportError:\n z = 0\n"
            f"print({RESULT_MARK!r} + json.dumps([vfs.rom_ioctl(3, 0, {len(image)}), z]))\n"
        )
        min_write, inflate = self.exec(prepare, timeout=60)
        if min_write <= 0:
            raise BoardError(
                f"{self.port}: the board cannot erase its ROMFS partition (rom_ioctl 3 -> {min_write})"
            )
        sent = 0
        for offset in range(0, len(image), chunk_size):
            data = image[offset : offset + chunk_size]
            data += bytes(-len(data) % min_write)
            if inflate:
                # wbits -9: the board inflates with a 512-byte window (mpremote's choice, for its heap)
                compressor = zlib.compressobj(wbits=-9)
                packed = binascii.b2a_base64(compressor.compress(data) + compressor.flush(), newline=False)
                load = f"buf=DeflateIO(BytesIO(a2b_base64({packed!r})),RAW,9).read()"
            else:
                load = f"buf=a2b_base64({binascii.b2a_base64(data, newline=False)!r})"
            # Two steps, as mpremote: the first one's compiled literal is freed before the write
            # (in one step, the virtual board's ESP8266-sized heap ran out on the first chunk).
            write = f"r=vfs.rom_ioctl(4,0,{offset},buf)\nif r:\n raise OSError(r)"
            self.run(load)
            self.run(write)
            sent += len(load) + len(write)
        return sent

    def hard_reset(self) -> None:
        """Reset the board (mpremote reset) and end the session."""
        self._call("reset", self.transport.exec_raw_no_follow, _HARD_RESET)
        self.close()

    def close(self) -> None:
        transport, self.transport = self.transport, None
        if transport is None:
            return
        with contextlib.suppress(OSError):  # as mpremote's disconnect: the port may be gone
            if transport.in_raw_repl:
                transport.exit_raw_repl()
        with contextlib.suppress(OSError):
            transport.close()

    def __enter__(self) -> BoardSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# MicroPython code, run on the board. Kept to what the ESP8266 port has (os, sys, json, hashlib,
# binascii) and small: it is sent over the serial line on every run.

# The board's ROMFS partition as a memoryview, or None: a firmware without the FLASH_2M_ROMFS
# variant has no vfs.rom_ioctl, or one that reports no partition or an empty one.
_ROMFS_PARTITION = (
    "def _rom():\n"
    " try:\n"
    "  import vfs\n"
    "  if vfs.rom_ioctl(1) > 0:\n"
    "   m = vfs.rom_ioctl(2, 0)\n"
    "   if len(m):\n"
    "    return m\n"
    " except Exception:\n"
    "  pass\n"
    " return None\n"
)
# sha256 of the first n bytes of the partition (a ROMFS image is read in place: no copy), or
# None when there is no partition that large. Needs hashlib and binascii.
_ROMFS_SHA256 = (
    _ROMFS_PARTITION + "def _romsha(n):\n"
    " r = _rom()\n"
    " if r is None or len(r) < n:\n"
    "  return None\n"
    " h = hashlib.sha256(); h.update(r[:n])\n"
    " return binascii.hexlify(h.digest()).decode()\n"
)

# The release comes from os.uname().version ("v1.27.0 on 2025-12-09"; .release is the ESP SDK's),
# else from sys.implementation (ports without uname). romfs: the ROMFS partition's size, 0 if none.
INFO_SCRIPT = (
    """
import sys, json
try:
    import os
    release = os.uname().version.split(' ')[0].lstrip('v').split('-')[0]
except Exception:
    release = '%d.%d.%d' % sys.implementation.version[:3]
try:
    import network
    mac = ':'.join('%02x' % b for b in network.WLAN(network.STA_IF).config('mac'))
except Exception:
    mac = None
"""
    + _ROMFS_PARTITION
    + f"""print({RESULT_MARK!r} + json.dumps({{'release': release,
    'machine': getattr(sys.implementation, '_machine', sys.platform), 'mac': mac,
    'romfs': len(_rom() or b'')}}))
"""
)


# Board-side snippets shared by the scripts below.
_SHA256_OF_FILE = (
    "def _sha(f):\n"
    " h = hashlib.sha256(); b = bytearray(512); m = memoryview(b)\n"
    " while True:\n"
    "  n = f.readinto(b)\n"
    "  if not n:\n"
    "   break\n"
    "  h.update(m[:n])\n"
    " f.close()\n"
    " return binascii.hexlify(h.digest()).decode()\n"
)
_REMOVE_SAFE_MODE_FILE = f"try:\n os.remove({SAFE_MODE_FILE!r})\nexcept OSError:\n pass\n"
_CREATE_SAFE_MODE_FILE = f"open({SAFE_MODE_FILE!r}, 'w').close()"
_HARD_RESET = "import time, machine; time.sleep_ms(100); machine.reset()"  # what `mpremote reset` runs


def hash_script(
    paths: list[str], leave_safe_mode: bool = False, romfs_size: int | None = None, exists: Sequence[str] = ()
) -> str:
    """Code printing the board's view of its files: {"hashes": {path: sha256 hex or None},
    "present": the names of `exists` that are on the board (looked up, not read), "manifest":
    the text of the previous upload's manifest.json or None, "previous": the files that
    manifest lists which are still on the board}. leave_safe_mode: also remove the maintenance
    file, in the same session (see leave_safe_mode()). romfs_size: also "romfs": {"partition":
    its size (0: none), "sha256": of its first romfs_size bytes, or None}.

    The result is written piece by piece as it is found: a board at its default heap (an
    ESP8266's, fragmented by then) may have no room for the whole JSON text in one piece."""
    romfs = (
        (_ROMFS_SHA256, f"'romfs': {{'partition': len(_rom() or b''), 'sha256': _romsha({romfs_size})}}, ")
        if romfs_size is not None
        else ("", "")
    )
    head = "{" + romfs[1] + "'manifest': t, 'previous': prev}"  # then hashes and present, streamed
    return (
        "import os, sys, json, hashlib, binascii\n" + _SHA256_OF_FILE + romfs[0] + "def _h(p):\n"
        " try:\n"
        "  f = open(p, 'rb')\n"
        " except OSError:\n"
        "  return None\n"
        " return _sha(f)\n"
        "try:\n"
        " f = open('manifest.json'); t = f.read(); f.close()\n"
        "except OSError:\n"
        " t = None\n"
        "prev = []\n"
        "try:\n"
        " for p in json.loads(t)['files']:\n"
        "  try:\n"
        "   os.stat(p); prev.append(p)\n"
        "  except OSError:\n"
        "   pass\n"
        "except Exception:\n"
        " pass\n" + (_REMOVE_SAFE_MODE_FILE if leave_safe_mode else "") + "w = sys.stdout.write\n"
        f"w({RESULT_MARK!r} + json.dumps({head})[:-1] + ', \"hashes\": {{')\n"
        "s = ''\n"
        f"for p in {paths!r}:\n"
        " w(s + json.dumps(p) + ': ' + json.dumps(_h(p))); s = ', '\n"
        "w('}, \"present\": [')\n"
        "s = ''\n"
        f"for p in {list(exists)!r}:\n"
        " try:\n"
        "  os.stat(p); w(s + json.dumps(p)); s = ', '\n"
        " except OSError:\n"
        "  pass\n"
        "w(']}\\n')\n"
    )


def romfs_sha256_script(size: int) -> str:
    """Code printing the sha256 of the first `size` bytes of the board's ROMFS partition (None:
    no partition that large)."""
    return (
        "import json, hashlib, binascii\n"
        + _ROMFS_SHA256
        + f"print({RESULT_MARK!r} + json.dumps(_romsha({size})))\n"
    )


def install_script(staged: dict[str, str], remove: list[str]) -> str:
    """Code that checks every staged `<path>.new` against its sha256, and only if all match
    renames them into place and removes the stale files and the folders that leaves empty (an
    empty `drivers/` on the filesystem would hide the package of that name in /rom: MicroPython
    takes the first folder of the name on sys.path as the package); prints what it did."""
    folders = sorted(
        {str(parent) for name in remove for parent in PurePosixPath(name).parents if str(parent) != "."},
        key=lambda folder: -folder.count("/"),
    )
    return (
        "import os, json, hashlib, binascii\n"
        f"staged = {staged!r}\n"
        "bad = {}\n" + _SHA256_OF_FILE + "for p, want in staged.items():\n"
        " got = _sha(open(p + '.new', 'rb'))\n"
        " if got != want:\n"
        "  bad[p] = got\n"
        "removed = []\n"
        "if not bad:\n"
        " for p in staged:\n"
        "  os.rename(p + '.new', p)\n"
        f" for p in {remove!r}:\n"
        "  try:\n"
        "   os.remove(p)\n"
        "   removed.append(p)\n"
        "  except OSError:\n"
        "   pass\n"
        + (f" for d in {folders!r}:\n  try:\n   os.rmdir(d)\n  except OSError:\n   pass\n" if folders else "")
        + f"print('{RESULT_MARK}' + json.dumps({{'bad': bad, 'removed': removed}}))\n"
    )


def mkdirs_script(directories: list[str]) -> str:
    return f"import os\nfor d in {directories!r}:\n try:\n  os.mkdir(d)\n except OSError:\n  pass\n"


# ---------------------------------------------------------------- the console


class Console:
    """A raw byte stream to the board's console: a serial device or a socket:// URL."""

    def __init__(self, port: str, timeout: float = 0.1) -> None:
        self.port = port
        self._serial: Any = None
        self._sock: socket.socket | None = None
        try:
            import serial  # pyserial: every URL pyserial knows, and real serial ports

            self._serial = serial.serial_for_url(port, baudrate=115200, timeout=timeout)
        except ImportError:
            if port.startswith("socket://"):
                self._sock = socket.create_connection(_socket_address(port), timeout=5)
                self._sock.settimeout(timeout)
            else:
                raise BoardError("pyserial is needed to open " + port) from None
        except Exception as e:  # pyserial raises SerialException (an OSError) or ValueError
            raise BoardNotConnected(f"cannot open {port}: {e}") from None

    def write(self, data: bytes) -> None:
        if self._serial is not None:
            self._serial.write(data)
        elif self._sock is not None:
            self._sock.sendall(data)

    def read_some(self) -> bytes:
        if self._serial is not None:
            waiting = self._serial.in_waiting
            return bytes(self._serial.read(waiting or 1))
        assert self._sock is not None
        try:
            return self._sock.recv(4096)
        except TimeoutError:
            return b""

    def read_until(self, pattern: bytes, timeout: float) -> tuple[bytes, bool]:
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data += self.read_some()
            if pattern in data:
                return data, True
        return data, False

    def read_for(self, seconds: float) -> bytes:
        data = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            data += self.read_some()
        return data

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
        if self._sock is not None:
            self._sock.close()


def break_in(port: str, timeout: float = 15.0, quiet_s: float = 0.5) -> None:
    """Send Ctrl-C until the board sits at its REPL prompt with nothing else running."""
    console = Console(port)
    try:
        deadline = time.monotonic() + timeout
        output = b""
        while time.monotonic() < deadline:
            console.write(b"\r\x03")
            output = (output + console.read_for(0.1))[-4000:]
            if output.rstrip(b" ").endswith(b">>>"):
                tail = console.read_for(quiet_s)  # a reset in progress would print now
                if not tail:
                    return
                output += tail
        raise BoardError(f"{port}: the board does not stay at its REPL; console said {output[-400:]!r}")
    finally:
        console.close()


def wait_for_prompt(port: str, timeout: float = 10.0) -> bool:
    """Wait for a board that is booting to reach its REPL prompt, without interrupting it: a
    bare Enter every half second (at the REPL it prints a new prompt; while boot.py runs it
    waits in the input buffer). Ctrl-C into a booting board can interrupt boot.py half-way."""
    console = Console(port)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            console.write(b"\r")
            _, seen = console.read_until(b">>> ", 0.5)
            if seen:
                return True
        return False
    finally:
        console.close()


def enter_safe_mode(mpremote: str | None, port: str, timeout: float = 60.0) -> None:
    """Reboot the board into safe mode (maintenance file on the flash, then a hard reset) and
    wait for its REPL. mpremote: the mpremote program to run; None: mpremote's transport in
    this process (BoardSession).

    Once the application has started the ESP8266's watchdog, nothing stops it: mpremote's Ctrl-C
    and soft reset leave it counting, and the board resets about 5 s later, in the middle of
    whatever was being uploaded. Writing the file takes well under that; after the hard reset
    the firmware does not start the app (nor the watchdog), and the board's files can be read
    and written at leisure."""
    if mpremote is None:
        with BoardSession(port) as board:
            board.run(_CREATE_SAFE_MODE_FILE, timeout)
            board.hard_reset()
    else:
        run_mpremote(mpremote, port, ["exec", _CREATE_SAFE_MODE_FILE, "reset"], timeout)
    wait_for_prompt(port)  # let the board boot (into safe mode) undisturbed
    break_in(port)


def leave_safe_mode(mpremote: str | None, port: str, timeout: float = 60.0) -> None:
    """Remove the maintenance file (the next boot starts the app). Only a boot reads it: the
    board stays at its REPL, with no app and no watchdog, until the next reset, so provisioning
    may remove it early, in a session it needs anyway (hash_script(leave_safe_mode=True)), and
    keep working in that session, or in later ones that do not reset the board (`resume`)."""
    code = "import os\n" + _REMOVE_SAFE_MODE_FILE + f"print({RESULT_MARK!r} + '1')"
    board_exec(mpremote, port, code, timeout)


def restart_app(
    port: str, reboot_timeout: float = 15.0, watch_s: float = 2.0, failure_regex: str = DEFAULT_BOOT_FAILURE
) -> str:
    """Soft-reset from the friendly REPL so boot.py and main.py run; return the console output.

    Raises BoardError if no soft reboot is seen, or the console shows a boot failure (a
    traceback, safe mode) within watch_s seconds after it.
    """
    console = Console(port)
    try:
        console.write(b"\r\x03\x03")  # stop whatever runs
        console.read_for(0.2)
        console.write(b"\r\x02")  # friendly REPL (mpremote may have left it in raw REPL)
        console.read_until(b">>> ", 3.0)
        console.write(b"\x04")  # soft reset: boot.py, then main.py
        output, rebooted = console.read_until(SOFT_REBOOT, reboot_timeout)
        if not rebooted:
            raise BoardError(f"{port}: no soft reboot after Ctrl-D; console said {output[-300:]!r}")
        output += console.read_for(watch_s)
    finally:
        console.close()
    text = output.decode("utf-8", "replace")
    after = text[text.find("soft reboot") :]
    if failure_regex and re.search(failure_regex, after):
        errors = re.findall(r"^\s*(\w+(?:Error|Exception|Interrupt)\b.*?)\s*$", after, re.M)
        why = errors[0] if errors else re.search(failure_regex, after).group(0)  # type: ignore[union-attr]
        raise BoardError(f"{port}: the application did not start ({why}); console:\n{after[-1200:]}")
    return after


# ---------------------------------------------------------------- MQTT: the board's info message


def _mqtt_string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _mqtt_packet(kind: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([kind]) + bytes(encoded) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the broker closed the connection")
        data += chunk
    return data


def _recv_packet(sock: socket.socket) -> tuple[int, bytes]:
    kind = _recv_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _recv_exact(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return kind, _recv_exact(sock, length)


class InfoWatcher:
    """A minimal MQTT 3.1.1 subscriber (stdlib only: the USB host need not have paho) that waits
    for a board's info message to be published live, i.e. by the board after it restarted."""

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        user: str | None,
        password: str | None,
        tls: bool = False,
        ca_file: str | None = None,
        client_id: str = "",
    ) -> None:
        self.topic = topic
        raw = socket.create_connection((host, port), timeout=10)
        if tls:
            context = ssl.create_default_context(cafile=ca_file)
            self.sock: socket.socket = context.wrap_socket(raw, server_hostname=host)
        else:
            self.sock = raw
        flags = 0x02 | (0x80 if user else 0) | (0x40 if password else 0)
        client_id = client_id or f"labfleet-provision-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        body = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + _mqtt_string(client_id)
        if user:
            body += _mqtt_string(user)
        if password:
            body += _mqtt_string(password)
        self.sock.sendall(_mqtt_packet(0x10, body))
        kind, payload = _recv_packet(self.sock)
        if kind != 0x20 or len(payload) < 2 or payload[1] != 0:
            code = payload[1] if len(payload) > 1 else None
            raise BoardError(f"the broker refused the info check (CONNACK return code {code})")
        self.sock.sendall(_mqtt_packet(0x82, struct.pack("!H", 1) + _mqtt_string(topic) + b"\x00"))

    def wait(self, accept: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The first live (not retained) info message that `accept` takes, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                kind, body = _recv_packet(self.sock)
            except TimeoutError:
                return None
            if kind >> 4 != 3:  # not PUBLISH (SUBACK, ...)
                continue
            retained = bool(kind & 0x01)
            topic_len = struct.unpack("!H", body[:2])[0]
            offset = 2 + topic_len + (2 if kind & 0x06 else 0)
            try:
                info = json.loads(body[offset:])
            except ValueError:
                continue
            if not retained and isinstance(info, dict) and accept(info):
                return info
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


# ---------------------------------------------------------------- serialising access


@contextmanager
def host_lock(name: str) -> Iterator[None]:
    """One holder at a time per USB host (scanning ports must not race another scan)."""
    directory = os.path.join(os.path.expanduser("~"), ".cache", "labfleet")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
