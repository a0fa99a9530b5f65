# `esp` as on the ESP8266 port. The SPI flash is the host's flash image of this board (the
# same bytes esptool writes), so flash_read/flash_write/flash_erase see real contents, and the
# board's LittleFS (vb_vfs.FlashBdev) lives in it.


import vb_hal as hal
import vb_ipc as ipc

SLEEP_NONE = 0
SLEEP_LIGHT = 1
SLEEP_MODEM = 2
SECTOR_SIZE = 4096
# What the SDK's blocking flash calls cost the chip: a W25Q16/32-class NOR flash (Winbond
# W25Q16BV datasheet, AC characteristics: page program tPP 0.7 ms typical (3 ms max) per
# 256-byte page, 4 KiB sector erase tSE 30 ms typical (400 ms max)); reads at the SDK's 40 MHz
# dual I/O, 10 MB/s.
PAGE_SIZE = 256
PAGE_PROGRAM_US = 700
SECTOR_ERASE_US = 30000
READ_US_PER_KIB = 100
_sleep_type = SLEEP_MODEM


def flash_size():
    return hal.params["flash_size"]


def flash_id():
    return hal.params["flash_id"]


def flash_user_start():
    return hal.params["flash_user_start"]


# The flash image, opened before the filesystem is mounted over the host's root: reads are the
# host's file reads (no request, no garbage), writes and erases go to the host, which counts them
# (wear) and writes this same file before it answers.
_image = open(hal.params["flash_image"], "rb")  # noqa: SIM115 - for the life of the process
_FLASH_SIZE = hal.params["flash_size"]
_EIO = 5


# Not @hal.native: its wrapper's argument tuple and dict would be garbage at every block the
# filesystem reads. What these do between native_enter() and native_exit() is the port's C.
def flash_read(offset, length_or_buffer):
    hal.native_enter()
    try:
        n = length_or_buffer if isinstance(length_or_buffer, int) else len(length_or_buffer)
        if offset < 0 or offset + n > _FLASH_SIZE:
            raise OSError(_EIO)
        hal.charge_us(n * READ_US_PER_KIB // 1024)
        _image.seek(offset)
        if n is length_or_buffer:
            return _image.read(n)
        _image.readinto(length_or_buffer)
    finally:
        hal.native_exit()


def flash_write(offset, data):
    hal.native_enter()
    try:
        # modesp.c esp_flash_write: the length is checked first; the SDK writes whole 32-bit
        # words to an aligned address, and any other result of spi_flash_write is EIO
        if len(data) % 4:
            raise ValueError("len must be multiple of 4")
        if offset % 4:
            raise OSError(_EIO)
        n = len(data)
        if n:  # every 256-byte page the write touches is one page program
            hal.charge_us(((offset + n - 1) // PAGE_SIZE - offset // PAGE_SIZE + 1) * PAGE_PROGRAM_US)
        hal.request(ipc.OP_FLASH_WRITE, data, offset)
    finally:
        hal.native_exit()


def flash_erase(sector):
    hal.native_enter()
    try:
        hal.charge_us(SECTOR_ERASE_US)
        hal.request(ipc.OP_FLASH_ERASE, b"", sector)
    finally:
        hal.native_exit()


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
