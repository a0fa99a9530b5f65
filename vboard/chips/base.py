"""Interfaces between the simulated buses and the register-level chip models.

The board's host process owns one I2C bus and one SPI bus per board. The MicroPython side of
the virtual board (vboard/rom) turns every `machine.I2C`/`machine.SPI` call into transactions
that the bus (vboard/bus.py) replays here, so a chip model sees what a real chip sees: its
address with the R/W bit, the bytes written, how many bytes are clocked out, STOP conditions,
chip-select edges — each stamped with the board's *simulated* time in seconds (Unix epoch,
float). Models never read the wall clock; they are deterministic given their seed and the
sequence of calls.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Faults:
    """Fault injection shared by every chip model (the harness flips these while a board runs).

    plugged        False: the chip is not on the bus (I2C: address NACK; SPI: MISO floats).
    crc_error_rate probability in 0..1 that a CRC byte of a reply is corrupted (chips with CRC).
    crc_error_next the next N CRC-protected replies get a corrupted CRC (deterministic tests).
    tc_open        the thermocouple is disconnected (MAX6675 D2, MAX31855 OC).
    tc_short_gnd   the thermocouple is shorted to GND (MAX31855 SCG; the MAX6675 cannot tell).
    tc_short_vcc   the thermocouple is shorted to VCC (MAX31855 SCV; the MAX6675 cannot tell).
    """

    plugged: bool = True
    crc_error_rate: float = 0.0
    crc_error_next: int = 0
    tc_open: bool = False
    tc_short_gnd: bool = False
    tc_short_vcc: bool = False


@dataclass
class Reading:
    """One physical value a chip converted, for comparing what was recorded with what was measured.

    time      simulated time the conversion sampled the physical value
    quantity  e.g. "kT", "cold_junction", "aT", "aH", "die_temp"
    truth     the exact physical value from the signal model
    reported  the value the chip's output code represents (truth quantized to the chip's LSB);
              NaN when the conversion reports a fault instead of a value (open thermocouple)
    raw       the output code (signed where the chip's format is two's complement; the
              SHT2x word includes its status bits)
    """

    time: float
    quantity: str
    truth: float
    reported: float
    raw: int


@runtime_checkable
class I2CDevice(Protocol):
    """A chip on the I2C bus. The bus calls, per transaction:

    address(now, read) -> bool   the 7-bit address matched with R/W bit `read`; True = ACK.
                                 Only called when `now` is after the device's power-on.
    write(now, data) -> int      bytes after an ACKed write address; returns how many were ACKed
                                 (the master stops sending after a NACK, as SoftI2C does).
    read(now, n) -> bytes        n bytes clocked out after an ACKed read address (the master ACKs
                                 all but the last). A chip holding SCL low first (clock
                                 stretching) reports that via stretch().
    stretch(now) -> float        seconds the chip will hold SCL low before the next read byte
                                 (0.0 if none); called right after an ACKed read address.
    stop(now)                    STOP condition (also after a repeated-start sequence ends).
    """

    i2c_address: int
    faults: Faults

    def address(self, now: float, read: bool) -> bool: ...

    def write(self, now: float, data: bytes) -> int: ...

    def read(self, now: float, n: int) -> bytes: ...

    def stretch(self, now: float) -> float: ...

    def stop(self, now: float) -> None: ...


@runtime_checkable
class SPIDevice(Protocol):
    """A chip on the SPI bus behind its own chip-select GPIO.

    select(now)                   CS went low.
    deselect(now)                 CS went high.
    transfer(now, mosi) -> bytes  full-duplex transfer while selected: returns the MISO bytes,
                                  same length as mosi.
    When `faults.plugged` is False the bus does not call the chip and returns floating MISO
    bytes (the board's `miso_float` level) instead.
    """

    faults: Faults

    def select(self, now: float) -> None: ...

    def deselect(self, now: float) -> None: ...

    def transfer(self, now: float, mosi: bytes) -> bytes: ...


@runtime_checkable
class PowerCycled(Protocol):
    """Every chip model: power_cycle(now) removes and restores the chip's supply at `now` (the
    board was power-cycled), leaving it as after power-up. Chips also take `powered_at`, the
    simulated time of their first power-up, as a constructor parameter."""

    def power_cycle(self, now: float) -> None: ...


# Simulated times are Unix-epoch floats, which resolve only ~0.24 us: a deadline met "exactly"
# (a master waiting the datasheet's maximum time) may land a hair early. Chips accept that much.
TIME_SLACK_S = 1e-6


def output_code(value: float, lsb: float, lowest: int, highest: int) -> int:
    """The converter's output code for `value`: nearest multiple of `lsb`, clamped to the code range."""
    return min(highest, max(lowest, round(value / lsb)))


def seeded_rng(seed: int, name: str) -> random.Random:
    """A private random generator for one chip's fault injection (never the global one)."""
    digest = hashlib.blake2b(b"%d\0%s" % (seed, name.encode()), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def take_crc_fault(faults: Faults, rng: random.Random) -> bool:
    """Whether the reply being produced gets corrupted CRCs (consumes one `crc_error_next`)."""
    if faults.crc_error_next > 0:
        faults.crc_error_next -= 1
        return True
    return faults.crc_error_rate > 0 and rng.random() < faults.crc_error_rate


@dataclass
class ReadingLog:
    """Bounded log of the conversions a chip made (newest last). It keeps at least the newest
    `capacity` readings; the oldest are dropped in batches (a per-add trim of a full list would
    cost more than the conversion itself)."""

    capacity: int = 200_000
    items: list[Reading] = field(default_factory=list)

    def add(self, reading: Reading) -> None:
        self.items.append(reading)
        if len(self.items) > self.capacity + max(1, self.capacity // 16):
            del self.items[: len(self.items) - self.capacity]
