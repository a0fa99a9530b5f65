"""Deterministic physical quantities a virtual board's chips measure.

A `Signal` is base + slow sinusoids (periods of minutes to days) + noise, evaluated at the start
of the simulated second: its value is constant within each integer second, so every read in
the same second sees the same value and a recorded sample can be compared exactly with the
ground truth. The noise is a Gaussian drawn from a keyed hash of (seed, channel, second) — not
Python's salted `hash` nor any global random state — so two boards built from the same seed
see the same world, in any process, and different seeds give different worlds.

An `Environment` holds one board's signals, one per quantity (the names `Reading.quantity`
uses), plus step overrides injected at run time:

    env = Environment.from_params(seed=7, params={"thermocouple": {"base": 250, "amplitude": 30,
                                                                   "period_s": 3600, "noise": 0.3}})
    env.value("kT", t)
    env.set_override("kT", 500.0, at=t0)   # a step from t0 on
    env.clear_override("kT", at=t1)        # back to the signal from t1 on
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KT = "kT"  # thermocouple hot-junction temperature, degC
COLD_JUNCTION = "cold_junction"  # thermocouple converter die / board temperature, degC
AT = "aT"  # ambient temperature, degC
AH = "aH"  # ambient relative humidity, %RH
DIE_TEMP = "die_temp"  # DS3231 die temperature, degC
QUANTITIES = (KT, COLD_JUNCTION, AT, AH, DIE_TEMP)

# Friendlier names a scenario file may use for the same quantities.
ALIASES = {
    "thermocouple": KT,
    "board": COLD_JUNCTION,
    "ambient_temperature": AT,
    "ambient_humidity": AH,
    "humidity": AH,
    "rtc": DIE_TEMP,
    "rtc_die": DIE_TEMP,
}

DAY_S = 86_400.0
TWO_PI = 2.0 * math.pi


def _digest(seed: int, channel: str, tag: str, index: int) -> bytes:
    key = struct.pack("<q", seed) + channel.encode() + b"\0" + tag.encode() + struct.pack("<q", index)
    return hashlib.blake2b(key, digest_size=16).digest()


def unit_uniforms(seed: int, channel: str, tag: str, index: int) -> tuple[float, float]:
    """Two independent uniforms in (0, 1], a pure function of the arguments."""
    high, low = struct.unpack("<QQ", _digest(seed, channel, tag, index))
    scale = 1.0 / 18446744073709551616.0  # 2**64
    return (high + 1) * scale, (low + 1) * scale


def gaussian(seed: int, channel: str, index: int) -> float:
    """A standard normal deviate keyed on (seed, channel, index) (Box-Muller)."""
    u1, u2 = unit_uniforms(seed, channel, "noise", index)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(TWO_PI * u2)


@dataclass(frozen=True)
class Wave:
    """A sinusoidal drift term: amplitude * sin(2 pi t / period_s + phase)."""

    amplitude: float
    period_s: float
    phase: float = 0.0

    def __post_init__(self) -> None:
        if not self.period_s > 0:
            raise ValueError(f"a wave's period_s must be positive, got {self.period_s!r}")


@dataclass(frozen=True)
class Signal:
    """base + waves + noise (standard deviation), clamped to [low, high], per integer second."""

    channel: str
    seed: int
    base: float
    waves: tuple[Wave, ...] = ()
    noise: float = 0.0
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        if self.noise < 0:
            raise ValueError(f"{self.channel}: noise must be >= 0, got {self.noise!r}")
        if not self.low <= self.high:
            raise ValueError(f"{self.channel}: low {self.low!r} is above high {self.high!r}")

    def value(self, t: float) -> float:
        second = math.floor(t)
        value = self.base
        for wave in self.waves:
            value += wave.amplitude * math.sin(TWO_PI * second / wave.period_s + wave.phase)
        if self.noise:
            value += self.noise * gaussian(self.seed, self.channel, second)
        return min(self.high, max(self.low, value))


# Defaults give a plausible lab: a kiln-like thermocouple cycling hourly well inside both
# converters' ranges, a room drifting daily, boards a few degrees above the room.
DEFAULTS: dict[str, dict[str, Any]] = {
    KT: {
        "base": 210.0,
        "waves": [{"amplitude": 120.0, "period_s": 3600.0}, {"amplitude": 40.0, "period_s": DAY_S}],
        "noise": 0.4,
        "low": 0.0,  # MAX6675 range 0..1023.75 degC (the MAX31855's is wider)
        "high": 1023.75,
    },
    COLD_JUNCTION: {
        "base": 27.0,
        "waves": [{"amplitude": 1.5, "period_s": DAY_S}],
        "noise": 0.05,
        "low": -20.0,  # MAX6675 operating range
        "high": 85.0,
    },
    AT: {
        "base": 23.0,
        "waves": [{"amplitude": 2.0, "period_s": DAY_S}, {"amplitude": 0.3, "period_s": 1800.0}],
        "noise": 0.05,
        "low": -40.0,  # SHT20 range (the SHT30's is wider)
        "high": 125.0,
    },
    AH: {
        "base": 45.0,
        "waves": [{"amplitude": 8.0, "period_s": DAY_S}, {"amplitude": 1.0, "period_s": 2700.0}],
        "noise": 0.3,
        "low": 0.0,
        "high": 100.0,
    },
    DIE_TEMP: {
        "base": 28.0,
        "waves": [{"amplitude": 1.5, "period_s": DAY_S}],
        "noise": 0.05,
        "low": -40.0,  # DS3231 operating range
        "high": 85.0,
    },
}

PARAM_KEYS = ("base", "amplitude", "period_s", "phase", "waves", "noise", "low", "high")


def _random_phase(seed: int, channel: str, index: int) -> float:
    return TWO_PI * unit_uniforms(seed, channel, "phase", index)[0]


def make_signal(quantity: str, seed: int, params: Mapping[str, Any] | None = None) -> Signal:
    """The signal for `quantity`: its defaults updated with `params`.

    params keys: base, noise, low, high; waves: [{amplitude, period_s[, phase]}] replacing the
    default waves; amplitude/period_s[/phase]: shorthand for a single wave (replaces the default
    waves too). A wave without a phase gets one drawn from the seed, so boards differ.
    """
    if quantity not in DEFAULTS:
        raise ValueError(f"unknown quantity {quantity!r}, expected one of {', '.join(QUANTITIES)}")
    given = dict(params or {})
    unknown = sorted(set(given) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(f"{quantity}: unknown signal parameters {', '.join(unknown)}")
    if "waves" in given and "amplitude" in given:
        raise ValueError(f"{quantity}: give either waves or amplitude/period_s, not both")
    merged = {**DEFAULTS[quantity], **given}
    if "amplitude" in given:
        merged["waves"] = [
            {
                "amplitude": given["amplitude"],
                "period_s": given.get("period_s", DAY_S),
                **({"phase": given["phase"]} if "phase" in given else {}),
            }
        ]
    waves = tuple(
        Wave(
            amplitude=float(spec["amplitude"]),
            period_s=float(spec["period_s"]),
            phase=float(spec["phase"]) if "phase" in spec else _random_phase(seed, quantity, index),
        )
        for index, spec in enumerate(merged["waves"])
    )
    return Signal(
        channel=quantity,
        seed=seed,
        base=float(merged["base"]),
        waves=waves,
        noise=float(merged["noise"]),
        low=float(merged["low"]),
        high=float(merged["high"]),
    )


def canonical_quantity(name: str) -> str:
    quantity = ALIASES.get(name, name)
    if quantity not in QUANTITIES:
        known = ", ".join(sorted((*QUANTITIES, *ALIASES)))
        raise ValueError(f"unknown quantity {name!r}, expected one of {known}")
    return quantity


@dataclass
class Environment:
    """The physical world of one board: a signal per quantity and run-time step overrides."""

    seed: int
    signals: dict[str, Signal]
    # per quantity: (from time, value or None = back to the signal), in the order they were set
    overrides: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)

    @classmethod
    def from_params(cls, seed: int, params: Mapping[str, Mapping[str, Any]] | None = None) -> Environment:
        """Signals for every quantity; `params` maps quantity names (or aliases) to signal params."""
        by_quantity: dict[str, Mapping[str, Any]] = {}
        for name, quantity_params in (params or {}).items():
            quantity = canonical_quantity(name)
            if quantity in by_quantity:
                raise ValueError(f"parameters for {quantity} given twice")
            by_quantity[quantity] = quantity_params
        signals = {q: make_signal(q, seed, by_quantity.get(q)) for q in QUANTITIES}
        return cls(seed=seed, signals=signals)

    def value(self, quantity: str, t: float) -> float:
        steps = self.overrides.get(quantity)
        if steps:
            for since, value in reversed(steps):
                if since <= t:
                    if value is not None:
                        return value
                    break
        return self.signals[quantity].value(t)

    def set_override(self, quantity: str, value: float, at: float = -math.inf) -> None:
        """From simulated time `at` on, `quantity` reads `value` (a step change)."""
        self.overrides.setdefault(canonical_quantity(quantity), []).append((at, float(value)))

    def clear_override(self, quantity: str | None = None, at: float = -math.inf) -> None:
        """From `at` on, `quantity` (or every overridden quantity) follows its signal again."""
        names = [canonical_quantity(quantity)] if quantity is not None else list(self.overrides)
        for name in names:
            if at == -math.inf:
                self.overrides.pop(name, None)
            else:
                self.overrides.setdefault(name, []).append((at, None))
