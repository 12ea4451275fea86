"""The Triton kernels (saten_core.kernels.triton) against the reference, on CPU under Triton's interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from saten_core.kernels import triton as tk  # noqa: E402
from saten_core.kernels.format import sparse_rows, tile_offsets  # noqa: E402
from saten_core.kernels.reference import lowrank_sparse  # noqa: E402
from saten_core.sparse import pack_bitmask  # noqa: E402

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
SMALL = {"block_n": 16, "block_k": 16}  # the interpreter runs programs one by one: keep the grid small


def layer(n_in: int, n_out: int, density: float, rank: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    """A random layer: SparseRows of a mask with the given density, A (in, r), B (r, out) or None, bias or None."""
    torch.manual_seed(seed)
    mask = torch.rand(n_in, n_out) < density
    w = torch.randn(n_in, n_out).to(dtype)
    rows = sparse_rows("bitmask", pack_bitmask(mask), w[mask], n_in, n_out)
    a = torch.randn(n_in, rank).to(dtype) if rank else None
    b = (torch.randn(rank, n_out) / rank**0.5).to(dtype) if rank else None
    return rows, a, b, torch.randn(n_out).to(dtype) if bias else None


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == F32 else 1e-3


CASES = [  # (in, out), density, rank, dtype, bias
    ((64, 48), 0.1, 4, F16, True),
    ((96, 128), 0.5, 16, BF16, False),
    ((128, 40), 0.9, 0, F32, True),
    ((64, 48), 1.0, 16, F32, False),
    ((96, 128), 0.0, 4, BF16, True),
    ((128, 40), 0.5, 4, F16, False),
    ((64, 48), 0.9, 0, BF16, True),
    ((128, 40), 1.0, 16, BF16, True),
    ((96, 128), 0.1, 16, F32, True),
]


@pytest.mark.parametrize(("shape", "density", "rank", "dtype", "bias"), CASES)
@pytest.mark.parametrize("n_tokens", [1, 3, 16])
def test_decode_matches_reference(shape, density, rank, dtype, bias, n_tokens):
    rows, a, b, bias_t = layer(*shape, density, rank, dtype, bias)
    x = torch.randn(n_tokens, shape[0]).to(dtype)
    y = tk.decode(x, rows, a, b, bias_t, tile_offsets(rows, SMALL["block_n"]), **SMALL)
    assert y.dtype == dtype and y.shape == (n_tokens, shape[1])
    assert rel_err(y, lowrank_sparse(x, rows, a, b, bias_t)) < tol(dtype)


@pytest.mark.parametrize(("shape", "density", "rank", "dtype", "bias"), CASES)
@pytest.mark.parametrize("n_tokens", [17, 40])
def test_prefill_matches_reference(shape, density, rank, dtype, bias, n_tokens):
    rows, a, b, bias_t = layer(*shape, density, rank, dtype, bias)
    x = torch.randn(n_tokens, shape[0]).to(dtype)
    y = tk.prefill(x, rows, a, b, bias_t, tile_offsets(rows, SMALL["block_n"]), block_m=16, **SMALL)
    assert y.dtype == dtype and y.shape == (n_tokens, shape[1])
    assert rel_err(y, lowrank_sparse(x, rows, a, b, bias_t)) < tol(dtype)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_default_blocks_share_one_offsets_table(dtype):
    """The GPU defaults (tiles wider than the layer here) and one tile_offsets table for both kernels."""
    rows, a, b, bias = layer(96, 128, 0.5, 8, dtype, True)
    offsets = tile_offsets(rows, tk.DEFAULT_BLOCK_N)
    for fn, n_tokens in ((tk.decode, 2), (tk.prefill, 20)):
        x = torch.randn(n_tokens, 96).to(dtype)
        assert rel_err(fn(x, rows, a, b, bias, offsets), lowrank_sparse(x, rows, a, b, bias)) < tol(dtype)
    x = torch.randn(2, 96).to(dtype)  # tile_offsets omitted: computed from rows
    assert rel_err(tk.decode(x, rows, a, b, bias), lowrank_sparse(x, rows, a, b, bias)) < tol(dtype)


@pytest.mark.parametrize("fn", [tk.decode, tk.prefill])
def test_empty_sparse_part_and_no_lowrank(fn):
    n_tokens = 3 if fn is tk.decode else 17
    rows, _, _, bias = layer(64, 48, 0.0, 0, F32, True)
    assert rows.nnz == 0
    x = torch.randn(n_tokens, 64)
    y = fn(x, rows, None, None, bias, **SMALL)
    assert torch.allclose(y, bias.expand(n_tokens, -1))
    assert torch.equal(fn(x, rows, None, None, None, **SMALL), torch.zeros(n_tokens, 48))
    a, b = torch.empty(64, 0), torch.empty(0, 48)  # r = 0 given as empty factors
    assert torch.allclose(fn(x, rows, a, b, bias, **SMALL), bias.expand(n_tokens, -1))
    rows, a, b, _ = layer(64, 48, 0.0, 4, F32, False)  # nnz 0, low-rank only
    assert rel_err(fn(x, rows, a, b, None, **SMALL), lowrank_sparse(x, rows, a, b)) < 1e-5
    rows, _, _, _ = layer(64, 48, 0.5, 0, F32, False)  # r = 0, sparse only
    assert rel_err(fn(x, rows, None, None, None, **SMALL), lowrank_sparse(x, rows, None, None)) < 1e-5


def test_bad_input_raises():
    rows, a, b, bias = layer(64, 48, 0.5, 4, F16, True)
    x = torch.randn(2, 64).to(F16)
    n_in, n_out = 64, 44
    mask = torch.rand(n_in, n_out) < 0.5
    odd = sparse_rows("bitmask", pack_bitmask(mask), torch.randn(n_in, n_out)[mask].to(F16), n_in, n_out)
    bad = {
        "out_features must be a multiple of 8": (x, odd, None, None, None),
        "do not fit": (x, rows, a, b[:3], bias),
        "both be given": (x, rows, a, None, bias),
        "dtype": (x.float(), rows, None, None, None),
        "must have x's dtype": (x, rows, a.float(), b, None),
        "features": (torch.randn(2, 32).to(F16), rows, None, None, None),
        "bias must have shape": (x, rows, None, None, bias[:8]),
    }
    for fn in (tk.decode, tk.prefill):
        for message, args in bad.items():
            with pytest.raises(ValueError, match=message):
                fn(*args)
        with pytest.raises(ValueError, match="tile_offsets"):
            fn(x, rows, a, b, bias, tile_offsets(rows, 32))
        with pytest.raises(ValueError, match="power of two"):
            fn(x, rows, a, b, bias, block_n=24)
    with pytest.raises(ValueError, match="T=17"):
        tk.decode(torch.randn(17, 64).to(F16), rows, a, b, bias)


def test_supported_under_interpreter():
    assert tk.supported()
