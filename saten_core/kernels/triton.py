"""Triton kernels for y = x (A B + S) + bias with S read in the stored bitmask format (see format.py).

Why the design is what it is:
- S is decompressed in registers, never in memory: the bits of a tile say which entries are kept, and the tile's
  start in `values` (`tile_offsets`, precomputed once per layer) plus an exclusive prefix count of the bits says
  where each kept entry sits. This is the pattern of mgoin/bitmask_sparse `triton_8bitmask.py`; the count is a
  `tl.cumsum` over bits expanded with shifts (no popcount: Triton's interpreter has no libdevice).
- `decode` (T <= 16 tokens) is memory-bound, so it is the split-K GEMV of FasterDecoding/TEAL `sparse_gemv.py`:
  grid (output tiles, K splits) fills the GPU even at T = 1; each program decompresses its (BLOCK_K, BLOCK_N) tile of
  S once and reuses it for every token; partial sums meet in a fp32 output via `tl.atomic_add` (so the summation
  order, hence the last bits, is not deterministic); the program of K split 0 also adds u B[:, tile] and the bias.
- `prefill` (many tokens) is compute-bound: a tiled GEMM, grid (token blocks, output tiles), loop over K decompressing
  S tiles for `tl.dot`, a fp32 accumulator, then the low-rank term and bias fused before the single store.
- u = x A (T, r) is a tiny product done by torch in fp32; it stays fp32 in the kernels (rounding it to 16 bits would
  cost ~2^-9 relative error), so its `tl.dot` runs at "ieee" precision (fp32 x: the sparse `tl.dot` too, not tf32).
- Both kernels default to the same BLOCK_N, so one `tile_offsets(rows, DEFAULT_BLOCK_N)` table serves both.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from saten_core.kernels.format import SparseRows
from saten_core.kernels.format import tile_offsets as make_tile_offsets

DEFAULT_BLOCK_N = 64
DECODE_BLOCK_K = 128
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_K = 32
MAX_DECODE_TOKENS = 16
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """Whether triton.jit builds interpreted kernels (the env var must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supported() -> bool:
    """Whether these kernels can run here: triton imports (it did) and there is a GPU or the interpreter is on."""
    return torch.cuda.is_available() or _interpreting()


@triton.jit
def _sparse_tile(mask_ptr, values_ptr, toff_ptr, k0, pid_n, n_in, n_out, n_tiles,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """S[k0:k0+BLOCK_K, tile pid_n] at the values' dtype (zeros outside S): bits by shifts, positions by cumsum."""
    rk = k0 + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rk < n_in
    ok = row_ok[:, None] & (rn < n_out)[None, :]
    byte = tl.load(mask_ptr + rk[:, None] * (n_out // 8) + (rn[None, :] >> 3), mask=ok, other=0).to(tl.int32)
    bits = (byte >> (rn[None, :] & 7)) & 1
    start = tl.load(toff_ptr + rk * n_tiles + pid_n, mask=row_ok, other=0)
    pos = start[:, None] + tl.cumsum(bits, axis=1) - bits
    return tl.load(values_ptr + pos, mask=bits != 0, other=0.0)


@triton.jit
def _lowrank_row(u_ptr, b_ptr, t, rank, n_out, rn, BLOCK_R: tl.constexpr):
    """(u B)[t, rn] in fp32 for one token: u (T, r) fp32, B (r, out)."""
    acc = tl.zeros(rn.shape, dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(u_ptr + t * rank + rr, mask=rr < rank, other=0.0)
        ok = (rr < rank)[:, None] & (rn < n_out)[None, :]
        bt = tl.load(b_ptr + rr[:, None] * n_out + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(u[:, None] * bt, axis=0)
    return acc


@triton.jit
def _decode_kernel(x_ptr, mask_ptr, values_ptr, toff_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
                   n_tokens, n_in, n_out, rank, n_tiles,
                   HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One (output tile, K split): partial x[:, split] S[split, tile] for every token, atomically added to y."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s = _sparse_tile(mask_ptr, values_ptr, toff_ptr, pid_k * BLOCK_K, pid_n, n_in, n_out, n_tiles,
                     BLOCK_K, BLOCK_N).to(tl.float32)
    for t in range(n_tokens):
        xt = tl.load(x_ptr + t * n_in + rk, mask=rk < n_in, other=0.0).to(tl.float32)
        part = tl.sum(xt[:, None] * s, axis=0)
        if pid_k == 0:
            if HAS_LOWRANK:
                part += _lowrank_row(u_ptr, b_ptr, t, rank, n_out, rn, BLOCK_R)
            if HAS_BIAS:
                part += tl.load(bias_ptr + rn, mask=rn < n_out, other=0.0).to(tl.float32)
        tl.atomic_add(y_ptr + t * n_out + rn, part, mask=rn < n_out)


@triton.jit
def _prefill_kernel(x_ptr, mask_ptr, values_ptr, toff_ptr, u_ptr, b_ptr, bias_ptr, y_ptr,
                    n_tokens, n_in, n_out, rank, n_tiles,
                    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """One (token block, output tile) of y: loop K with decompressed S tiles into tl.dot, then u B and bias."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        ok = (rm < n_tokens)[:, None] & (rk < n_in)[None, :]
        xt = tl.load(x_ptr + rm[:, None] * n_in + rk[None, :], mask=ok, other=0.0)
        s = _sparse_tile(mask_ptr, values_ptr, toff_ptr, k0, pid_n, n_in, n_out, n_tiles, BLOCK_K, BLOCK_N)
        if DOT_FP32:  # the interpreter's tl.dot multiplies bf16 as its uint16 storage
            xt, s = xt.to(tl.float32), s.to(tl.float32)
        acc = tl.dot(xt, s, acc, input_precision=PRECISION)
    if HAS_LOWRANK:
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            u_ok = (rm < n_tokens)[:, None] & (rr < rank)[None, :]
            u = tl.load(u_ptr + rm[:, None] * rank + rr[None, :], mask=u_ok, other=0.0)
            b_ok = (rr < rank)[:, None] & (rn < n_out)[None, :]
            bt = tl.load(b_ptr + rr[:, None] * n_out + rn[None, :], mask=b_ok, other=0.0).to(tl.float32)
            acc = tl.dot(u, bt, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < n_out, other=0.0).to(tl.float32)[None, :]
    y_ok = (rm < n_tokens)[:, None] & (rn < n_out)[None, :]
    tl.store(y_ptr + rm[:, None] * n_out + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def _check_blocks(**blocks: int) -> None:
    """tl.arange needs power-of-two sizes; tl.dot on GPU needs at least 16 (checked by triton itself)."""
    for name, size in blocks.items():
        if size <= 0 or size & (size - 1):
            raise ValueError(f"{name} must be a positive power of two, got {size!r}")


def _check(x: Tensor, rows: SparseRows, a: Tensor | None, b: Tensor | None, bias: Tensor | None) -> int:
    """Validate shapes and dtypes (the kernels index raw pointers, so a wrong shape would read garbage); return r."""
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise ValueError(f"x must be 2-D float16/bfloat16/float32, got shape {tuple(x.shape)} {x.dtype}")
    n_in, n_out = rows.in_features, rows.out_features
    if x.shape[1] != n_in:
        raise ValueError(f"x has {x.shape[1]} features, the layer has in_features={n_in}")
    if n_out % 8:
        raise ValueError(f"out_features must be a multiple of 8 (whole mask bytes per row), got {n_out}")
    if rows.values.dtype != x.dtype:
        raise ValueError(f"values dtype {rows.values.dtype} != x dtype {x.dtype}")
    if (a is None) != (b is None):
        raise ValueError(f"A and B must both be given or both None, got A={a is not None}, B={b is not None}")
    rank = 0
    if a is not None:
        rank = a.shape[1] if a.dim() == 2 else -1
        if a.shape != (n_in, rank) or b.shape != (rank, n_out):
            raise ValueError(f"A {tuple(a.shape)}, B {tuple(b.shape)} do not fit ({n_in}, r) and (r, {n_out})")
        if a.dtype != x.dtype or b.dtype != x.dtype:
            raise ValueError(f"A {a.dtype}, B {b.dtype} must have x's dtype {x.dtype}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
    devices = {t.device for t in (rows.mask, rows.values, a, b, bias) if t is not None}
    if devices - {x.device}:
        raise ValueError(f"all operands must be on x's device {x.device}, got {sorted(map(str, devices))}")
    return rank


def _operands(x: Tensor, rows: SparseRows, a: Tensor | None, b: Tensor | None, bias: Tensor | None,
              offsets: Tensor | None, block_n: int) -> tuple[list[Tensor], int]:
    """Validated contiguous kernel operands (dummies for absent ones) and the rank r."""
    rank = _check(x, rows, a, b, bias)
    tiles = -(-rows.out_features // block_n)
    if offsets is None:
        offsets = make_tile_offsets(rows, block_n)
    if offsets.shape != (rows.in_features, tiles) or offsets.dtype != torch.int32:
        raise ValueError(f"tile_offsets must be int32 ({rows.in_features}, {tiles}) for block_n={block_n}, "
                         f"got {offsets.dtype} {tuple(offsets.shape)}")
    x = x.contiguous()
    values = rows.values.contiguous() if rows.nnz else x.new_zeros(1)  # a real pointer even when nnz = 0
    u = (x.float() @ a.float()).contiguous() if rank else x
    ops = [x, rows.mask.contiguous(), values, offsets.contiguous(), u, b.contiguous() if rank else x,
           bias.contiguous() if bias is not None else x]
    return ops, rank


def _block_r(rank: int) -> int:
    """Rank chunk: a power of two, >= 16 so tl.dot accepts it, <= 64 to bound registers."""
    return min(max(16, triton.next_power_of_2(max(rank, 1))), 64)


def decode(x: Tensor, rows: SparseRows, a: Tensor | None, b: Tensor | None, bias: Tensor | None = None,
           tile_offsets: Tensor | None = None, *, block_n: int = DEFAULT_BLOCK_N,
           block_k: int = DECODE_BLOCK_K) -> Tensor:
    """y = x (A B + S) + bias for T <= 16 tokens by the split-K GEMV kernel, returned at x's dtype.

    `tile_offsets` is `format.tile_offsets(rows, block_n)` (computed here when None: precompute it once per layer).
    """
    _check_blocks(block_n=block_n, block_k=block_k)
    if x.dim() == 2 and not 1 <= x.shape[0] <= MAX_DECODE_TOKENS:
        raise ValueError(f"decode takes 1..{MAX_DECODE_TOKENS} tokens, got T={x.shape[0]} (use prefill)")
    ops, rank = _operands(x, rows, a, b, bias, tile_offsets, block_n)
    n_tokens, n_in, n_out = x.shape[0], rows.in_features, rows.out_features
    tiles = -(-n_out // block_n)
    y = torch.zeros(n_tokens, n_out, dtype=torch.float32, device=x.device)
    grid = (tiles, triton.cdiv(n_in, block_k))
    _decode_kernel[grid](*ops, y, n_tokens, n_in, n_out, rank, tiles,
                         HAS_LOWRANK=rank > 0, HAS_BIAS=bias is not None,
                         BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=_block_r(rank))
    return y.to(x.dtype)


def prefill(x: Tensor, rows: SparseRows, a: Tensor | None, b: Tensor | None, bias: Tensor | None = None,
            tile_offsets: Tensor | None = None, *, block_m: int = PREFILL_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
            block_k: int = PREFILL_BLOCK_K) -> Tensor:
    """y = x (A B + S) + bias for any number of tokens by the tiled GEMM kernel, returned at x's dtype.

    `tile_offsets` is `format.tile_offsets(rows, block_n)` (computed here when None: precompute it once per layer).
    """
    _check_blocks(block_m=block_m, block_n=block_n, block_k=block_k)
    ops, rank = _operands(x, rows, a, b, bias, tile_offsets, block_n)
    n_tokens, n_in, n_out = x.shape[0], rows.in_features, rows.out_features
    tiles = -(-n_out // block_n)
    # The interpreter has no bf16 arithmetic (it stores bf16 as uint16 and truncates fp32 -> bf16): there the
    # sparse dot runs on fp32 copies (exact products, as on the GPU) and torch rounds the fp32 output.
    emulate = x.dtype == torch.bfloat16 and _interpreting()
    y = torch.empty(n_tokens, n_out, dtype=torch.float32 if emulate else x.dtype, device=x.device)
    if n_tokens:
        grid = (triton.cdiv(n_tokens, block_m), tiles)
        _prefill_kernel[grid](*ops, y, n_tokens, n_in, n_out, rank, tiles,
                              HAS_LOWRANK=rank > 0, HAS_BIAS=bias is not None,
                              PRECISION="ieee" if x.dtype == torch.float32 or emulate else "tf32", DOT_FP32=emulate,
                              BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=_block_r(rank))
    return y.to(x.dtype)
