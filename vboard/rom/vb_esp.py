# `esp` as on the ESP8266 port. The SPI flash is the host's flash image of this board (the
# same bytes esptool writes), so flash_read/flash_write/flash_erase see real contents.

import struct

import vb_hal as hal
import vb_ipc as ipc

SLEEP_NONE = 0
SLEEP_LIGHT = 1
SLEEP_MODEM = 2
SECTOR_SIZE = 4096
_sleep_type = SLEEP_MODEM


def flash_size():
    return hal.params["flash_size"]


def flash_id():
    return hal.params["flash_id"]


def flash_user_start():
    return hal.params["flash_user_start"]


def flash_read(offset, length_or_buffer):
    if isinstance(length_or_buffer, int):
        return bytes(hal.request(ipc.OP_FLASH_READ, struct.pack("<II", offset, length_or_buffer)))
    data = hal.request(ipc.OP_FLASH_READ, struct.pack("<II", offset, len(length_or_buffer)))
    for i in range(len(data)):
        length_or_buffer[i] = data[i]
    return None


def flash_write(offset, data):
    if offset % 4 or len(data) % 4:
        raise OSError(22)  # the SDK writes whole 32-bit words only
    hal.request(ipc.OP_FLASH_WRITE, struct.pack("<I", offset) + bytes(data))


def flash_erase(sector):
    hal.request(ipc.OP_FLASH_ERASE, struct.pack("<I", sector))


def osdebug(level, *args):
    pass


def sleep_type(sleep_type=None):
    global _sleep_type
    if sleep_type is None:
        return _sleep_type
    _sleep_type = sleep_type
    return None


def deepsleep(time_us=0, *args):
    import vb_machine

    vb_machine.deepsleep(time_us // 1000)


def check_fw():
    print("size: %d" % hal.params["fw_size"])
    print("md5: %s" % hal.params["fw_md5"])
    return True


def freemem():
    import gc

    return gc.mem_free()


def meminfo():
    import micropython

    micropython.mem_info()


def info():
    meminfo()


def set_native_code_location(start, length):
    pass
