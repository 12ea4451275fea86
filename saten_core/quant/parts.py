"""Quantized Saten parts: the kept sparse values and the TT cores stored as packed codes + per-group scales.

A part (any tensor, taken flat in row-major order) is cut into groups of PART_GROUP consecutive numbers, each
with one scale at the deploy dtype and symmetric codes (no minimum: kept residual values and TT cores are centred
on zero). 16 bits means "not quantized": the part stays at the deploy dtype. Pure tensor functions; SatenLinear
owns where the codes and scales live.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saten_core.quant.grid import Grid, dequantize, pack, packed_bytes, round_to_nearest, unpack

VALUE_BITS = (16, 8, 4)  # --value-bits: kept sparse values
CORE_BITS = (16, 8)  # --core-bits: TT cores (4-bit cores measured useless in TT literature; not offered)
PART_GROUP = 64  # numbers per scale


def part_grid(bits: int) -> Grid:
    return Grid(bits, PART_GROUP, symmetric=True)


def part_groups(numel: int) -> int:
    return math.ceil(numel / PART_GROUP)


def part_bytes(numel: int, bits: int, elem: int) -> int:
    """Exact stored bytes of a part of `numel` numbers: codes + one scale of `elem` bytes per group (16: numel x
    elem, unquantized)."""
    if bits == 16:
        return numel * elem
    return packed_bytes(numel, bits) + part_groups(numel) * elem


def _padded(t: Tensor) -> Tensor:
    """Flat (1, groups x PART_GROUP) copy of `t`, zero-padded so every group is whole."""
    flat = t.reshape(-1).float()
    pad = part_groups(flat.numel()) * PART_GROUP - flat.numel()
    return torch.cat([flat, flat.new_zeros(pad)])[None] if pad else flat[None]


def quantize_part(t: Tensor, bits: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(packed codes uint8, scales (groups,) float32 on `dtype`'s grid) of `t` on a symmetric `bits` grid.

    Example:
        >>> codes, scales = quantize_part(torch.randn(100), 8, torch.bfloat16)
        >>> codes.numel(), scales.numel()
        (104, 2)
    """
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device), torch.empty(0, device=t.device)
    codes, scales, _ = round_to_nearest(_padded(t), part_grid(bits), dtype)
    return pack(codes.reshape(-1)[: t.numel()], bits), scales.reshape(-1)


def dequantize_part(codes: Tensor, scales: Tensor, bits: int, numel: int, dtype: torch.dtype) -> Tensor:
    """The (numel,) numbers at `dtype` that `codes` stand for; differentiable in `scales`."""
    if numel == 0:
        return scales.new_empty(0, dtype=dtype)
    flat = unpack(codes, bits, numel)
    pad = part_groups(numel) * PART_GROUP - numel
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return dequantize(flat[None], part_grid(bits), scales[None], None, dtype).reshape(-1)[:numel]


def fake_quantize(t: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """`t` rounded to its stored grid (shape and dtype kept): what a fit must correct for (16 bits: unchanged)."""
    if bits == 16 or t.numel() == 0:
        return t
    codes, scales = quantize_part(t, bits, dtype)
    return dequantize_part(codes, scales, bits, t.numel(), torch.float32).reshape(t.shape).to(t.dtype)
