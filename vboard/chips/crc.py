"""CRC-8 of the Sensirion humidity sensors (polynomial x^8 + x^5 + x^4 + 1, no reflection, no final XOR).

The SHT3x and SHT2x use the same polynomial and differ only in the start value: SHT3x-DIS
datasheet table 20 (init 0xFF, CRC(0xBEEF) = 0x92); SHT2x datasheet section 5.7 and the
"CRC Checksum Calculation for SHT2x" application note (init 0x00, CRC(0xDC) = 0x79,
CRC(0x683A) = 0x7C).
"""

from __future__ import annotations

SENSIRION_POLYNOMIAL = 0x31  # x^8 + x^5 + x^4 + 1 with the x^8 term implied (0x131)
SHT3X_CRC_INIT = 0xFF
SHT2X_CRC_INIT = 0x00


def _build_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ SENSIRION_POLYNOMIAL) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_TABLE = _build_table()


def crc8(data: bytes, init: int) -> int:
    crc = init
    for byte in data:
        crc = _TABLE[crc ^ byte]
    return crc


def sht3x_crc(data: bytes) -> int:
    return crc8(data, SHT3X_CRC_INIT)


def sht2x_crc(data: bytes) -> int:
    return crc8(data, SHT2X_CRC_INIT)
