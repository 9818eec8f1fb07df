"""CRC-32C (Castagnoli), the checksum S3 itself supports, with combination of independent parts.

Each tensor is checksummed on its own (so ``verify`` can name the tensor that fails) and the whole
shard's checksum is combined from those, in one pass over the bytes.
"""

from __future__ import annotations

from functools import cache

import crc32c as _crc32c

_POLY = 0x82F63B78  # Castagnoli, bit-reversed


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``value``; releases the GIL for large buffers."""
    return int(_crc32c.crc32c(data, value))


def _times(matrix: tuple[int, ...], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(matrix, matrix[n]) for n in range(32))


@cache
def _zeros_operator(power: int) -> tuple[int, ...]:
    """The GF(2) operator that appends 2**power zero bytes to a CRC register."""
    if power == 0:
        one_bit = (_POLY, *(1 << (n - 1) for n in range(1, 32)))
        two = _square(one_bit)
        four = _square(two)
        return _square(four)  # eight zero bits: one byte
    return _square(_zeros_operator(power - 1))


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of A+B from crc(A), crc(B) and len(B), without reading the bytes again."""
    power = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_zeros_operator(power), crc1)
        len2 >>= 1
        power += 1
    return crc1 ^ crc2
