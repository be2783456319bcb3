"""Bit packing: n unsigned integers of `bits` bits each <-> ceil(n * bits / 8) bytes.

Little-endian within the stream: value i occupies bits [i*bits, (i+1)*bits)
of the byte string, least significant bit first (the layout of GGML's and
GPTQ's packed tensors, read as one bit stream). Any width from 1 to 32 bits.
"""

from __future__ import annotations

import math

import torch


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` values of `bits` bits take packed."""
    return math.ceil(n * bits / 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D integer tensor with entries in [0, 2**bits) into a uint8 tensor."""
    _check_width(bits)
    values = values.reshape(-1).to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) to pack in {bits} bits")
    shifts = torch.arange(bits, device=values.device)
    stream = ((values[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)  # [n * bits], LSB first
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = (1 << torch.arange(8, device=values.device)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` values (int64) of a stream packed by `pack_bits`."""
    _check_width(bits)
    if packed.numel() < packed_size(n, bits):
        raise ValueError(f"{packed.numel()} bytes hold fewer than {n} values of {bits} bits")
    stream = (packed.reshape(-1, 1).to(torch.int64) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: n * bits].reshape(n, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1)


def _check_width(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ValueError(f"cannot pack {bits}-bit values (1 to 32 bits)")
