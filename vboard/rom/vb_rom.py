# The virtual board's "ROM": what the ESP8266 port's C main() and pyexec do, in MicroPython.
#
# Run by the host as `micropython -X heapsize=N rom.py <ipc-port> <token>` (rom.py imports
# this module, compiled with mpy-cross like everything else here) in the real unix
# port. It connects to the host, installs the simulated hardware modules under the port's
# module names (as built-ins are: a file on the board's flash cannot shadow them), mounts the
# board's flash directory at / (and a FLASH_2M_ROMFS firmware's ROMFS partition at /rom, as the
# port does) and then behaves like the ESP8266 port after a reset: run
# boot.py, then main.py (unless the raw REPL asked for the soft reset), then the friendly or
# raw REPL on the serial console (stdin/stdout, bridged to a TCP port by the host), with
# raw-paste mode, Ctrl-C, Ctrl-D soft reboot. A soft reboot or hard reset ends this process;
# the host starts a fresh interpreter, which is how the heap is cleared.

import sys

import vb_hal as hal

params = hal.start(sys.argv)

import vb_vfs  # noqa: E402

if params["romfs"]:
    # first, in one piece, as the flash it stands for: nothing else is in the heap yet
    vb_vfs.map_partition(params["romfs"][0], params["romfs"][1])
    vb_vfs.enable_rom_ioctl()

import gc  # noqa: E402
import io  # noqa: E402

import vb_esp  # noqa: E402
import vb_ipc  # noqa: E402
import vb_machine  # noqa: E402
import vb_micropython  # noqa: E402
import vb_network  # noqa: E402
import vb_ntptime  # noqa: E402
import vb_os  # noqa: E402
import vb_select  # noqa: E402
import vb_socket  # noqa: E402
import vb_ssl  # noqa: E402
import vb_time  # noqa: E402

vb_time.rtc_offset_us = params["rtc_offset_us"]
for _name, _mod in (
    ("machine", vb_machine),
    ("network", vb_network),
    ("esp", vb_esp),
    ("ntptime", vb_ntptime),
    ("time", vb_time),
    ("socket", vb_socket),
    ("select", vb_select),
    ("ssl", vb_ssl),
    ("os", vb_os),
    ("micropython", vb_micropython),
):
    sys.modules[_name] = _mod
    sys.modules["u" + _name] = _mod
sys.modules["vfs"] = vb_vfs

_stdout = sys.stdout.buffer
_stdin = sys.stdin.buffer
_in_poll = hal.make_poller()
_in_poll.register(sys.stdin, 1)

CTRL_A = 1
CTRL_B = 2
CTRL_C = 3
CTRL_D = 4
CTRL_E = 5
BANNER = params["banner"].encode()
RAW_PASTE_WINDOW = 128  # half of the port's 256-byte stdin buffer, as pyexec announces it
FIRST_BOOT_PY = b"""# This file is executed on every boot (including wake-boot from deepsleep)
#import esp
#esp.osdebug(None)
import os, machine
#os.dupterm(None, 1) # disable REPL on UART(0)
import gc
#import webrepl
#webrepl.start()
gc.collect()
"""


def write(data):
    _stdout.write(data)


def read_char():
    # Waiting here still lets pin IRQ callbacks run, as the port's stdin loop does.
    while True:
        try:
            if hal.wait(_in_poll, None):
                c = _stdin.read(1)
                if not c:
                    hal.exit_process(vb_ipc.EXIT_POWER_OFF)  # the host closed the console
                return c[0]
        except KeyboardInterrupt:
            return CTRL_C


user_globals = {"__name__": "__main__"}


def set_exec_state(running):
    # A round trip: the console must know before the code prints anything. A Ctrl-C racing
    # with the end of the code is dropped, as the port drops a pending one.
    try:
        hal.call("exec", running)
    except KeyboardInterrupt:
        if running:
            raise


def execute(source, filename, mode, print_eof):
    """parse_compile_execute: returns 'ok', 'error' or 'exit' (SystemExit: soft reboot).
    mode "file": source is a file's name (run_file)."""
    result = "ok"
    error = None
    try:
        set_exec_state(1)
        code = _compile_file(source) if mode == "file" else compile(source, filename, mode)
        exec(code, user_globals)
    except SystemExit:
        result = "exit"
    except BaseException as e:
        result = "error"
        error = e
    set_exec_state(0)
    if print_eof:
        write(b"\x04")
    if error is not None:
        print_exception(error)
    if print_eof:
        write(b"\x04")
    return result


def print_exception(e):
    # The traceback as the board prints it: the ROM's own frames are not on a real board.
    buf = io.StringIO()
    sys.print_exception(e, buf)
    for line in buf.getvalue().split("\n"):
        if line and not line.startswith('  File "vb_'):
            print(line)


def _compile_file(name):
    # The file's text is garbage once compiled: pyexec_file lexes a file through a small buffer,
    # so a script that never returns (main.py) does not keep its text in the heap on a board.
    with open(name) as f:
        text = f.read()
    # Reading it through the simulated flash left garbage (the requests to the host) that the
    # chip's C reads do not make: collected before the compiler's objects land among it
    gc.collect()
    return compile(text, name, "exec")


def run_file(name):
    try:
        vb_os.stat(name)
    except OSError:
        return "ok"
    return execute(name, name, "file", False)


def soft_reboot(mode):
    write(b"MPY: soft reboot\r\n")
    hal.note("mode", mode)
    hal.exit_process(vb_ipc.EXIT_SOFT_RESET)


# -- raw REPL ----------------------------------------------------------------------------


def raw_paste():
    write(b"R\x01")
    write(bytes((RAW_PASTE_WINDOW & 0xFF, RAW_PASTE_WINDOW >> 8, 0x01)))
    buf = bytearray()
    remain = RAW_PASTE_WINDOW
    while True:
        c = read_char()
        if c in (CTRL_C, CTRL_D):
            write(b"\x04")
            if c == CTRL_C:
                write(b"\x04")
                print_exception(KeyboardInterrupt())
                write(b"\x04")
                return "error"
            break
        buf.append(c)
        remain -= 1
        if remain == 0:
            write(b"\x01")
            remain = RAW_PASTE_WINDOW
    return execute(buf.decode(), "<stdin>", "exec", True)


def raw_repl():
    write(b"raw REPL; CTRL-B to exit\r\n")
    while True:
        write(b">")
        line = bytearray()
        while True:
            c = read_char()
            if c == CTRL_A:
                if len(line) == 2 and line[0] == CTRL_E:
                    if line[1] != ord("A"):
                        write(b"R\x00")
                    elif raw_paste() == "exit":
                        return "reboot"
                    line = bytearray()
                    write(b">")
                    continue
                write(b"raw REPL; CTRL-B to exit\r\n>")
                line = bytearray()
            elif c == CTRL_B:
                write(b"\r\n")
                return "friendly"
            elif c == CTRL_C:
                line = bytearray()
            elif c == CTRL_D:
                break
            else:
                line.append(c)
        write(b"OK")
        if not line:
            write(b"\r\n")
            return "reboot"
        if execute(line.decode(), "<stdin>", "exec", True) == "exit":
            return "reboot"


# -- friendly REPL -----------------------------------------------------------------------

_COMPOUND = ("if", "while", "for", "try", "with", "def", "class", "async")


def continue_with_input(text):
    # mp_repl_continue_with_input: open brackets or triple quotes, a trailing backslash, or
    # a compound statement whose last line is not empty.
    if not text:
        return False
    first = text.split(None, 1)[0] if text.split() else ""
    compound = text[0] == "@" or first.rstrip(":") in _COMPOUND
    depth = 0
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif text.startswith(quote, i):
                i += len(quote) - 1
                quote = None
        elif ch in "'\"":
            quote = text[i : i + 3] if text[i : i + 3] in ('"""', "'''") else ch
            i += len(quote) - 1
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        i += 1
    if quote in ('"""', "'''"):
        return True
    if depth > 0 and quote is None:
        return True
    if text.endswith("\\"):
        return True
    return compound and not text.endswith("\n")


def readline(prompt):
    """Returns (control char or 0, line)."""
    write(prompt)
    line = bytearray()
    while True:
        c = read_char()
        if CTRL_A <= c <= CTRL_E and not line:
            return c, ""
        if c == CTRL_C:
            return c, ""
        if c == CTRL_D:
            continue
        if c in (13, 10):
            write(b"\r\n")
            return 0, line.decode()
        if c in (8, 127):
            if line:
                line = line[:-1]  # MicroPython's bytearray has no pop()
                write(b"\x08 \x08")
            continue
        if c == 27:  # escape sequences (arrows): swallowed, no line editing here
            read_char()
            read_char()
            continue
        line.append(c)
        write(bytes((c,)))


def friendly_repl():
    write(BANNER)
    while True:
        c, text = readline(b">>> ")
        if c == CTRL_A:
            write(b"\r\n")
            return "raw"
        if c == CTRL_B:
            write(b"\r\n")
            write(BANNER)
            continue
        if c == CTRL_C:
            write(b"\r\n")
            continue
        if c == CTRL_D:
            write(b"\r\n")
            return "reboot"
        mode = "single"
        if c == CTRL_E:
            write(b"\r\npaste mode; Ctrl-C to cancel, Ctrl-D to finish\r\n=== ")
            buf = bytearray()
            cancelled = False
            while True:
                ch = read_char()
                if ch == CTRL_C:
                    write(b"\r\n")
                    cancelled = True
                    break
                if ch == CTRL_D:
                    write(b"\r\n")
                    break
                buf.append(ch)
                write(b"\r\n=== " if ch == 13 else bytes((ch,)))
            if cancelled:
                continue
            text = buf.decode().replace("\r", "\n")
            mode = "exec"
        elif not text:
            continue
        else:
            while continue_with_input(text):
                c, more = readline(b"... ")
                if c == CTRL_C:
                    write(b"\r\n")
                    text = ""
                    break
                if c == CTRL_D:
                    break
                text += "\n" + more
            if not text:
                continue
            if text.count("\n"):
                text += "\n"
        if execute(text, "<stdin>", mode, False) == "exit":
            return "reboot"


# -- boot ------------------------------------------------------------------------------

GC_BLOCK_BYTES = 4 * (8 if sys.maxsize > 0x7FFFFFFF else 4)  # MICROPY_BYTES_PER_GC_BLOCK: 4 words
heap_holes = None


def fill_heap_holes():
    """Occupy every free block below the heap's last used one; return what holds them (a chain
    of one-block tuples, chain_length() long).

    On a board the ROM is not in the heap: the firmware starts on a heap in one piece. Here the
    ROM's modules loaded first and left free blocks between their objects, most of one or two
    blocks, which only the firmware's smallest objects could use. They are filled with one-block
    tuples, counted as the ROM's, so that the firmware finds its free heap in one piece above
    them, as on a board. Needs this process's only allocating thread (hal.start_events()).
    """
    gc.collect()
    holes = _fill_to_the_end()
    # the run at the end is free again only now: the frame of _fill_to_the_end, whose value
    # stack may still point at it, is gone (the GC scans stacks conservatively)
    gc.collect()
    return holes


def chain_length(node):
    n = 0
    while node is not None:
        n += 1
        node = node[0]
    return n


def _fill_to_the_end():
    # Allocation is first fit, so each tuple takes the lowest free block and the chain (each
    # tuple holds the one before) runs in address order. The heap is filled to its end; the run
    # of consecutive blocks at the end (the free heap above the ROM) is then let go.
    last = None
    try:
        while True:
            last = (last,)
    except MemoryError:
        pass
    node = last
    while node[0] is not None and id(node) - id(node[0]) == GC_BLOCK_BYTES:
        node = node[0]
    return node[0]


def _filesystem_corrupted(message):
    # inisetup.fs_corrupted(): the message every 3 s, forever; Ctrl-C stops it
    while True:
        write(message.encode())
        hal.sleep_until_sim(hal.sim_us() + 3000000)


def boot():
    fresh = vb_vfs.mount_flash(_filesystem_corrupted)
    vb_os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]
    if vb_vfs.mount_romfs("/rom"):
        sys.path[2:2] = ["/rom", "/rom/lib"]
    if fresh:
        # _boot.py of the port writes this boot.py into a freshly formatted filesystem
        with open("boot.py", "wb") as f:
            f.write(FIRST_BOOT_PY)
    global heap_holes
    heap_holes = fill_heap_holes()
    gc.threshold(-1)  # the port's: collect when an allocation fails (rom.py set a threshold)
    hal.start_events()
    holes_bytes = chain_length(heap_holes) * GC_BLOCK_BYTES
    hal.note("heap", gc.mem_alloc() - vb_vfs.mapped_bytes(), gc.mem_free(), holes_bytes)
    mode = params["repl_mode"]
    hal.native_exit()  # the firmware's time starts (vb_hal.start)
    if run_file("boot.py") == "exit":
        soft_reboot(mode)
    if mode == "friendly" and run_file("main.py") == "exit":
        soft_reboot(mode)
    hal.note("repl")
    while True:
        try:
            if mode == "raw":
                outcome = raw_repl()
                if outcome == "friendly":
                    mode = "friendly"
                    continue
            else:
                outcome = friendly_repl()
                if outcome == "raw":
                    mode = "raw"
                    continue
            if outcome == "reboot":
                soft_reboot(mode)
        except KeyboardInterrupt:
            # A Ctrl-C that landed between two reads of the console: the REPL carries on.
            write(b"\r\n")


boot()
