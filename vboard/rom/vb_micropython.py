# `micropython` with kbd_intr() reaching the virtual board's serial console: the host turns
# the configured character into a keyboard interrupt (SIGINT to this process) only while
# code is running, as the ESP8266's UART handler does.

import micropython as _mp
import vb_hal as hal

const = _mp.const
schedule = _mp.schedule
mem_info = _mp.mem_info
qstr_info = _mp.qstr_info
stack_use = _mp.stack_use
heap_lock = _mp.heap_lock
heap_unlock = _mp.heap_unlock
opt_level = _mp.opt_level
alloc_emergency_exception_buf = getattr(_mp, "alloc_emergency_exception_buf", lambda size: None)


def kbd_intr(chr):
    hal.note("kbd_intr", chr)
