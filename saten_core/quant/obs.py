"""One optimal-brain-surgeon solver for GPTQ (quantize) and SparseGPT (prune), after Frantar & Alistarh.

Both walk the input columns of W (out, in) left to right in blocks. Each column is projected (rounded onto the
grid, or zeroed where the mask drops it), and its error, scaled by the inverse Hessian's Cholesky diagonal, is
propagated onto the columns not yet visited: H = X^T X of the layer's calibration inputs says which directions
the outputs see, so later columns absorb what earlier ones lost. Only the projection differs between the two,
so it is a small object with two hooks (`start_block`, `column`) and the update loop is shared.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from saten_core.quant.grid import Grid, choose_params, quantize

BLOCK = 128  # columns per lazy batch update (GPTQ's default; the result does not depend on it)
DAMP = 0.01  # ridge, as a fraction of the mean Hessian diagonal (GPTQ / SparseGPT default)


class Projector(Protocol):
    def start_block(self, start: int, w: Tensor, hinv_diag: Tensor) -> None: ...

    def column(self, index: int, w: Tensor) -> Tensor: ...


def inverse_hessian_factor(xtx: Tensor, damp: float = DAMP) -> tuple[Tensor, Tensor]:
    """(upper Cholesky factor of H^-1 (in, in) float32, dead-input mask): H = X^T X + damp * mean(diag) I.

    Inputs never excited (zero diagonal) get a unit diagonal so the factor exists; their weights are free.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    h = xtx.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().add_(damp * (10**attempt) * h.diagonal().mean())
    else:
        raise ValueError("the layer's input second moment is not positive definite even after damping")
    hinv = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(hinv, upper=True).float(), dead


def obs_solve(w: Tensor, xtx: Tensor, projector: Projector, *, block: int = BLOCK, damp: float = DAMP) -> Tensor:
    """The projected weight (out, in) float32 with every column's error propagated (GPTQ's lazy batch form)."""
    w = w.detach().float().clone()
    hinv, dead = inverse_hessian_factor(xtx.to(w.device), damp)
    w[:, dead] = 0.0
    n = w.shape[1]
    out = torch.zeros_like(w)
    for start in range(0, n, block):
        stop = min(start + block, n)
        wb, hb = w[:, start:stop].clone(), hinv[start:stop, start:stop]
        errors = torch.zeros_like(wb)
        projector.start_block(start, wb, hb.diagonal())
        for i in range(stop - start):
            q = projector.column(start + i, wb[:, i])
            out[:, start + i] = q
            err = (wb[:, i] - q) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return out


class GridProjector:
    """GPTQ: round each column onto the grid. A group's scale is chosen from the already-updated weights when the
    group starts (GPTQ's default); per-row grids (group 0) take theirs from the original row up front."""

    def __init__(self, w: Tensor, grid: Grid, dtype: torch.dtype) -> None:
        self.grid, self.size = grid, grid.group_size(w.shape[1])
        self.dtype, self.qmin = dtype, grid.qrange()[0]
        self.column_grid = Grid(grid.bits, 1, grid.symmetric)
        self.codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        if grid.group == 0:
            self.scales, self.mins = choose_params(w, grid, dtype)
        else:
            self.scales = torch.zeros(w.shape[0], w.shape[1] // self.size, device=w.device)
            self.mins = None if grid.symmetric else torch.zeros_like(self.scales)
        self._w, self._start = w, 0

    def start_block(self, start: int, w: Tensor, hinv_diag: Tensor) -> None:
        self._w, self._start = w, start

    def column(self, index: int, w: Tensor) -> Tensor:
        g = index // self.size
        if self.grid.group and index % self.size == 0:
            span = self._w[:, index - self._start:index - self._start + self.size]
            assert span.shape[1] == self.size, "obs_solve's block must be a multiple of the group"
            s, m = choose_params(span, Grid(self.grid.bits, 0, self.grid.symmetric), self.dtype)
            self.scales[:, g] = s[:, 0]
            if self.mins is not None:
                self.mins[:, g] = m[:, 0]
        mins = None if self.mins is None else self.mins[:, g:g + 1]
        code = quantize(w[:, None], self.column_grid, self.scales[:, g:g + 1], mins)[:, 0]
        self.codes[:, index] = code
        value = (code.float() + self.qmin) * self.scales[:, g]
        return value if mins is None else value + mins[:, 0]


def gptq(w: Tensor, xtx: Tensor, grid: Grid,
         dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor, Tensor | None]:
    """(codes, scales, mins) of `w` (out, in) quantized by GPTQ on the inputs' X^T X."""
    grid.validate(w.shape[1])
    projector = GridProjector(w, grid, dtype)
    block = grid.group * max(1, BLOCK // grid.group) if grid.group else BLOCK
    obs_solve(w, xtx, projector, block=block)
    return projector.codes, projector.scales, projector.mins


def sparsegpt(w: Tensor, xtx: Tensor, keep: int, nm: bool = False) -> tuple[Tensor, Tensor]:
    """(pruned and updated weight (out, in) float32, kept mask (out, in)): SparseGPT on the inputs' X^T X."""
    if nm and w.shape[1] % 4:
        raise ValueError(f"2:4 structure needs an input width divisible by 4, got {w.shape[1]}")
    if not nm and not 0 <= keep <= w.shape[1]:
        raise ValueError(f"keep must be in [0, {w.shape[1]}] inputs per row, got {keep}")
    projector = MaskProjector(w, keep, nm)
    return obs_solve(w, xtx, projector), projector.mask


class MaskProjector:
    """SparseGPT: per block, keep the weights with the largest w^2 / [H^-1]_ii^2 (OBS saliency), zero the rest.

    `keep` inputs per output row overall (spread over blocks by cumulative rounding, so the total is exact), or
    2 of every 4 consecutive inputs when `nm` is set.
    """

    def __init__(self, w: Tensor, keep: int, nm: bool = False) -> None:
        self.n, self.keep, self.nm = w.shape[1], keep, nm
        self.mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)

    def start_block(self, start: int, w: Tensor, hinv_diag: Tensor) -> None:
        score = w.square() / hinv_diag.square()[None, :]
        width = w.shape[1]
        if self.nm:
            groups = score.reshape(w.shape[0], -1, 4)
            top = groups.topk(2, dim=-1).indices
            local = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(w.shape)
        else:
            k = round(self.keep * (start + width) / self.n) - round(self.keep * start / self.n)
            local = torch.zeros_like(w, dtype=torch.bool)
            if k:
                local.scatter_(1, score.topk(k, dim=1).indices, True)
        self.mask[:, start:start + width] = local

    def column(self, index: int, w: Tensor) -> Tensor:
        return w * self.mask[:, index]
