"""The board's wiring: GPIO levels, the I2C and SPI buses, and what is attached to them.

The MicroPython side (vboard/rom/vb_machine.py) sends every pin configuration, pin write,
I2C primitive sequence and SPI transfer here; this module replays them on the chip models
(vboard/chips) the way the ESP8266's pins and the bit-banged SoftI2C / HSPI would.

GPIO electrical model: a pin's level is the wired result of the ESP8266's own driver (input,
push-pull output, open-drain output, internal pull-up) and external drivers: open-drain
outputs such as the DS3231's SQW, buttons and jumpers to GND, and board pull-ups/pull-downs
(NodeMCU: GPIO0 and GPIO2 pulled up, GPIO15 pulled down for the boot mode straps). Anything
pulling low wins; an undriven pin with no pull reads 0.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from vboard.chips.base import I2CDevice, SPIDevice
from vboard.rom import vb_ipc as ipc

MODE_IN = 0
MODE_OUT = 1
MODE_OPEN_DRAIN = 2
# NodeMCU/ESP-12 strapping resistors: GPIO0/GPIO2 high and GPIO15 low at boot.
NODEMCU_PULLS: dict[int, int] = {0: 1, 2: 1, 15: 0}


@dataclass
class PinState:
    mode: int = MODE_IN
    out: int = 0
    pull_up: bool = False
    board_pull: int | None = None  # resistor on the board: 1 up, 0 down
    external: dict[str, int | None] = field(default_factory=dict)  # driver -> 0 low / 1 high / None released

    def level(self) -> int:
        if self.mode == MODE_OUT:
            return self.out
        if self.mode == MODE_OPEN_DRAIN and self.out == 0:
            return 0
        driven = [v for v in self.external.values() if v is not None]
        if 0 in driven:
            return 0
        if 1 in driven:
            return 1
        if self.pull_up or self.board_pull == 1:
            return 1
        return 0


class Pins:
    """The 17 GPIOs; `listeners` hear every level change as (gpio, level)."""

    def __init__(self, board_pulls: dict[int, int] | None = None) -> None:
        pulls = NODEMCU_PULLS if board_pulls is None else board_pulls
        self.state = [PinState(board_pull=pulls.get(i)) for i in range(17)]
        self.listeners: list[Callable[[int, int], None]] = []

    def level(self, gpio: int) -> int:
        return self.state[gpio].level()

    def levels(self) -> list[tuple[int, int]]:
        return [(i, s.level()) for i, s in enumerate(self.state)]

    def _changed(self, gpio: int, before: int) -> None:
        after = self.state[gpio].level()
        if after != before:
            for listener in list(self.listeners):
                listener(gpio, after)

    def configure(self, gpio: int, mode: int, pull: int, value: int) -> int:
        pin = self.state[gpio]
        before = pin.level()
        if mode >= 0:
            pin.mode = mode
        if pull >= 0:
            pin.pull_up = pull == 1
        if value >= 0:
            pin.out = value
        self._changed(gpio, before)
        return pin.level()

    def write(self, gpio: int, value: int) -> None:
        pin = self.state[gpio]
        before = pin.level()
        pin.out = 1 if value else 0
        self._changed(gpio, before)

    def drive(self, gpio: int, driver: str, value: int | None) -> None:
        """An external driver pulls the pin low (0), drives it high (1) or lets go (None)."""
        pin = self.state[gpio]
        before = pin.level()
        pin.external[driver] = value
        self._changed(gpio, before)

    def reset(self) -> None:
        """Chip reset: every GPIO back to input without pull-up (external drivers stay)."""
        for gpio, pin in enumerate(self.state):
            before = pin.level()
            pin.mode, pin.out, pin.pull_up = MODE_IN, 0, False
            self._changed(gpio, before)


class I2CStatus(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


@dataclass
class I2CResult:
    status: int
    reply: bytes
    stretch_s: float  # simulated seconds the bus was held by clock stretching


class I2CBus:
    """Devices on one SCL/SDA pair. Replays SoftI2C primitive sequences (see vb_ipc)."""

    def __init__(self, scl: int, sda: int) -> None:
        self.scl = scl
        self.sda = sda
        self.devices: dict[int, I2CDevice] = {}
        self._expect_address = False
        self._active: I2CDevice | None = None
        self._reading = False
        self._stretch_pending = 0.0
        self._held_until = 0.0
        self.transactions = 0

    def attach(self, device: I2CDevice) -> None:
        if device.i2c_address in self.devices:
            raise ValueError(f"two devices at I2C address 0x{device.i2c_address:02x}")
        self.devices[device.i2c_address] = device

    def _wait_scl(self, now: float, timeout_s: float) -> float:
        """A master releasing SCL while a chip still holds it: wait or time out."""
        if self._held_until <= now:
            return 0.0
        wait = self._held_until - now
        if wait > timeout_s:
            raise I2CStatus(errno.ETIMEDOUT)
        return wait

    def run(self, now: float, timeout_us: int, steps: bytes) -> I2CResult:
        timeout_s = timeout_us / 1_000_000
        reply = bytearray()
        t = now
        i = 0
        self.transactions += 1
        try:
            while i < len(steps):
                op = steps[i]
                i += 1
                if op == ipc.I2C_START:
                    t += self._wait_scl(t, timeout_s)
                    if self._active is not None and not self._reading:
                        pass  # repeated start: the addressed chip sees a new address phase
                    self._expect_address = True
                    self._active = None
                    self._reading = False
                elif op == ipc.I2C_STOP:
                    t += self._wait_scl(t, timeout_s)
                    for device in self.devices.values():
                        if device.faults.plugged:
                            device.stop(t)
                    self._active = None
                    self._expect_address = False
                elif op == ipc.I2C_WRITE:
                    n = int.from_bytes(steps[i : i + 2], "little")
                    data = steps[i + 2 : i + 2 + n]
                    i += 2 + n
                    reply += self._write(t, data).to_bytes(2, "little")
                elif op == ipc.I2C_READ:
                    n = int.from_bytes(steps[i : i + 2], "little")
                    i += 3
                    if self._stretch_pending:
                        stretch = self._stretch_pending
                        self._stretch_pending = 0.0
                        self._held_until = t + stretch
                        t += self._wait_scl(t, timeout_s)
                    reply += self._read(t, n)
                else:
                    raise ValueError(f"bad I2C step 0x{op:02x}")
        except I2CStatus as e:
            self._active = None
            self._expect_address = False
            return I2CResult(e.errno, bytes(reply), t - now)
        return I2CResult(0, bytes(reply), t - now)

    def _write(self, t: float, data: bytes) -> int:
        if not data:
            return 0
        if self._expect_address:
            self._expect_address = False
            addr, read = data[0] >> 1, bool(data[0] & 1)
            device = self.devices.get(addr)
            if device is None or not device.faults.plugged or not device.address(t, read):
                return 0
            self._active = device
            self._reading = read
            if read:
                self._stretch_pending = device.stretch(t)
                return 1
            return 1 + device.write(t, bytes(data[1:])) if len(data) > 1 else 1
        if self._active is None or self._reading:
            return 0  # nobody acknowledges: SDA stays high
        return self._active.write(t, bytes(data))

    def _read(self, t: float, n: int) -> bytes:
        if self._active is None or not self._reading:
            return b"\xff" * n  # released SDA reads high
        data = self._active.read(t, n)
        return data + b"\xff" * (n - len(data))


class SPIBus:
    """Chips on one SCK/MOSI/MISO set, each behind its chip-select GPIO."""

    def __init__(self, pins: Pins, sck: int, mosi: int, miso: int, miso_float: int = 0x00) -> None:
        self.sck, self.mosi, self.miso = sck, mosi, miso
        self.miso_float = miso_float
        self.devices: dict[int, SPIDevice] = {}
        self._pins = pins
        self._clock: Callable[[], float] = lambda: 0.0
        pins.listeners.append(self._on_pin)

    def attach(self, cs_gpio: int, device: SPIDevice, clock: Callable[[], float]) -> None:
        if cs_gpio in self.devices:
            raise ValueError(f"two SPI devices on chip select GPIO{cs_gpio}")
        self.devices[cs_gpio] = device
        self._clock = clock

    def _on_pin(self, gpio: int, level: int) -> None:
        device = self.devices.get(gpio)
        if device is None or not device.faults.plugged:
            return
        if level:
            device.deselect(self._clock())
        else:
            device.select(self._clock())

    def transfer(self, now: float, mosi: bytes) -> bytes:
        selected = [d for cs, d in self.devices.items() if self._pins.level(cs) == 0 and d.faults.plugged]
        if not selected:
            return bytes([self.miso_float]) * len(mosi)
        return selected[0].transfer(now, mosi)
