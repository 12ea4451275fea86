"""The reference path every kernel is checked against: plain torch ops, accumulation in fp32 (or `compute`).

It is also the fallback where no compiled kernel exists: correct, not fast (it builds the dense S per call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saten_core.kernels.format import SparseRows
from saten_core.sparse import scatter_values, unpack_mask


def dense_sparse(rows: SparseRows, dtype: torch.dtype) -> Tensor:
    """S (in, out) at `dtype`, built from the bitmask and values (a transient dense copy)."""
    mask = unpack_mask("bitmask", rows.mask, (rows.in_features, rows.out_features))
    return scatter_values(mask, rows.values, dtype)


def lowrank_sparse(x: Tensor, rows: SparseRows | None, a: Tensor | None, b: Tensor | None,
                   bias: Tensor | None = None, compute: torch.dtype = torch.float32) -> Tensor:
    """y = x (A B + S) + bias for x (T, in), computed at `compute`, returned at x's dtype.

    Example:
        >>> a, b = torch.randn(8, 2), torch.randn(2, 16)
        >>> lowrank_sparse(torch.randn(3, 8), None, a, b).shape
        torch.Size([3, 16])
    """
    xc, y = x.to(compute), None
    if a is not None:
        y = (xc @ a.to(compute)) @ b.to(compute)  # (T, r) then (T, out)
    if rows is not None and rows.nnz:
        s = xc @ dense_sparse(rows, compute)
        y = s if y is None else y + s
    if y is None:
        out = b.shape[1] if b is not None else rows.out_features
        y = xc.new_zeros(x.shape[0], out)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)
