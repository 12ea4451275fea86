"""The inference format every kernel reads: the layer's stored bitmask and values plus per-row value offsets.

A compressed layer computes y = x (A B + S) + b with x (T, in). Its checkpoint already stores S as
- `mask`: uint8, ceil(in*out/8) bytes; bit b of byte k is entry 8k+b of S flattened row-major over (in, out);
- `values`: the kept entries (16-bit at the deploy dtype) in that same row-major order;
and the TT cores contract once, at load, into the factor pair A (in, r), B (r, out). The one thing a kernel adds is
`row_offsets` (int64, in + 1): where row i of S starts in `values`, 8 bytes per input row (0.1-0.5% of the values
at SmolLM2's shapes), so threads can start anywhere. GPU kernels also want per-tile offsets (`tile_offsets`).
A 2:4 or index-format mask is converted once to the bitmask: for 2:4 the bitmask has exactly the bytes of its
2-bit positions (in*out/8 either way); an index mask (density < 1/32) grows to in*out/8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saten_core.sparse import pack_bitmask, unpack_mask


@dataclass
class SparseRows:
    """S (in, out) as bitmask + row-major values + per-row offsets: what every sparse kernel reads."""

    mask: Tensor  # (ceil(in*out/8),) uint8, little-endian bits, row-major over (in, out)
    values: Tensor  # (nnz,) kept values, row-major
    row_offsets: Tensor  # (in + 1,) int64; values of row i are values[row_offsets[i]:row_offsets[i + 1]]
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        numel = self.in_features * self.out_features
        if self.mask.dtype != torch.uint8 or self.mask.numel() != (numel + 7) // 8:
            raise ValueError(f"mask must be {(numel + 7) // 8} uint8 bytes, got {self.mask.numel()} {self.mask.dtype}")
        if self.row_offsets.numel() != self.in_features + 1:
            raise ValueError(f"row_offsets must have {self.in_features + 1} entries, got {self.row_offsets.numel()}")

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def nbytes(self) -> int:
        """Bytes a decode pass reads for S: values + mask + offsets."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.mask, self.row_offsets))


def row_offsets(mask: Tensor, in_features: int, out_features: int) -> Tensor:
    """Per-row starts of the kept values, (in + 1,) int64, from the bitmask without a dense copy.

    Example:
        >>> row_offsets(torch.tensor([0b00010011, 0b11110000], dtype=torch.uint8), 2, 8).tolist()
        [0, 3, 7]
    """
    if out_features % 8:
        bits = unpack_mask("bitmask", mask, (in_features, out_features))
        counts = bits.sum(1)
    else:
        table = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64, device=mask.device)
        counts = table[mask[: in_features * out_features // 8].long()].reshape(in_features, -1).sum(1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def as_bitmask(fmt: str, packed: Tensor, in_features: int, out_features: int) -> Tensor:
    """The packed bitmask of a stored mask of any format ("bitmask" is returned as is)."""
    if fmt == "bitmask":
        return packed
    return pack_bitmask(unpack_mask(fmt, packed, (in_features, out_features)))


def sparse_rows(fmt: str, packed: Tensor, values: Tensor, in_features: int, out_features: int) -> SparseRows:
    """SparseRows of a layer's stored mask and values (the values tensor is shared, never copied)."""
    mask = as_bitmask(fmt, packed, in_features, out_features)
    return SparseRows(mask, values, row_offsets(mask, in_features, out_features), in_features, out_features)


def tile_offsets(rows: SparseRows, block_n: int) -> Tensor:
    """(in, ceil(out / block_n)) int32: where each (row, output tile) starts in `values` (GPU kernels).

    Example:
        >>> s = sparse_rows("bitmask", torch.tensor([0b00010011, 0b11110000], dtype=torch.uint8),
        ...                 torch.ones(7), 2, 8)
        >>> tile_offsets(s, 4).tolist()  # row 0 keeps 2 + 1, row 1 keeps 0 + 4
        [[0, 2], [3, 3]]
    """
    if block_n <= 0:
        raise ValueError(f"block_n must be positive, got {block_n!r}")
    n_in, n_out = rows.in_features, rows.out_features
    bits = unpack_mask("bitmask", rows.mask, (n_in, n_out))
    tiles = -(-n_out // block_n)
    pad = tiles * block_n - n_out
    counts = torch.nn.functional.pad(bits.to(torch.int32), (0, pad)).reshape(n_in, tiles, block_n).sum(2)
    before = counts.cumsum(1) - counts
    return (rows.row_offsets[:-1, None] + before).to(torch.int32)
