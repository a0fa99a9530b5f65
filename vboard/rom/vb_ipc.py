# The message format between a virtual board's MicroPython process (the "ROM" in this folder)
# and its host process (vboard/board.py), defined once for both sides: the host imports this
# module as `vboard.rom.vb_ipc`, the ROM as `vb_ipc`. MicroPython-compatible.
#
# Two TCP connections to 127.0.0.1, both opened by the MicroPython process at start:
#
#   request channel  (main thread only)  frame = u16 length | u8 op | payload
#                                        ops below 0x80 (but OP_HELLO) start the payload with
#                                        a u16 sequence number and the board's simulated time
#                                        (STAMP, us) and get one reply frame:
#                                        u16 length | u8 status | u16 seq | payload   (status
#                                        0 = ok, otherwise an errno the HAL raises as OSError)
#                                        ops from 0x80 up get no reply (fire-and-forget, but
#                                        still processed in order with the requests).
#                                        The sequence number lets the HAL drop the reply of a
#                                        request a KeyboardInterrupt cut short (vb_hal.py).
#   event channel    (HAL event thread)  frame = u16 length | u8 event | payload, both ways.
#
# Lengths count the op/status/event byte plus the payload, little-endian: a frame is at most
# 65,535 bytes.

HEADER = "<HB"
HEADER_SIZE = 3
SEQ = "<H"
SEQ_SIZE = 2
STAMP = "<q"  # the board's simulated time when it made the request (us)
STAMP_SIZE = 8
SECTOR_SIZE = 4096  # a flash sector: the largest reply the reader is made for at once

# requests with a reply
OP_HELLO = 1  # payload: token (bytes)            -> JSON boot parameters
OP_I2C = 2  # payload: I2C_HEAD + sequence       -> per step results (see below)
OP_SPI = 3  # payload: SPI_HEAD + MOSI bytes     -> MISO bytes
OP_PIN_CFG = 4  # payload: PIN_CFG               -> u8 level the pin now reads
OP_CALL = 5  # payload: JSON [name, arg, ...]     -> JSON result
# 6: was OP_FLASH_READ (the ROM reads its flash image itself, vb_esp.py)
OP_FLASH_WRITE = 7  # payload: "<I" offset + data -> empty
OP_FLASH_ERASE = 8  # payload: "<I" sector       -> empty
# no payload -> empty: the board is about to send a datagram into the host's network, and the
# request's stamp times the answer (an NTP reply: the host may read the datagram much later). A
# request, not a post: the host has the stamp before the datagram exists.
OP_UDP_SENT = 9

# requests without a reply
OP_PIN_SET = 0x81  # payload: PIN_SET pin, level, the board's simulated time of the write (us)
OP_WDT_FEED = 0x82  # payload: STAMP, the board's simulated time of the feed
OP_NOTE = 0x83  # payload: JSON [name, arg, ...]

# I2C: a sequence of bus primitives after I2C_HEAD ("<BBI": scl pin, sda pin, clock-stretch
# timeout in us). Steps: b"S" start, b"P" stop, b"W" + "<H" n + n bytes (reply "<H" number of
# bytes ACKed, address byte included), b"R" + "<HB" n, nack_last (reply n bytes). A clock
# stretch longer than the timeout ends the sequence with status ETIMEDOUT.
# Every I2C reply ends with I2C_TRAILER: the DS3231's square wave as it is after the transaction
# (SQW) and how long the chips stretched the clock (us, charged to the board's time).
I2C_HEAD = "<BBI"
I2C_TRAILER = "<qqI"
I2C_TRAILER_SIZE = 20
I2C_START = 0x53
I2C_STOP = 0x50
I2C_WRITE = 0x57
I2C_READ = 0x52

# SPI_HEAD "<BBBBBI": sck, mosi, miso pins, polarity, phase, baudrate.
SPI_HEAD = "<BBBBBI"

# PIN_CFG "<Bbbb": pin, mode (-1 keep, 0 IN, 1 OUT, 2 OPEN_DRAIN), pull (-1 keep, 0 none,
# 1 PULL_UP), value (-1 keep, else 0/1 output level).
PIN_CFG = "<Bbbb"
# A posted pin write carries when it happened: the host may read it later than that (posts wait
# in the stream while the host is busy), and a chip select's timing (a converter's conversion
# running since CS went high) must be the board's, not the host's.
PIN_SET = "<BBq"

# events host -> board
EV_PIN = 1  # "<BB" pin, level
EV_CLOCK = 2  # "<qqi" real_anchor_us, sim_anchor_us, speed_milli
EV_SQW = 3  # SQW: the DS3231's square wave changed for another reason than an I2C transaction
# SQW "<qq": the board's simulated time of the next rising edge (-1: no square wave), period (us)
SQW = "<qq"
# events board -> host
EV_IRQ_LOST = 0x81  # "<B" pin: a pin IRQ could not be scheduled (scheduler queue full)

# Exit codes of the MicroPython process, telling the host what to do next.
EXIT_SOFT_RESET = 42
EXIT_POWER_OFF = 43
