"""Maxim MAX31855 (K type) thermocouple converter on SPI, from the datasheet.

32-bit frame, MSB first: D31..D18 thermocouple temperature (signed 14 bits, 0.25 degC),
D17 = 0, D16 fault (OR of D2..D0), D15..D4 internal (cold-junction) temperature (signed 12 bits,
0.0625 degC), D3 = 0, D2 short to VCC, D1 short to GND, D0 open. Conversions run back to back
while CS is high (0.1 s max each); CS low shifts out the newest finished one (see
max6675.ContinuousConverter).

The datasheet does not say what D31..D18 hold during a fault; the model puts `fault_code`
(default full scale, +2047.75 degC) there, so firmware that ignores D16 reports an absurd value.
The internal temperature stays valid during a fault. The thermocouple is converted ideally
(no K-type nonlinearity error).
"""

from __future__ import annotations

import math

from vboard.chips.base import Reading, output_code
from vboard.chips.max6675 import ContinuousConverter
from vboard.chips.signals import COLD_JUNCTION, KT, Environment

MAX31855_CONVERSION_S = 0.1  # max (0.07 typ)
TC_LSB = 0.25
TC_CODE_MIN = -270 * 4  # the converter's range, -270..+1800 degC
TC_CODE_MAX = 1800 * 4
TC_FULL_SCALE = 0x1FFF  # +2047.75 degC
INTERNAL_LSB = 0.0625
INTERNAL_CODE_MIN = -2048
INTERNAL_CODE_MAX = 2047

TC_SHIFT = 18
FAULT = 1 << 16
INTERNAL_SHIFT = 4
SHORT_VCC = 1 << 2
SHORT_GND = 1 << 1
OPEN = 1 << 0


def thermocouple_field(code: int) -> int:
    return (code & 0x3FFF) << TC_SHIFT


def internal_field(code: int) -> int:
    return (code & 0xFFF) << INTERNAL_SHIFT


class MAX31855(ContinuousConverter):
    conversion_s = MAX31855_CONVERSION_S
    frame_bytes = 4

    def __init__(
        self,
        env: Environment,
        *,
        powered_at: float = 0.0,
        miso_float: int = 0x00,
        fault_code: int = TC_FULL_SCALE,
    ) -> None:
        self.fault_code = fault_code
        super().__init__(env, powered_at=powered_at, miso_float=miso_float)

    def _fault_bits(self) -> int:
        faults = self.faults
        return (
            (SHORT_VCC if faults.tc_short_vcc else 0)
            | (SHORT_GND if faults.tc_short_gnd else 0)
            | (OPEN if faults.tc_open else 0)
        )

    def _convert(self, sampled_at: float) -> int:
        tc_truth = self.env.value(KT, sampled_at)
        cj_truth = self.env.value(COLD_JUNCTION, sampled_at)
        internal_code = output_code(cj_truth, INTERNAL_LSB, INTERNAL_CODE_MIN, INTERNAL_CODE_MAX)
        self.log.add(
            Reading(sampled_at, COLD_JUNCTION, cj_truth, internal_code * INTERNAL_LSB, internal_code)
        )
        fault_bits = self._fault_bits()
        if fault_bits:
            frame = thermocouple_field(self.fault_code) | FAULT | internal_field(internal_code) | fault_bits
            self.log.add(Reading(sampled_at, KT, tc_truth, math.nan, self.fault_code))
            return frame
        tc_code = output_code(tc_truth, TC_LSB, TC_CODE_MIN, TC_CODE_MAX)
        self.log.add(Reading(sampled_at, KT, tc_truth, tc_code * TC_LSB, tc_code))
        return thermocouple_field(tc_code) | internal_field(internal_code)
