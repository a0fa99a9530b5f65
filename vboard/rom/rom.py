# Entry script of the virtual board's MicroPython process: everything else is precompiled.
import vb_rom  # noqa: F401
