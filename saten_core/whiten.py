"""Activation-aware low-rank maths: TT of the whitened weight, mapped back and put in TT form at the same caps.

For inputs X (T, in) with second moment C = L L^T, the output error of a weight error E (in, out) is
||X E||_F = sqrt(T) ||L^T E||_F. So the low-rank part is chosen on M = L^T W^T (TT-SVD, same tensorisation and
rank caps as the data-free method) and mapped back as L^{-T} M_hat. Only the input-side cores change: the
output-side cores of M_hat are kept (right-orthogonalised), and A = L^{-T} A_M (in, r) is re-split into
input-side cores with the same bond caps. That split is exact whenever every input-side bond is at its full
value (order 1 always; order 2 when the rank cap is >= the first input mode, e.g. >= 24 for 576-wide layers).
Otherwise no exact split exists (L^{-T} mixes the input modes): the Frobenius-optimal truncation of that bond
starts an alternating least-squares refinement in the whitened norm (order 2: both input cores are linear
least-squares problems with small normal equations), and `rett_loss` measures what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.linalg import solve_triangular

from saten_core.tensorize import tensorize
from saten_core.tt import tt_factor_pair, tt_svd

ALS_SWEEPS = 2  # refinement sweeps of a lossy input-side split: 2 removed the whole loss on smollm2 layers
SLAB = 1 << 22  # elements of one float64 product slab (32 MB): products with an (in, in) factor go in slabs


@dataclass(frozen=True)
class Whitening:
    """The whitening factor L and, when known, the damped second moment it factors as C = scale * xtx + shift * I.

    Why keep C as X^T X plus a ridge: the refinement needs C, and L L^T would be a third (in, in) float64 matrix
    (537 MB at 8192 inputs) and an in^3 product on top of X^T X and L, for the same numbers.
    """

    low: Tensor  # (in, in) lower-triangular
    xtx: Tensor | None = None  # (in, in), or None: C is then formed as L L^T
    scale: float = 1.0
    shift: float = 0.0

    @classmethod
    def of(cls, stats, damp: float = 1e-2) -> Whitening:
        """From calibrate.InputStats: L = whitening_factor(stats, damp), C without a new matrix."""
        from saten_core.calibrate import damped_factor

        low, ridge = damped_factor(stats, damp)
        return cls(low, stats.xtx, 1.0 / max(stats.tokens, 1), ridge)

    def moment_times(self, a: Tensor) -> Tensor:
        """C @ a for a (in, k) in float64."""
        if self.xtx is None:
            return self.low @ (self.low.mT @ a)
        return self.scale * (self.xtx.to(a.device) @ a) + self.shift * a


def as_whitening(low: Tensor | Whitening) -> Whitening:
    return low if isinstance(low, Whitening) else Whitening(low)


def whiten_weight(low: Tensor, wt: Tensor) -> Tensor:
    """L^T W^T in float32, computed in float64 column slabs (no float64 copy of the whole weight). # (in, out)"""
    low = low.to(device=wt.device, dtype=torch.float64)
    out = torch.empty(wt.shape, dtype=torch.float32, device=wt.device)
    cols = max(1, SLAB // wt.shape[0])
    for j in range(0, wt.shape[1], cols):
        out[:, j : j + cols] = low.mT @ wt[:, j : j + cols].double()
    return out


def whitened_tt(wt: Tensor, low: Tensor | Whitening, in_modes: list[int], out_modes: list[int], *,
                eps: float | None = None, max_rank: int | None = None) -> list[Tensor]:
    """TT cores of W^T's activation-aware low-rank part (float32), same ranks as `tt_svd` of the same caps.

    wt: (in, out) weight; low: (in, in) lower-triangular whitening factor (calibrate.whitening_factor), or a
    Whitening that also carries the second moment it factors (the refinement then never forms L L^T).
    Example:
        >>> low = torch.linalg.cholesky(torch.eye(6, dtype=torch.float64))
        >>> [g.shape for g in whitened_tt(torch.randn(6, 4), low, [3, 2], [2, 2], max_rank=2)]
        [torch.Size([1, 3, 2]), torch.Size([2, 2, 2]), torch.Size([2, 2, 2]), torch.Size([2, 2, 1])]
    """
    n_in = len(in_modes)
    white = as_whitening(low)
    low = white.low.to(device=wt.device, dtype=torch.float64)
    m = whiten_weight(low, wt)
    cores = tt_svd(tensorize(m, in_modes, out_modes), eps=eps, max_rank=max_rank)
    out_cores, carry = right_orthogonalize(cores[n_in:])
    a_m, _ = tt_factor_pair(cores, n_in)  # (in, r): the whitened input-side factor
    a = solve_triangular(low.mT, a_m.double(), upper=True) @ carry.double()  # L^{-T} A_M R, (in, r')
    ranks = [int(g.shape[-1]) for g in cores[: n_in - 1]]
    in_cores = split_input_side(a.float(), in_modes, ranks)
    if n_in == 2 and ranks[0] < in_modes[0]:  # lossy bond: refine it for output error, not weight error
        in_cores = refine_input_pair(in_cores, white, a)
    return in_cores + out_cores


def refine_input_pair(cores: list[Tensor], white: Whitening, exact: Tensor, sweeps: int = ALS_SWEEPS) -> list[Tensor]:
    """Alternating least squares on the two input cores G1 (1, i1, r1), G2 (r1, i2, r) minimising
    ||L^T (A(G1, G2) - A_exact)||_F (exact: A_exact, (in, r)); each half-step is exact, so it never worsens.

    C = L L^T enters as scale * X^T X (a view, reshaped) plus shift * I (added in closed form).
    """
    g1, g2 = cores[0][0].double(), cores[1].double()  # (i1, r1), (r1, i2, r)
    i1, r1 = g1.shape
    i2 = g2.shape[1]
    if white.xtx is None:
        moment = _Moment((white.low @ white.low.mT).reshape(i1, i2, i1, i2), 1.0, 0.0)
    else:
        moment = _Moment(white.xtx.to(g1.device, torch.float64).reshape(i1, i2, i1, i2), white.scale, white.shift)
    rhs = white.moment_times(exact.double()).reshape(i1, i2, -1)  # C A_exact: the linear term, (i1, i2, r)
    for _ in range(sweeps):
        g2 = _solve_second(g1, moment, rhs)
        g1 = _solve_first(g2, moment, rhs)
    return [g1.reshape(1, i1, r1).to(cores[0].dtype), g2.to(cores[1].dtype).contiguous()]


@dataclass(frozen=True)
class _Moment:
    """C (i1, i2, i1, i2) = scale * c + shift * I, I the identity over (i1, i2) pairs."""

    c: Tensor
    scale: float
    shift: float


def _ridge_solve(h: Tensor, g: Tensor) -> Tensor:
    """Solve the normal equations h x = g with a tiny ridge (the split has a gauge freedom G1 S, S^-1 G2)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve(h + 1e-10 * h.diagonal().mean().clamp_min(1e-30) * eye, g)


def _solve_second(g1: Tensor, moment: _Moment, rhs: Tensor) -> Tensor:
    """Best G2 for fixed G1: A = (G1 kron I) G2m, so (P^T C P) G2m = P^T C A_exact with P = G1 kron I."""
    i1, r1 = g1.shape
    i2 = moment.c.shape[1]
    flat, step = moment.c.reshape(i1, -1), max(1, SLAB // moment.c[0].numel())
    h = moment.scale * torch.cat([  # G1^T C G1 in slabs of s: one einsum would permute C into a copy
        torch.einsum("sbcd,ct->sbtd", (g1[:, j : j + step].mT @ flat).reshape(-1, i2, i1, i2), g1)
        for j in range(0, r1, step)])
    if moment.shift:  # P^T I P = (G1^T G1) kron I
        h = h + moment.shift * torch.einsum("st,bd->sbtd", g1.mT @ g1, torch.eye(i2, dtype=h.dtype, device=h.device))
    g = torch.einsum("as,abk->sbk", g1, rhs).reshape(r1 * i2, -1)
    return _ridge_solve(h.reshape(r1 * i2, r1 * i2), g).reshape(r1, i2, -1)


def _solve_first(g2: Tensor, moment: _Moment, rhs: Tensor) -> Tensor:
    """Best G1 for fixed G2: the objective is quadratic in vec(G1) with Hessian H[(a,s),(c,t)]."""
    r1 = g2.shape[0]
    i1 = moment.c.shape[0]
    k = torch.einsum("sbk,tdk->sbtd", g2, g2)
    step = max(1, SLAB // moment.c[0].numel())  # in slabs of a: einsum would permute all of C into a copy
    h = moment.scale * torch.cat([torch.einsum("abcd,sbtd->asct", moment.c[j : j + step], k)
                                  for j in range(0, i1, step)])
    if moment.shift:  # the identity pairs a with c and b with d: delta_ac * sum_b K[s, b, t, b]
        eye = torch.eye(i1, dtype=h.dtype, device=h.device)
        h = h + moment.shift * torch.einsum("ac,st->asct", eye, torch.einsum("sbtb->st", k))
    g = torch.einsum("abk,sbk->as", rhs, g2).reshape(-1)
    return _ridge_solve(h.reshape(i1 * r1, i1 * r1), g).reshape(i1, r1)


def right_orthogonalize(cores: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Cores with orthonormal rows (as a right-to-left RQ sweep leaves them) and the carried factor R.

    contract(cores) == R @ contract(new cores), R (r_left, r_left'); with orthonormal rows in the new
    output side, truncating the input side in Frobenius norm is optimal for the whole matrix too.
    """
    new, carry = list(cores), None
    for j in range(len(new) - 1, -1, -1):
        g = new[j] if carry is None else torch.einsum("anb,bc->anc", new[j], carry)
        r_left, n, r_right = g.shape
        q, r = torch.linalg.qr(g.reshape(r_left, n * r_right).mT)  # g = r^T q^T
        new[j], carry = q.mT.reshape(-1, n, r_right).contiguous(), r.mT
    return new, carry


def split_input_side(a: Tensor, in_modes: list[int], ranks: list[int]) -> list[Tensor]:
    """Input-side TT cores of A (in, r) with the given inner bond ranks (zero-padded where A has fewer)."""
    r_mid = a.shape[1]
    c, cores, r_prev = a.reshape(*in_modes, r_mid), [], 1
    for n, target in zip(in_modes[:-1], ranks, strict=True):
        u, s, vh = torch.linalg.svd(c.reshape(r_prev * n, -1), full_matrices=False)
        k = min(target, s.numel())
        core = torch.zeros(r_prev * n, target, dtype=a.dtype, device=a.device)
        core[:, :k] = u[:, :k]
        rest = torch.zeros(target, vh.shape[1], dtype=a.dtype, device=a.device)
        rest[:k] = s[:k, None] * vh[:k]
        cores.append(core.reshape(r_prev, n, target))
        c, r_prev = rest, target
    cores.append(c.reshape(r_prev, in_modes[-1], r_mid).contiguous())
    return cores


def output_error(delta_wt: Tensor, low: Tensor) -> float:
    """||L^T dW^T||_F: the output error of a weight change on the calibration inputs, up to sqrt(T).

    In float64 column slabs: no float64 copy of the whole change, nor a float32 copy of L.
    """
    low = low.to(delta_wt.device, torch.float64)
    cols = max(1, SLAB // delta_wt.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=delta_wt.device)
    for j in range(0, delta_wt.shape[1], cols):
        total += (low.mT @ delta_wt[:, j : j + cols].double()).square().sum()
    return float(total.sqrt())


def rett_loss(wt: Tensor, low: Tensor | Whitening, in_modes: list[int], out_modes: list[int], *,
              max_rank: int | None = None) -> dict:
    """Output error of L^{-T} M_hat as a dense matrix vs after the re-split into TT at the same caps."""
    low64 = as_whitening(low).low.to(wt.device, torch.float64)
    m = whiten_weight(low64, wt)
    cores = tt_svd(tensorize(m, in_modes, out_modes), max_rank=max_rank)
    a, b = tt_factor_pair(cores, len(in_modes))
    dense = solve_triangular(low64.mT, (a @ b).double(), upper=True)
    tt_cores = whitened_tt(wt, low, in_modes, out_modes, max_rank=max_rank)
    a2, b2 = tt_factor_pair(tt_cores, len(in_modes))
    return {"dense": output_error(wt.double() - dense, low64),
            "tt": output_error(wt.double() - (a2 @ b2).double(), low64),
            "reference": output_error(wt.double(), low64)}
