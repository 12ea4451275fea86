"""Round-to-nearest quantization grids and exact bit packing: pure tensor functions.

A weight (out, in) is cut into groups of `group` consecutive inputs per output row (group 0: the whole row).
Each group has a 16-bit scale and, when asymmetric, a 16-bit minimum (GGUF Q4_1's layout: w = scale * code +
min). Symmetric grids follow torchao's choose_qparams_affine: codes in [-2^(b-1), 2^(b-1) - 1], scale =
max|w| / ((qmax - qmin) / 2), so a test can cross-check against torchao. Codes are stored unsigned (code - qmin),
bit-packed as one little-endian stream: every 8 codes take exactly `bits` bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (2, 3, 4, 8)
SCALE_BYTES = 2  # scales and minimums are 16-bit numbers (stored in a 4-byte float only for an fp32 deploy)


@dataclass(frozen=True)
class Grid:
    """One quantization grid: bits per code, inputs per group (0: per output row), symmetric or with a minimum."""

    bits: int
    group: int = 64
    symmetric: bool = False

    def validate(self, in_features: int | None = None) -> None:
        """Raise ValueError naming the bad value; the group must divide the layer's input width."""
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 0:
            raise ValueError(f"group must be an integer >= 0 (0: per output row), got {self.group!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")
        if in_features is not None and self.group and in_features % self.group:
            raise ValueError(f"group {self.group} does not divide the input width {in_features}")

    def group_size(self, in_features: int) -> int:
        return self.group or in_features

    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of the signed codes (symmetric) or the unsigned ones (asymmetric)."""
        if self.symmetric:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


def groups_of(in_features: int, out_features: int, grid: Grid) -> int:
    return out_features * (in_features // grid.group_size(in_features))


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of `numel` codes packed at `bits` each (the stream is padded to whole groups of 8 codes)."""
    return math.ceil(numel / 8) * bits


def quant_bytes(in_features: int, out_features: int, grid: Grid, scale_bytes: int = SCALE_BYTES) -> int:
    """Exact stored bytes of a quantized weight: packed codes + scales (+ minimums) of `scale_bytes` each."""
    grid.validate(in_features)
    per_group = scale_bytes * (1 if grid.symmetric else 2)
    return packed_bytes(in_features * out_features, grid.bits) + groups_of(in_features, out_features, grid) * per_group


def _grouped(w: Tensor, grid: Grid) -> Tensor:
    """(out, in) -> (out, n_groups, group)."""
    return w.reshape(w.shape[0], -1, grid.group_size(w.shape[1]))


def choose_params(w: Tensor, grid: Grid, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor | None]:
    """(scales, minimums or None) per group, (out, n_groups), rounded to the 16-bit `dtype` they are stored at.

    Rounding them before the codes are chosen keeps codes and stored scales consistent.
    """
    g = _grouped(w.float(), grid)
    qmin, qmax = grid.qrange()
    if grid.symmetric:
        scale = g.abs().amax(-1) / ((qmax - qmin) / 2)
        return _stored(scale.clamp_min(1e-8), dtype), None
    lo, hi = g.amin(-1), g.amax(-1)
    return _stored(((hi - lo) / qmax).clamp_min(1e-8), dtype), _stored(lo, dtype)


def _stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round to the storage dtype and back to fp32; a 16-bit scale never rounds to zero."""
    out = t.to(dtype).float()
    return torch.where(out == 0, torch.full_like(out, torch.finfo(dtype).tiny), out) if out.min() <= 0 else out


def quantize(w: Tensor, grid: Grid, scales: Tensor, mins: Tensor | None) -> Tensor:
    """Unsigned codes (out, in) uint8 of `w` on the grid given by `scales` / `mins` (out, n_groups)."""
    g = _grouped(w.float(), grid)
    qmin, qmax = grid.qrange()
    base = g if mins is None else g - mins[..., None]
    q = torch.clamp(torch.round(base / scales[..., None]), qmin, qmax) - qmin
    return q.to(torch.uint8).reshape(w.shape)


def dequantize(codes: Tensor, grid: Grid, scales: Tensor, mins: Tensor | None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight (out, in) at `dtype` that `codes` stand for; differentiable in scales and mins."""
    qmin = grid.qrange()[0]
    g = _grouped(codes, grid).to(dtype) + qmin
    w = g * scales.to(dtype)[..., None]
    if mins is not None:
        w = w + mins.to(dtype)[..., None]
    return w.reshape(codes.shape)


def round_to_nearest(w: Tensor, grid: Grid,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor, Tensor | None]:
    """(codes, scales, mins): plain RTN of `w` (out, in) with parameters from the weights themselves."""
    grid.validate(w.shape[1])
    scales, mins = choose_params(w, grid, dtype)
    return quantize(w, grid, scales, mins), scales, mins


def pack(codes: Tensor, bits: int) -> Tensor:
    """Codes (any shape, values < 2^bits) -> uint8 stream of packed_bytes(numel, bits) bytes.

    Every 8 codes form one little-endian integer of 8 * bits bits, written as `bits` bytes.
    """
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    word = (flat.reshape(-1, 8) << shifts).sum(-1)  # (n/8,) < 2^(8*bits) <= 2^64; int64 wraps harmlessly
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack`: the first `numel` codes as uint8."""
    if packed.numel() != packed_bytes(numel, bits):
        raise ValueError(f"packed stream has {packed.numel()} bytes, {packed_bytes(numel, bits)} expected for "
                         f"{numel} codes at {bits} bits")
    if bits == 8:  # fast paths: each byte is one code, or two nibbles (low first), as the stream defines
        return packed[:numel]
    if bits == 4:
        return torch.stack([packed & 15, packed >> 4], -1).reshape(-1)[:numel]
    b = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=b.device, dtype=torch.int64) * bits
    codes = (word[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
