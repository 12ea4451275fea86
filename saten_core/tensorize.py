"""Tensorisation of a weight matrix: the authors' min-sum shape factorisation, tensorize and matricize."""

from __future__ import annotations

import math
from functools import lru_cache

from torch import Tensor


@lru_cache(maxsize=1024)
def _factorisations(n: int, order: int) -> tuple[tuple[int, ...], ...]:
    """Every ordered tuple of `order` positive integers whose product is n (factor 1 allowed)."""
    if order == 1:
        return ((n,),)
    out = []
    for d in range(n, 0, -1):  # larger first factor first, like the authors' enumeration
        if n % d == 0:
            out.extend((d, *rest) for rest in _factorisations(n // d, order - 1))
    return tuple(out)


def factorize(n: int, order: int) -> list[int]:
    """The `order` factors of n with the smallest sum; ties go to the larger factor first.

    Example:
        >>> factorize(3072, 2)
        [64, 48]
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"width must be an integer >= 1, got {n!r}")
    if isinstance(order, bool) or int(order) != order or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    # max() over (-sum, tuple): smallest sum, then lexicographically largest = larger factor first.
    return list(max(_factorisations(int(n), int(order)), key=lambda f: (-sum(f), f)))


def tensorized_shape(in_features: int, out_features: int, order: int = 2) -> tuple[list[int], list[int]]:
    """Mode sizes (in_modes, out_modes) the authors use for Wt of shape (in, out).

    Example:
        >>> tensorized_shape(576, 1536)
        ([24, 24], [48, 32])
    """
    return factorize(in_features, order), factorize(out_features, order)


def _check_modes(shape: tuple[int, ...], in_modes, out_modes) -> None:
    if math.prod(in_modes) != shape[0] or math.prod(out_modes) != shape[1]:
        raise ValueError(f"modes {list(in_modes)} x {list(out_modes)} do not match a matrix of shape {tuple(shape)}")


def tensorize(wt: Tensor, in_modes, out_modes) -> Tensor:
    """Reshape Wt (in, out) into the tensor of shape in_modes + out_modes (row-major, no copy).

    Example:
        >>> tensorize(torch.zeros(576, 1536), [24, 24], [48, 32]).shape
        torch.Size([24, 24, 48, 32])
    """
    if wt.dim() != 2:
        raise ValueError(f"tensorize expects a 2-D (in, out) matrix, got shape {tuple(wt.shape)}")
    _check_modes(tuple(wt.shape), in_modes, out_modes)
    return wt.reshape(*in_modes, *out_modes)


def matricize(t: Tensor, in_modes, out_modes) -> Tensor:
    """Inverse of `tensorize`: back to (prod(in_modes), prod(out_modes))."""
    shape = (math.prod(in_modes), math.prod(out_modes))
    if t.numel() != shape[0] * shape[1]:
        raise ValueError(f"tensor of shape {tuple(t.shape)} does not hold a {shape[0]}x{shape[1]} matrix")
    return t.reshape(shape)
