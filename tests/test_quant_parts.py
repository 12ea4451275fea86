"""Quantized Saten parts (--value-bits / --core-bits): exact bytes, every path equal, reload, plan, CLI, healing.

Run: .venv/bin/python -m pytest -q tests/test_quant_parts.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from saten_core.calibrate import InputStats
from saten_core.deploy.memory import resident_bytes
from saten_core.layer import SatenLinear, predict_bytes
from saten_core.plan import Plan, layer_spec
from saten_core.quant.grid import pack, unpack
from saten_core.quant.layer import QuantLinear
from saten_core.quant.parts import dequantize_part, fake_quantize, part_bytes, quantize_part
from saten_core.spec import LayerSpec

BITS = [(16, 16), (8, 16), (4, 16), (16, 8), (8, 8), (4, 8)]


def _stats(n_in: int, tokens: int = 256) -> InputStats:
    xs = torch.randn(tokens, n_in) * torch.linspace(0.2, 3.0, n_in)
    return InputStats(xtx=(xs.T @ xs).double(), tokens=tokens)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ---- pure functions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_fast_paths_equal_the_generic_stream(bits):
    """The 8- and 4-bit shortcuts read the same little-endian stream as the generic int64 decoder."""
    codes = torch.randint(0, 2**bits, (203,), dtype=torch.uint8)
    packed = pack(codes, bits)
    b = packed.reshape(-1, bits).to(torch.int64)
    word = (b << (torch.arange(bits) * 8)).sum(-1)
    generic = ((word[:, None] >> (torch.arange(8) * bits)) & (2**bits - 1)).reshape(-1)[:203].to(torch.uint8)
    assert torch.equal(unpack(packed, bits, 203), generic)
    assert torch.equal(unpack(packed, bits, 203), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_part_round_trip_is_within_half_a_step(bits):
    t = torch.randn(1000) * torch.linspace(0.1, 5, 1000)
    codes, scales = quantize_part(t, bits, torch.bfloat16)
    back = dequantize_part(codes, scales, bits, 1000, torch.float32)
    step = scales.repeat_interleave(64)[:1000]
    assert torch.all((back - t).abs() <= step * 0.5 + 1e-6 + (t.abs() > step * (2 ** (bits - 1) - 0.5)) * step)
    assert codes.numel() + scales.numel() * 2 == part_bytes(1000, bits, 2)
    assert torch.equal(fake_quantize(t, bits, torch.bfloat16), back)
    assert part_bytes(1000, 16, 2) == 2000 and fake_quantize(t, 16, torch.bfloat16) is t


# ---- the layer --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value_bits", "core_bits"), BITS)
@pytest.mark.parametrize("shape", [(64, 96), (96, 48)])
@pytest.mark.parametrize("extra", [{}, {"structure": "2:4", "density": 0.5}, {"group": "row"}],
                         ids=["layer", "2:4", "row"])
def test_stored_bytes_equal_the_prediction(value_bits, core_bits, shape, extra):
    spec = LayerSpec(**{"method": "saten", "rank": 5, "density": 0.1, "value_bits": value_bits,
                        "core_bits": core_bits, **extra})
    layer = SatenLinear.from_linear(nn.Linear(*shape), spec, dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        assert layer.stored_bytes(dtype) == predict_bytes(*shape, spec, dtype)
    full = SatenLinear.from_linear(nn.Linear(*shape), LayerSpec(**{**spec.to_dict(), "value_bits": 16,
                                                                   "core_bits": 16}))
    if (value_bits, core_bits) != (16, 16):
        assert layer.stored_bytes(torch.bfloat16) < full.stored_bytes(torch.bfloat16)


@pytest.mark.parametrize(("value_bits", "core_bits"), BITS)
def test_every_inference_path_equals_the_dense_weight(value_bits, core_bits):
    """Compact (compiled kernel and reference), materialized and training forwards all compute x W^T + b."""
    torch.manual_seed(0)
    spec = LayerSpec(method="saten", rank=6, density=0.1, value_bits=value_bits, core_bits=core_bits)
    layer = SatenLinear.from_linear(nn.Linear(64, 96), spec)
    x = torch.randn(7, 64)
    want = x @ layer.to_dense().detach().mT + layer.bias.detach()
    with torch.no_grad():
        for path in ("reference", "auto"):
            layer.kernel_path = path
            assert _rel(layer(x), want) < 1e-5, path
        layer.materialize()
        assert _rel(layer(x), want) < 1e-5
        layer.materialize(False)
    layer.train()
    assert _rel(layer(x), want) < 1e-5


def test_full_precision_parts_keep_the_old_layout():
    """value_bits = core_bits = 16 is exactly today's layer: same tensors, same names."""
    layer = SatenLinear.from_linear(nn.Linear(64, 96), LayerSpec(rank=4, density=0.1))
    assert {"values", "cores.0", "mask"} <= set(layer.state_dict())
    assert not any("codes" in k or "scales" in k for k in layer.state_dict())


@pytest.mark.parametrize(("value_bits", "core_bits"), BITS[1:])
def test_reload_from_layout_gives_the_same_outputs(value_bits, core_bits):
    spec = LayerSpec(method="saten", rank=4, density=0.2, value_bits=value_bits, core_bits=core_bits)
    layer = SatenLinear.from_linear(nn.Linear(64, 96), spec).to(torch.bfloat16)
    again = SatenLinear.from_layout(json.loads(json.dumps(layer.layout())))
    again.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))
    assert again.layout() == layer.layout()


def test_quantized_values_stay_compact_between_calls():
    """After a forward the layer holds codes + scales (+ the factor pair and row offsets), never 16-bit values."""
    spec = LayerSpec(method="saten", rank=4, density=0.3)
    full = SatenLinear.from_linear(nn.Linear(128, 256), spec).to(torch.bfloat16)
    small = SatenLinear.from_linear(nn.Linear(128, 256), LayerSpec(**{**spec.to_dict(), "value_bits": 4})).to(
        torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        full(x), small(x)
    saved = full.stored_bytes() - small.stored_bytes()
    assert saved > 0 and resident_bytes(full) - resident_bytes(small) == saved


def test_value_quantization_error_is_small_next_to_the_residual():
    """8-bit values change the layer's error by little; 4-bit by more, and both stay near the 16-bit fit."""
    torch.manual_seed(1)
    lin = nn.Linear(128, 128)
    w = lin.weight.detach()
    errs = {}
    for vb in (16, 8, 4):
        layer = SatenLinear.from_linear(lin, LayerSpec(method="saten", rank=8, density=0.2, value_bits=vb))
        errs[vb] = _rel(layer.to_dense().detach(), w)
    assert errs[16] <= errs[8] < errs[4] < 1.05 * errs[16] + 0.05
    assert errs[8] < errs[16] * 1.01


def test_saten_aw_and_saten_q_repair_take_the_part_bits():
    stats = _stats(64)
    aw = SatenLinear.from_linear(nn.Linear(64, 96), LayerSpec(method="saten-aw", rank=4, density=0.1,
                                                              value_bits=8, core_bits=8), stats=stats)
    assert aw.value_bits == 8 and aw.core_bits == 8
    spec = LayerSpec(method="saten-q", bits=3, qgroup=32, symmetric=True, rank=2, density=0.02, value_bits=4)
    q = QuantLinear.from_linear(nn.Linear(64, 96), spec, stats=stats, dtype=torch.bfloat16)
    assert q.repair.value_bits == 4
    assert q.stored_bytes(torch.bfloat16) == predict_bytes(64, 96, spec, torch.bfloat16)


@pytest.mark.parametrize(("fields", "message"), [
    ({"value_bits": 2}, "value_bits must be one of 16, 8, 4, got 2"),
    ({"core_bits": 4}, "core_bits must be one of 16, 8, got 4"),
    ({"method": "rtn", "bits": 4, "value_bits": 8}, "not method 'rtn'"),
    ({"method": "wanda", "target_ratio": 0.5, "value_bits": 8}, "not method 'wanda'"),
])
def test_plan_refuses_bad_part_bits(fields, message):
    with pytest.raises(ValueError, match=message):
        Plan(**fields).validate()


def test_plan_round_trips_and_spends_the_saved_bytes_on_more_entries():
    plan = Plan(method="saten", target_ratio=0.4, value_bits=8, core_bits=8)
    assert Plan.from_json(plan.to_json()) == plan
    spec8 = layer_spec(plan, "x", 256, 512, torch.bfloat16)
    spec16 = layer_spec(Plan(method="saten", target_ratio=0.4), "x", 256, 512, torch.bfloat16)
    assert (spec8.value_bits, spec8.core_bits) == (8, 8)
    assert spec8.density > 1.5 * spec16.density
    assert predict_bytes(256, 512, spec8, torch.bfloat16) <= 0.4 * 256 * 512 * 2


# ---- healing ----------------------------------------------------------------------------------------

def test_healing_tunes_the_scales_with_the_codes_fixed():
    from saten_core.heal import trainable_parameters

    spec = LayerSpec(method="saten", rank=4, density=0.2, value_bits=8, core_bits=8)
    model = nn.Sequential(SatenLinear.from_linear(nn.Linear(64, 96), spec))
    params = trainable_parameters(model)
    names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert "0.value_scales" in names and "0.core_scales.0" in names
    codes = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(8, 64)
    model(x).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ---- CLI, end to end --------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "saten_core", *args], capture_output=True, text=True)


def test_cli_plan_compress_with_quantized_parts(tiny_llama_dir, tmp_path):
    """plan --value-bits 8 --core-bits 8 -> compress: the report's bytes are the saved tensors' and fit the budget."""
    from safetensors import safe_open

    from saten_core.checkpoint import WEIGHTS

    plan = tmp_path / "p.json"
    res = _cli("plan", "--model", str(tiny_llama_dir), "--method", "saten-aw", "--target-ratio", "0.4",
               "--value-bits", "8", "--core-bits", "8", "--calib-tokens", "256", "--out", str(plan))
    assert res.returncode == 0, res.stderr
    assert Plan.from_json(plan.read_text()).value_bits == 8
    out = tmp_path / "run"
    res = _cli("compress", "--model", str(tiny_llama_dir), "--plan", str(plan), "--out", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["bytes_after"] <= 0.4 * report["totals"]["bytes_before"]
    with safe_open(str(out / WEIGHTS), "pt") as f:
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118
    for layer in report["layers"]:
        assert sum(b for k, b in sizes.items() if k.startswith(layer["name"] + ".")) == layer["bytes_after"]
    again = _cli("eval", "--model", str(out), "--json", "--device", "cpu")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "saten", "--target-ratio", "0.5", "--value-bits", "2"], "invalid choice"),
    (["--method", "wanda", "--target-ratio", "0.5", "--value-bits", "8"], "not method 'wanda'"),
])
def test_cli_refuses_bad_part_bits(tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "p.json"
    res = _cli("plan", "--model", str(tiny_llama_dir), *args, "--out", str(out))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
