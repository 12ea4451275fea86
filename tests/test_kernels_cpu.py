"""Compiled CPU kernels equal the reference path: every instruction set, dtype, density, rank and token count.

Run: .venv/bin/python -m pytest -q tests/test_kernels_cpu.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from saten_core.kernels import cpu, dispatch
from saten_core.kernels.format import row_offsets, sparse_rows
from saten_core.kernels.reference import dense_sparse, lowrank_sparse
from saten_core.layer import SatenLinear
from saten_core.sparse import pack_bitmask, unpack_mask
from saten_core.spec import LayerSpec

pytestmark = pytest.mark.skipif(cpu.extension() is None, reason="the compiled CPU kernels did not build here")
ISA_NAMES = {"avx512": ("scalar", "avx2", "avx512"), "avx2": ("scalar", "avx2"), "scalar": ("scalar",)}
ISAS = ISA_NAMES[cpu.extension().best_isa()] if cpu.extension() is not None else ()
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rel(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _layer(n_in, n_out, density, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_in, n_out, generator=g) < density
    w = torch.randn(n_in, n_out, generator=g).to(dtype)
    rows = sparse_rows("bitmask", pack_bitmask(mask), w[mask].contiguous(), n_in, n_out)
    a = torch.randn(n_in, rank, generator=g).to(dtype) if rank else None
    b = torch.randn(rank, n_out, generator=g).to(dtype) if rank else None
    return rows, a, b


# shapes cover row blocks of 8 with a remainder, widths that are and are not multiples of 32, and a tall layer
@pytest.mark.parametrize("shape", [(64, 48), (99, 136), (40, 584)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_equals_reference_on_every_isa(shape, density, dtype):
    for rank in (0, 5, 33):
        rows, a, b = _layer(*shape, density, rank, dtype)
        bias = torch.randn(shape[1]).to(dtype)
        for tokens in (1, 3, 16):
            x = torch.randn(tokens, shape[0]).to(dtype)
            ref = lowrank_sparse(x.float(), rows, a, b, bias)  # fp32 from the same 16-bit inputs
            ref16 = lowrank_sparse(x, rows, a, b, bias)  # the reference path's own output, rounded once
            for isa in ISAS:
                y = cpu.decode(x, rows, a, b, bias, isa=isa)
                assert y.dtype == dtype and y.shape == (tokens, shape[1])
                y32 = cpu.decode(x.float(), rows, a, b, bias, isa=isa)
                assert _rel(y32, ref) < 1e-5, (rank, tokens, isa)  # fp32 output: accumulation error only
                assert _rel(y, ref16) < (1e-3 if dtype != torch.float32 else 1e-5), (rank, tokens, isa)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_prefill_equals_reference(dtype, density):
    rows, a, b = _layer(96, 200, density, 7, dtype)
    x = torch.randn(40, 96).to(dtype)
    for isa in ISAS:
        y = cpu.prefill(x, rows, a, b, compute=torch.float32, isa=isa)
        assert _rel(y, lowrank_sparse(x, rows, a, b)) < (1e-3 if dtype != torch.float32 else 1e-5)
        # same-dtype scratch (the native 16-bit GEMM): rounding of the 16-bit GEMM only
        assert _rel(cpu.prefill(x, rows, a, b, compute=dtype, isa=isa), lowrank_sparse(x, rows, a, b)) < 1e-2


def test_prefill_in_chunks_equals_one_chunk(monkeypatch):
    rows, a, b = _layer(130, 64, 0.3, 4, torch.bfloat16)
    x = torch.randn(20, 130).to(torch.bfloat16)
    whole = cpu.prefill(x, rows, a, b, compute=torch.float32)
    monkeypatch.setattr(cpu, "SCRATCH_BYTES", 64 * 4 * 7)  # 7 rows per chunk: 19 chunks
    assert _rel(cpu.prefill(x, rows, a, b, compute=torch.float32), whole) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_rows_and_row_offsets_match_torch(dtype):
    rows, _, _ = _layer(50, 96, 0.4, 0, dtype)
    ext = cpu.extension()
    counts = unpack_mask("bitmask", rows.mask, (50, 96)).sum(1)
    assert torch.equal(row_offsets(rows.mask, 50, 96), torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    for isa in ISAS:
        part = ext.expand_rows(rows.mask, rows.values, rows.row_offsets, 10, 37, 96, dtype, cpu.ISAS[isa])
        assert torch.equal(part, dense_sparse(rows, dtype)[10:37])
        full = ext.expand_rows(rows.mask, rows.values, rows.row_offsets, 0, 50, 96, torch.float32, cpu.ISAS[isa])
        assert torch.equal(full, dense_sparse(rows, torch.float32))


def test_bad_input_raises_value_error():
    rows, a, b = _layer(16, 12, 0.5, 0, torch.float32)
    with pytest.raises(ValueError, match="divisible by 8, got 12"):
        cpu.decode(torch.randn(1, 16), rows, None, None)
    rows, a, b = _layer(16, 16, 0.5, 0, torch.float32)
    with pytest.raises(ValueError, match="unknown isa 'sse9'"):
        cpu.decode(torch.randn(1, 16), rows, None, None, isa="sse9")
    with pytest.raises(ValueError, match="unknown kernel path 'fast'"):
        dispatch.check_path("fast")


def test_dispatch_rule_on_cpu():
    cpu_dev = torch.device("cpu")
    assert dispatch.choose(cpu_dev, 1, 64) == "cpu-decode"
    assert dispatch.choose(cpu_dev, dispatch.DECODE_MAX_TOKENS, 64) == "cpu-decode"
    assert dispatch.choose(cpu_dev, dispatch.DECODE_MAX_TOKENS + 1, 64) == "cpu-prefill"
    assert dispatch.choose(cpu_dev, 1, 60) == "reference"  # width not divisible by 8


@pytest.mark.parametrize("spec", [LayerSpec(rank=6, density=0.3), LayerSpec(method="wanda", density=0.5),
                                  LayerSpec(method="prune", structure="2:4"), LayerSpec(rank=4, density=0.01)],
                         ids=str)
def test_layer_kernel_paths_equal_reference_at_bf16(spec):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    stats = None
    if spec.method == "wanda":
        from saten_core.calibrate import InputStats

        xs = torch.randn(256, 64)
        stats = InputStats(xtx=(xs.T @ xs).double(), tokens=256)
    layer = SatenLinear.from_linear(lin, spec, stats=stats).to(torch.bfloat16).eval()
    before = layer.stored_bytes()
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        layer.kernel_path = "reference"
        ref = layer(x)
        for path in ("cpu-decode", "cpu-prefill", "auto"):
            layer.kernel_path = path
            assert _rel(layer(x), ref) < 1e-2, path  # both round to bf16 once; the GEMM of prefill at bf16
    assert layer.stored_bytes() == before  # a 2:4 mask rewritten as the bitmask keeps its bytes
    assert layer.mask_format in ("bitmask", "index")


def test_missing_extension_falls_back_to_reference_and_says_so_once(monkeypatch):
    def fail(verbose):
        raise OSError("no compiler")

    monkeypatch.setattr(cpu, "_build", fail)
    cpu.extension.cache_clear()
    try:
        layer = SatenLinear.from_linear(nn.Linear(32, 40), LayerSpec(rank=3, density=0.2)).eval()
        x = torch.randn(3, 32)
        with warnings.catch_warnings(record=True) as seen, torch.inference_mode():
            warnings.simplefilter("always")
            y1, y2 = layer(x), layer(x[:1])
        said = [w for w in seen if "compiled CPU kernels unavailable" in str(w.message)]
        assert len(said) == 1 and "OSError: no compiler" in str(said[0].message)
        assert dispatch.choose(torch.device("cpu"), 1, 40) == "reference"
        layer.kernel_path = "reference"
        assert torch.allclose(y1, layer(x)) and torch.allclose(y2, layer(x[:1]))
    finally:
        cpu.extension.cache_clear()


def test_resident_bytes_count_the_kernel_offsets():
    from saten_core.deploy.memory import resident_bytes

    layer = SatenLinear.from_linear(nn.Linear(64, 96, bias=False), LayerSpec(rank=4, density=0.3))
    layer = layer.to(torch.bfloat16).eval()
    with torch.inference_mode():
        layer(torch.randn(1, 64).to(torch.bfloat16))
    a, b = layer._cached_pair()
    expected = layer.stored_bytes() + (a.numel() + b.numel()) * 2 + (64 + 1) * 8  # + factor pair + row offsets
    assert resident_bytes(layer) == expected


def test_model_paths_counts_what_each_layer_runs():
    model = nn.Sequential(SatenLinear.from_linear(nn.Linear(64, 96), LayerSpec(rank=4, density=0.3)),
                          SatenLinear.from_linear(nn.Linear(96, 60), LayerSpec(rank=4, density=0.3)))
    paths = dispatch.model_paths(model, "cpu")
    assert paths["decode"] == {"cpu-decode": 1, "reference": 1}
    assert paths["prefill"] == {"cpu-prefill": 1, "reference": 1}
    assert paths["isa"] == cpu.extension().best_isa()
    model[0].kernel_path = "reference"
    assert dispatch.model_paths(model, "cpu")["decode"] == {"reference": 2}


def test_cuda_rule_is_reference_until_triton_is_opted_in(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("SATEN_CUDA_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "_triton_ready", lambda: True)
    assert dispatch.choose(cuda, 1, 64) == "reference"
    monkeypatch.setenv("SATEN_CUDA_KERNELS", "triton")
    assert dispatch.choose(cuda, 1, 64) == "triton-decode"
    assert dispatch.choose(cuda, 100, 64) == "triton-prefill"
    monkeypatch.setattr(dispatch, "_triton_ready", lambda: False)
    assert dispatch.choose(cuda, 1, 64) == "reference"


def test_prefill_scratch_serves_inference_mode_and_plain_calls_alike():
    rows, a, b = _layer(64, 96, 0.3, 4, torch.bfloat16)
    x = torch.randn(20, 64).to(torch.bfloat16)
    cpu._SCRATCH.__dict__.clear()
    with torch.inference_mode():
        first = cpu.prefill(x, rows, a, b)  # the scratch is created here
    assert torch.equal(cpu.prefill(x, rows, a, b), first)  # and reused outside inference mode


def test_a_stale_build_baton_is_cleared_not_waited_on(tmp_path):
    """A build killed mid-way leaves torch's `lock` file; the next load must clear it, not wait forever."""
    cache = tmp_path / "kernels"
    shutil.copytree(cpu.build_dir(), cache / cpu.build_dir().name)  # mtimes kept: ninja finds it up to date
    (cache / cpu.build_dir().name / "lock").write_text("")
    code = "from saten_core.kernels import cpu; print(cpu.build(verbose=False))"
    env = {**os.environ, "SATEN_KERNEL_CACHE": str(cache)}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the load waited on a stale build lock")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in ISA_NAMES
