"""TT-SVD (error bound or rank caps) with fast truncated SVDs, reconstruction, factor pairs and counts."""

from __future__ import annotations

import math

import tensorly as tl
import torch
from torch import Tensor

# A randomized SVD of an m x n unfolding is used when the kept rank q satisfies
# q + oversample(q) <= RANDOMIZED_FRACTION * min(m, n); otherwise the exact Gram/QR route is as cheap and exact.
# Oversampling q//2 + 8 with 3 power iterations kept the error within 0.4% of the optimal truncation on
# slowly decaying spectra (8 / 2 iterations, the usual default, lost up to 2.5%). See docs/benchmarks/maths.md.
POWER_ITERS = 3
RANDOMIZED_FRACTION = 0.5


def _oversample(q: int) -> int:
    return q // 2 + 8


def _check_rank(max_rank) -> None:
    if max_rank is not None and (isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1):
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")


def _check_eps(eps) -> None:
    if eps is not None and not (0.0 <= eps < 1.0):
        raise ValueError(f"eps must be in [0, 1), got {eps!r}")


def _randomized_svd(a: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-q SVD by a seeded range finder with power iterations (Halko et al.); deterministic per input."""
    gen = torch.Generator(device=a.device).manual_seed(0)
    k = min(q + _oversample(q), *a.shape)
    omega = torch.randn(a.shape[1], k, generator=gen, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)
    return basis @ u_small, s, vh


def _exact_basis(a: Tensor) -> tuple[Tensor, Tensor]:
    """All left singular vectors and values of `a`, exactly, by the cheaper route for its shape.

    Wide (m <= n): eigendecomposition of the m x m Gram matrix in float64 (a thin SVD of a wide fp32 matrix
    was 5-25x slower here, and TT-SVD only needs U and s: the remainder is U^T a). Tall: QR then a small SVD.
    """
    if a.shape[0] <= a.shape[1]:
        a64 = a.double()
        evals, evecs = torch.linalg.eigh(a64 @ a64.mT)
        s = evals.flip(0).clamp_min(0.0).sqrt()
        return evecs.flip(1).to(a.dtype), s.to(a.dtype)
    q, r = torch.linalg.qr(a)
    u_small, s, _ = torch.linalg.svd(r)
    return q @ u_small, s


def _left_basis(a: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """Top-q (or more) left singular vectors and values: randomized when q is well below min(m, n)."""
    if q + _oversample(q) <= RANDOMIZED_FRACTION * min(a.shape):
        u, s, _ = _randomized_svd(a, q)
        return u, s
    return _exact_basis(a)


def _kept_rank(s: Tensor, total_sq: float, delta: float | None, cap: int) -> int:
    """Smallest rank whose discarded energy is <= delta^2 (never above cap); cap when delta is None.

    The discarded energy of the projection onto the top-r left vectors is ||C||^2 - sum_{i<r} s_i^2, exact
    also for the randomized SVD, so the eps bound holds whichever SVD computed `s`.
    """
    if delta is None:
        return min(cap, s.numel())
    kept_sq = torch.cumsum(s.double() ** 2, 0)
    tail = (total_sq - kept_sq).clamp_min(0.0)
    ok = torch.nonzero(tail <= delta**2)
    r = int(ok[0]) + 1 if ok.numel() else s.numel()
    return max(1, min(r, cap))


def _truncate(c: Tensor, delta: float | None, cap: int) -> tuple[Tensor, Tensor]:
    """One TT-SVD step: kept left basis U_r (m, r) and the remainder U_r^T c (r, n) passed to the next core."""
    q = min(cap, *c.shape)
    total_sq = float(torch.sum(c.double() ** 2)) if delta is not None else 0.0
    u, s = _left_basis(c, q) if delta is None or q < min(c.shape) else _exact_basis(c)
    u = u[:, : _kept_rank(s, total_sq, delta, q)]
    return u, u.mT @ c


def tt_svd(t: Tensor, *, eps: float | None = None, max_rank: int | None = None) -> list[Tensor]:
    """TT decomposition by a left-to-right SVD sweep (Oseledets 2011) with fast truncated SVDs.

    Args:
        t: tensor of order d >= 2 (e.g. the tensorised (in, out) weight).
        eps: relative Frobenius error bound; each unfolding discards at most eps*||t||/sqrt(d-1).
        max_rank: cap on every bond rank. Both None -> exact decomposition (full ranks).
    Returns:
        cores G_k of shape (r_{k-1}, n_k, r_k), r_0 = r_d = 1, in t's dtype (computed in float32 or wider).
    Example:
        >>> cores = tt_svd(torch.randn(24, 24, 48, 32), max_rank=16)
        >>> tt_ranks(cores)
        [1, 16, 16, 16, 1]
    """
    _check_eps(eps)
    _check_rank(max_rank)
    if t.dim() < 2:
        raise ValueError(f"tt_svd needs a tensor of order >= 2, got shape {tuple(t.shape)}")
    work = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    shape, d = list(work.shape), work.dim()
    delta = None if eps is None else eps * float(torch.linalg.vector_norm(work.double())) / math.sqrt(d - 1)
    cap = max_rank if max_rank is not None else math.prod(shape)
    cores, rank, c = [], 1, work
    for k in range(d - 1):
        c = c.reshape(rank * shape[k], -1)
        u, c = _truncate(c, delta, cap)
        cores.append(u.reshape(rank, shape[k], -1))
        rank = u.shape[1]
    cores.append(c.reshape(rank, shape[-1], 1))
    return [g.to(t.dtype).contiguous() for g in cores]


def tt_to_tensor(cores) -> Tensor:
    """Full tensor from TT cores (tensorly's reconstruction, run on the torch backend)."""
    with tl.backend_context("pytorch"):
        return tl.tt_to_tensor(list(cores))


def _contract(cores) -> Tensor:
    """Merge a run of cores into a matrix (r_left * prod(n), r_right), keeping the boundary bonds."""
    out = cores[0].reshape(-1, cores[0].shape[-1])
    for g in cores[1:]:
        out = (out @ g.reshape(g.shape[0], -1)).reshape(-1, g.shape[-1])
    return out


def tt_factor_pair(cores, n_in_modes: int) -> tuple[Tensor, Tensor]:
    """Pre-contract input-side and output-side cores into A (in, r) and B (r, out), A @ B = matricized TT.

    Example:
        >>> a, b = tt_factor_pair(tt_svd(torch.randn(24, 24, 48, 32), max_rank=8), 2)
        >>> a.shape, b.shape
        (torch.Size([576, 8]), torch.Size([8, 1536]))
    """
    if not 1 <= n_in_modes < len(cores):
        raise ValueError(f"n_in_modes must be in [1, {len(cores) - 1}], got {n_in_modes!r}")
    a = _contract(cores[:n_in_modes])  # (in, r)
    right = cores[n_in_modes:]
    b = _contract(right).reshape(right[0].shape[0], -1)  # (r, out)
    return a, b


def tt_ranks(cores) -> list[int]:
    """Bond ranks [1, r1, ..., r_{d-1}, 1]."""
    return [int(cores[0].shape[0])] + [int(g.shape[-1]) for g in cores]


def capped_ranks(modes, max_rank: int | None) -> list[int]:
    """Bond ranks tt_svd gives for these modes under a rank cap (exact full ranks when None).

    Example:
        >>> capped_ranks([24, 24, 48, 32], 100)
        [1, 24, 100, 32, 1]
    """
    _check_rank(max_rank)
    ranks = [1]
    for k in range(len(modes) - 1):
        r = min(ranks[-1] * modes[k], math.prod(modes[k + 1 :]))
        ranks.append(r if max_rank is None else min(r, max_rank))
    return ranks + [1]


def tt_param_count(modes, ranks) -> int:
    """Numbers stored in the cores: sum of r_{k-1} * n_k * r_k."""
    if len(ranks) != len(modes) + 1:
        raise ValueError(f"ranks {list(ranks)} do not fit {len(modes)} modes")
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(modes))
