"""Register-level models of the chips on a labfleet board, and factories for scenario files.

Typical wiring of one board (`now` = simulated Unix time of the power-up):

    env = make_environment(seed, {"thermocouple": {"base": 250, "amplitude": 30, "period_s": 3600}})
    rtc = DS3231(env, powered_at=now, clock_at_power_on=now if rtc_was_set else None, drift_ppm=2.0)
    sht = make_i2c_chip("SHT30", env, address=0x45, powered_at=now)
    tc = make_spi_chip("MAX6675", env, powered_at=now, miso_float=0x00)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vboard.chips.base import I2CDevice, SPIDevice
from vboard.chips.ds3231 import DS3231
from vboard.chips.max6675 import MAX6675
from vboard.chips.max31855 import MAX31855
from vboard.chips.sht2x import SHT2x
from vboard.chips.sht3x import SHT3x
from vboard.chips.signals import Environment

# Typed by bus, so mypy checks each model against its bus protocol.
I2C_CHIPS: dict[str, Callable[..., I2CDevice]] = {"DS3231": DS3231, "SHT30": SHT3x, "SHT20": SHT2x}
SPI_CHIPS: dict[str, Callable[..., SPIDevice]] = {"MAX6675": MAX6675, "MAX31855": MAX31855}
CHIP_KINDS = (*I2C_CHIPS, *SPI_CHIPS)


def make_environment(seed: int, params: Mapping[str, Mapping[str, Any]] | None = None) -> Environment:
    """One board's physical world; `params` maps quantities (or aliases) to signal parameters."""
    return Environment.from_params(seed, params)


def _lookup(kind: str, table: Mapping[str, Callable[..., Any]], what: str) -> Callable[..., Any]:
    try:
        return table[kind.upper()]
    except KeyError:
        raise ValueError(f"unknown {what} {kind!r}, expected one of {', '.join(table)}") from None


def make_i2c_chip(kind: str, env: Environment, **params: Any) -> I2CDevice:
    """An I2C chip model by part name ("DS3231", "SHT30", "SHT20"); `params` are the model's
    keyword arguments (unknown ones raise TypeError)."""
    chip: I2CDevice = _lookup(kind, I2C_CHIPS, "I2C chip")(env, **params)
    return chip


def make_spi_chip(kind: str, env: Environment, **params: Any) -> SPIDevice:
    """An SPI chip model by part name ("MAX6675", "MAX31855")."""
    chip: SPIDevice = _lookup(kind, SPI_CHIPS, "SPI chip")(env, **params)
    return chip


def make_chip(kind: str, env: Environment, **params: Any) -> I2CDevice | SPIDevice:
    """Any chip model by part name (as in the board config and scenario files)."""
    if kind.upper() in SPI_CHIPS:
        return make_spi_chip(kind, env, **params)
    if kind.upper() in I2C_CHIPS:
        return make_i2c_chip(kind, env, **params)
    raise ValueError(f"unknown chip {kind!r}, expected one of {', '.join(CHIP_KINDS)}")


__all__ = [
    "CHIP_KINDS",
    "DS3231",
    "I2C_CHIPS",
    "MAX6675",
    "MAX31855",
    "SPI_CHIPS",
    "Environment",
    "SHT2x",
    "SHT3x",
    "make_chip",
    "make_environment",
    "make_i2c_chip",
    "make_spi_chip",
]
