# `machine` as the MicroPython ESP8266 port documents it, on simulated hardware.
#
# Pins, buses, the watchdog and resets are carried out by the host process (vboard/board.py)
# through vb_hal; the level of input pins is cached here and kept current by host events, so
# reading a pin costs no round trip. Names, constants and exception types follow the
# ESP8266 port (ports/esp8266/modmachine.c, machine_pin.c, extmod/machine_i2c.c, ...).

import struct

import vb_hal as hal
import vb_ipc as ipc
import vb_time

# reset causes (ESP8266 SDK rst_reason values, as the port exposes them)
PWRON_RESET = 0
WDT_RESET = 1
SOFT_RESET = 4
DEEPSLEEP_RESET = 5
HARD_RESET = 6
DEEPSLEEP = 4  # wake reasons
WLAN_WAKE = 1
PIN_WAKE = 2
RTC_WAKE = 3

_VALID_GPIOS = (0, 1, 2, 3, 4, 5, 9, 10, 12, 13, 14, 15, 16)
_EIO = 5
_ENODEV = 19
_ETIMEDOUT = 110


def _gpio_of(pin):
    if isinstance(pin, Pin):
        return pin.id
    raise ValueError("expecting a pin")


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __new__(cls, id, mode=-1, pull=-1, *, value=None):
        self = _PINS.get(id) if isinstance(id, int) else None
        if self is None:
            raise ValueError("invalid pin")
        return self

    def __init__(self, id, mode=-1, pull=-1, *, value=None):
        if mode != -1 or pull != -1 or value is not None:
            self.init(mode, pull, value=value)

    def __repr__(self):
        return "Pin(%d)" % self.id

    def init(self, mode=-1, pull=-1, *, value=None):
        if pull is None:
            pull = 0
        if self.id == 16 and pull not in (-1, 0):
            raise ValueError("Pin(16) doesn't support pull")
        if mode not in (-1, Pin.IN, Pin.OUT, Pin.OPEN_DRAIN):
            raise ValueError("invalid pin mode")
        if mode != -1:
            self._mode = mode
        out = -1
        if value is not None:
            self._out = 1 if value else 0
            out = self._out
        level = hal.request(ipc.OP_PIN_CFG, struct.pack(ipc.PIN_CFG, self.id, mode, pull, out))[0]
        hal.pin_levels[self.id] = level

    def value(self, x=None):
        if x is None:
            return hal.pin_levels[self.id]
        self._out = 1 if x else 0
        if self._mode != Pin.IN:
            hal.pin_levels[self.id] = self._out if self._mode == Pin.OUT else hal.pin_levels[self.id]
        hal.post(ipc.OP_PIN_SET, struct.pack(ipc.PIN_SET, self.id, self._out, hal.sim_us()))
        return None

    __call__ = value

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=IRQ_FALLING | IRQ_RISING, *, hard=False):
        if self.id >= 16:
            raise OSError("pin does not have IRQ capabilities")
        if hard:
            # The ESP8266 port runs every pin IRQ through the scheduler.
            raise ValueError("hard IRQ not supported")
        hal.set_irq(self.id, trigger, handler, self)
        return _PIN_IRQS[self.id]


class _PinIRQ:
    def __init__(self, gpio):
        self._gpio = gpio

    def trigger(self, trigger=None):
        entry = hal.pin_irqs[self._gpio]
        return entry[0] if entry else 0


def _static_pin(gpio):
    pin = object.__new__(Pin)
    pin.id = gpio
    pin._mode = Pin.IN
    pin._out = 0
    return pin


# The port's pin objects and their IRQ objects are static (machine_pin.c: pyb_pin_obj[],
# pin_irq_obj[]): machine.Pin(n) and pin.irq() allocate nothing on a board, so they are all made
# here, before boot.py, and count as ROM.
_PINS = {gpio: _static_pin(gpio) for gpio in _VALID_GPIOS}
_PIN_IRQS = {gpio: _PinIRQ(gpio) for gpio in _VALID_GPIOS if gpio < 16}


class Signal:
    def __init__(self, pin, *args, invert=False, **kwargs):
        if not isinstance(pin, Pin):
            pin = Pin(pin, *args, **kwargs)
        self._pin = pin
        self._invert = invert

    def value(self, x=None):
        if x is None:
            return self._pin.value() ^ self._invert
        self._pin.value((1 if x else 0) ^ self._invert)
        return None

    __call__ = value

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)


# -- I2C (on the ESP8266, machine.I2C is the bit-banged SoftI2C) --------------------------


def _i2c_bits(steps):
    """Bits clocked on the bus by an OP_I2C step sequence (vb_ipc.py): START and STOP one each."""
    bits = 0
    i = 0
    n = len(steps)
    while i < n:
        op = steps[i]
        if op == ipc.I2C_WRITE:
            count = steps[i + 1] | steps[i + 2] << 8
            bits += 9 * count
            i += 3 + count
        elif op == ipc.I2C_READ:
            bits += 9 * (steps[i + 1] | steps[i + 2] << 8)
            i += 4
        else:
            bits += 1
            i += 1
    return bits


class SoftI2C:
    def __init__(self, scl=None, sda=None, *, freq=400000, timeout=50000):
        self.init(scl, sda, freq=freq, timeout=timeout)

    def init(self, scl, sda, *, freq=400000, timeout=50000):
        if scl is None or sda is None:
            raise TypeError("'scl' and 'sda' arguments required")
        self._scl = _gpio_of(scl)
        self._sda = _gpio_of(sda)
        self._freq = freq
        self._timeout = timeout
        # The pins become open-drain outputs released high, as mp_hal_i2c_init leaves them.
        scl.init(Pin.OPEN_DRAIN, value=1)
        sda.init(Pin.OPEN_DRAIN, value=1)

    def __repr__(self):
        return "SoftI2C(scl=%d, sda=%d, freq=%d)" % (self._scl, self._sda, self._freq)

    def _run(self, steps):
        # Bus time as the port's bit-banging spends it: every bit is two half-periods of
        # us_delay = 500000 // freq (at least 1 us; extmod/machine_i2c.c), nine bits a byte.
        half_us = 500000 // self._freq or 1
        try:
            reply = hal.request(
                ipc.OP_I2C, struct.pack(ipc.I2C_HEAD, self._scl, self._sda, self._timeout) + steps
            )
        except OSError as e:
            if e.errno == 110:  # a chip stretched the clock past the timeout: that long
                hal.charge_us(self._timeout)
            raise
        end = len(reply) - ipc.I2C_TRAILER_SIZE
        rise, period, stretch_us = struct.unpack_from(ipc.I2C_TRAILER, reply, end)
        hal.charge_us(_i2c_bits(steps) * 2 * half_us + stretch_us)
        if rise != -2:
            hal.set_sqw(rise, period)
        return reply[:end]

    @staticmethod
    def _write_step(data):
        return struct.pack("<BH", ipc.I2C_WRITE, len(data)) + data

    @staticmethod
    def _read_step(n, nack_last=True):
        return struct.pack("<BHB", ipc.I2C_READ, n, 1 if nack_last else 0)

    def _transfer(self, addr, data, read_n, stop):
        hal.native_enter()
        try:
            return self._transfer_native(addr, data, read_n, stop)
        finally:
            hal.native_exit()

    def _transfer_native(self, addr, data, read_n, stop):
        """One SoftI2C transfer as mp_machine_soft_i2c_transfer does it.
        Returns (acks, data). Raises OSError(ENODEV) when the address is not acknowledged."""
        steps = bytes((ipc.I2C_START,))
        if read_n is None:
            steps += self._write_step(bytes((addr << 1,)) + bytes(data))
        else:
            steps += self._write_step(bytes(((addr << 1) | 1,))) + self._read_step(read_n)
        if stop:
            steps += bytes((ipc.I2C_STOP,))
        reply = self._run(steps)
        acks = struct.unpack_from("<H", reply, 0)[0]
        if acks == 0:
            if not stop:  # the port releases the bus cleanly after an address NACK
                self._run(bytes((ipc.I2C_STOP,)))
            raise OSError(_ENODEV)
        return acks - 1, reply[2:]

    def scan(self):
        found = []
        for addr in range(0x08, 0x78):
            if struct.unpack_from("<H", self._probe(addr), 0)[0]:
                found.append(addr)
        return found

    def _probe(self, addr):
        """START, address byte for a write, STOP: what scan() sends to every address."""
        steps = bytes((ipc.I2C_START,)) + self._write_step(bytes((addr << 1,))) + bytes((ipc.I2C_STOP,))
        return self._run(steps)

    def start(self):
        self._run(bytes((ipc.I2C_START,)))

    def stop(self):
        self._run(bytes((ipc.I2C_STOP,)))

    def write(self, buf):
        reply = self._run(self._write_step(bytes(buf)))
        return struct.unpack_from("<H", reply, 0)[0]

    def readinto(self, buf, nack=True):
        data = self._run(self._read_step(len(buf), nack))
        for i in range(len(buf)):
            buf[i] = data[i]

    def writeto(self, addr, buf, stop=True):
        return self._transfer(addr, buf, None, stop)[0]

    def writevto(self, addr, vector, stop=True):
        data = b""
        for part in vector:
            data += bytes(part)
        return self._transfer(addr, data, None, stop)[0]

    def readfrom(self, addr, nbytes, stop=True):
        return bytes(self._transfer(addr, b"", nbytes, stop)[1])

    def readfrom_into(self, addr, buf, stop=True):
        data = self._transfer(addr, b"", len(buf), stop)[1]
        for i in range(len(buf)):
            buf[i] = data[i]

    @staticmethod
    def _memaddr(memaddr, addrsize):
        if addrsize not in (8, 16, 24, 32):
            raise ValueError("invalid addrsize")
        n = addrsize // 8
        return bytes([(memaddr >> (8 * (n - 1 - i))) & 0xFF for i in range(n)])

    def _read_mem(self, addr, memaddr, n, addrsize):
        ma = self._memaddr(memaddr, addrsize)
        acks = self._transfer(addr, ma, None, False)[0]
        if acks != len(ma):
            # As the port: generate a STOP and return without raising (buffer left as is).
            self._probe(addr)
            return None
        return self._transfer(addr, b"", n, True)[1]

    def readfrom_mem(self, addr, memaddr, nbytes, *, addrsize=8):
        data = self._read_mem(addr, memaddr, nbytes, addrsize)
        return bytes(data) if data is not None else bytes(nbytes)

    def readfrom_mem_into(self, addr, memaddr, buf, *, addrsize=8):
        data = self._read_mem(addr, memaddr, len(buf), addrsize)
        if data is not None:
            for i in range(len(buf)):
                buf[i] = data[i]

    def writeto_mem(self, addr, memaddr, buf, *, addrsize=8):
        self._transfer(addr, self._memaddr(memaddr, addrsize) + bytes(buf), None, True)


class I2C(SoftI2C):
    # machine.I2C on the ESP8266 is SoftI2C; an id of -1 is accepted for old code.
    def __init__(self, id=-1, *, scl=None, sda=None, freq=400000, timeout=50000):
        if id != -1:
            raise ValueError("I2C(%s) doesn't exist" % id)
        super().__init__(scl, sda, freq=freq, timeout=timeout)


# -- SPI -----------------------------------------------------------------------------------

_HSPI_PINS = (14, 13, 12)  # SCK, MOSI, MISO of SPI(1)


class SoftSPI:
    MSB = 0
    LSB = 1

    def __init__(
        self, baudrate=500000, *, polarity=0, phase=0, bits=8, firstbit=MSB, sck=None, mosi=None, miso=None
    ):
        if sck is None or mosi is None or miso is None:
            raise TypeError("must specify all of sck/mosi/miso")
        self._pins = (_gpio_of(sck), _gpio_of(mosi), _gpio_of(miso))
        self.init(baudrate, polarity=polarity, phase=phase, bits=bits, firstbit=firstbit)

    def init(self, baudrate=None, *, polarity=None, phase=None, bits=8, firstbit=0, **kwargs):
        if baudrate is not None:
            self._baud = baudrate
        if polarity is not None:
            self._pol = polarity
        if phase is not None:
            self._pha = phase
        if bits != 8:
            raise ValueError("only 8-bit transfers are supported")
        self._lsb_first = firstbit == SoftSPI.LSB

    def deinit(self):
        pass

    def _xfer(self, mosi):
        hal.native_enter()
        try:
            return self._xfer_native(mosi)
        finally:
            hal.native_exit()

    def _xfer_native(self, mosi):
        head = struct.pack(
            ipc.SPI_HEAD, self._pins[0], self._pins[1], self._pins[2], self._pol, self._pha, self._baud
        )
        miso = hal.request(ipc.OP_SPI, head + mosi)
        hal.charge_us(len(mosi) * 8 * 1000000 // (self._baud or 1))  # eight clocks a byte
        return miso

    def read(self, nbytes, write=0x00):
        return bytes(self._xfer(bytes([write]) * nbytes))

    def readinto(self, buf, write=0x00):
        data = self._xfer(bytes([write]) * len(buf))
        for i in range(len(buf)):
            buf[i] = data[i]

    def write(self, buf):
        self._xfer(bytes(buf))

    def write_readinto(self, write_buf, read_buf):
        if len(write_buf) != len(read_buf):
            raise ValueError("buffers must be the same length")
        data = self._xfer(bytes(write_buf))
        for i in range(len(read_buf)):
            read_buf[i] = data[i]


class SPI(SoftSPI):
    def __init__(
        self, id, baudrate=500000, *, polarity=0, phase=0, bits=8, firstbit=0, sck=None, mosi=None, miso=None
    ):
        if id != 1:
            # SPI(0) drives the flash chip; software SPI is machine.SoftSPI.
            raise ValueError("SPI(%s) doesn't exist" % id)
        if sck is not None or mosi is not None or miso is not None:
            raise ValueError("explicit choice of sck/mosi/miso is not implemented")
        self._pins = _HSPI_PINS
        self._pol = polarity
        self._pha = phase
        self._baud = 0
        self.init(baudrate, polarity=polarity, phase=phase, bits=bits, firstbit=firstbit)

    def init(self, baudrate=None, *, polarity=None, phase=None, bits=8, firstbit=0, **kwargs):
        if baudrate is not None:
            # HSPI divides its 80 MHz clock; the port picks the nearest rate at or below.
            baudrate = min(baudrate, 80000000)
        super().init(baudrate, polarity=polarity, phase=phase, bits=bits, firstbit=firstbit)


# -- RTC, WDT, Timer, UART, ADC, PWM ---------------------------------------------------------


class RTC:
    ALARM0 = 0

    def __new__(cls):
        return _RTC  # static in the port (machine_rtc.c: pyb_rtc_obj)

    def datetime(self, dt=None):
        if dt is None:
            t = vb_time.gmtime()
            us = vb_time.time_ns() // 1000 % 1000000
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], us)
        secs = vb_time.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0))
        vb_time.set_rtc_us(secs * 1000000 + (dt[7] if len(dt) > 7 else 0))
        return None

    def memory(self, data=None):
        if data is None:
            return bytes(hal.call("rtc.memory"))
        if len(data) > 492:
            raise ValueError("buffer too long")
        hal.call("rtc.memory", list(bytes(data)))
        return None

    def alarm(self, id, time):
        hal.call("rtc.alarm", time)

    def alarm_left(self, id=0):
        return hal.call("rtc.alarm_left")

    def irq(self, *, trigger, wake):
        return None


_RTC = object.__new__(RTC)


class WDT:
    # The ESP8266's watchdog has a fixed 5 s timeout, and nothing stops it once started: not
    # even a soft reset (only a hard reset does), as ports/esp8266/machine_wdt.c leaves it.
    def __new__(cls, id=0, timeout=5000):
        return _WDT  # static in the port (machine_wdt.c: wdt_default)

    def __init__(self, id=0, timeout=5000):
        if timeout != 5000 or id != 0:
            raise ValueError()
        hal.call("wdt.start", timeout)
        self._last = 0

    def feed(self):
        # Throttled to one message per 50 real ms: the host only needs to know it was fed.
        now = hal.real_us()
        if now - self._last > 50000:
            self._last = now
            hal.post(ipc.OP_WDT_FEED, struct.pack(ipc.STAMP, hal.sim_us()))

    def deinit(self):
        raise OSError("WDT can't be stopped")


_WDT = object.__new__(WDT)
_WDT._last = 0


class Timer:
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, **kwargs):
        if id != -1:
            raise ValueError("only virtual timers (id=-1) are supported on the ESP8266")
        self._gen = 0
        if kwargs:
            self.init(**kwargs)

    def init(self, *, mode=PERIODIC, period=-1, freq=-1, callback=None, tick_hz=1000):
        if freq > 0:
            period_us = 1000000 // freq
        else:
            period_us = period * 1000000 // tick_hz
        self._gen += 1
        if callback is None or period_us <= 0:
            return
        import _thread

        _thread.start_new_thread(self._run, (self._gen, mode, period_us, callback))

    def _run(self, gen, mode, period_us, callback):
        import micropython

        # not the main thread: the board's clock is the main thread's, this one follows the fleet's
        deadline = hal.fleet_us(hal.real_us()) + period_us
        while gen == self._gen:
            hal.sleep_until_fleet(deadline)
            if gen != self._gen:
                return
            try:
                micropython.schedule(callback, self)
            except RuntimeError:
                pass
            if mode == Timer.ONE_SHOT:
                return
            deadline += period_us

    def deinit(self):
        self._gen += 1


class UART:
    def __init__(self, id, baudrate=115200, **kwargs):
        if id not in (0, 1):
            raise ValueError("UART(%d) does not exist" % id)
        self._id = id

    def init(self, baudrate=115200, **kwargs):
        pass

    def write(self, buf):
        import sys

        if self._id == 0:
            sys.stdout.buffer.write(buf)
        return len(buf)

    def any(self):
        import select
        import sys

        if self._id:
            return 0
        p = select.poll()
        p.register(sys.stdin, select.POLLIN)
        return 1 if p.poll(0) else 0

    def read(self, n=-1):
        import sys

        if self._id or not self.any():
            return None
        return sys.stdin.buffer.read(1 if n < 0 else min(n, 1))


class ADC:
    def __init__(self, id=0):
        if id not in (0, 1):
            raise ValueError("not a valid ADC Channel: %d" % id)
        self._id = id

    def read(self):
        return hal.call("adc.read", self._id)

    def read_u16(self):
        return self.read() * 65535 // 1024


class PWM:
    def __init__(self, pin, freq=None, duty=None, **kwargs):
        self._pin = pin
        self._freq = freq or 1000
        self._duty = duty or 0

    def freq(self, f=None):
        if f is None:
            return self._freq
        self._freq = f
        return None

    def duty(self, d=None):
        if d is None:
            return self._duty
        self._duty = d
        return None

    def deinit(self):
        pass


# -- module functions --------------------------------------------------------------------

_freq = 80000000


def freq(f=None):
    global _freq
    if f is None:
        return _freq
    if f not in (80000000, 160000000):
        raise ValueError("frequency can only be either 80Mhz or 160MHz")
    _freq = f
    return None


def reset():
    # On the ESP8266 a software restart reports SOFT_RESET (4) after it.
    hal.call("reset", SOFT_RESET)
    hal.halt_forever()


def soft_reset():
    raise SystemExit


def reset_cause():
    return hal.params["reset_cause"]


def wake_reason():
    return DEEPSLEEP if hal.params["reset_cause"] == DEEPSLEEP_RESET else 0


def unique_id():
    return bytes(hal.params["unique_id"])


def idle():
    vb_time.sleep_ms(1)


def lightsleep(ms=None):
    vb_time.sleep_ms(ms if ms is not None else 0)


def deepsleep(ms=0):
    hal.call("deepsleep", ms)
    hal.halt_forever()


_irq_state = 1


def disable_irq():
    global _irq_state
    state = _irq_state
    _irq_state = 0
    return state


def enable_irq(state=1):
    global _irq_state
    _irq_state = state


def time_pulse_us(pin, pulse_level, timeout_us=1000000):
    start = hal.ticks_us()
    while pin.value() != pulse_level:
        if hal.ticks_diff(hal.ticks_us(), start) > timeout_us:
            return -2
    begin = hal.ticks_us()
    while pin.value() == pulse_level:
        if hal.ticks_diff(hal.ticks_us(), begin) > timeout_us:
            return -1
    return hal.ticks_diff(hal.ticks_us(), begin)
