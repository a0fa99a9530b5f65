# Entry script of the virtual board's MicroPython process: everything else is precompiled.
import gc

# The ROM's boot collects its garbage often, so that its long-lived objects stay packed at the
# bottom of the heap (vb_rom.fill_heap_holes() then hands the firmware the rest in one piece)
# instead of wherever the heap had filled up when the first collection came.
gc.threshold(1024)
import vb_rom  # noqa: E402, F401
