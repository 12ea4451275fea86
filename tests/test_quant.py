"""Quantization: grids and packing, the shared OBS solver (GPTQ / SparseGPT), QuantLinear, plans and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from saten_core.calibrate import InputStats
from saten_core.layer import SatenLinear, predict_bytes
from saten_core.plan import REPAIR_SHARE, Plan, layer_spec
from saten_core.quant.grid import BITS, Grid, dequantize, pack, packed_bytes, quant_bytes, round_to_nearest, unpack
from saten_core.quant.layer import QuantLinear
from saten_core.quant.obs import gptq, sparsegpt
from saten_core.spec import LayerSpec


def _stats(n_in: int, tokens: int = 512, seed: int = 0) -> InputStats:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in // 4, n_in, generator=g)  # correlated inputs (as real activations are): what OBS uses
    x = torch.randn(tokens, n_in // 4, generator=g) @ mix + 0.3 * torch.randn(tokens, n_in, generator=g)
    x = x * torch.linspace(0.2, 3.0, n_in)  # unequal input energies
    return InputStats((x.T @ x).double(), tokens)


def _linear(n_in: int = 128, n_out: int = 96, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def _out_error(delta: torch.Tensor, w: torch.Tensor, stats: InputStats) -> float:
    from saten_core.compress import relative_output_error

    return relative_output_error(delta, w, stats.second_moment())


# ---- grids and packing --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip_and_exact_bytes(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(1001, bits) == 126 * bits
    assert torch.equal(unpack(packed, bits, 1001), codes)


def test_unpack_rejects_a_wrong_length():
    with pytest.raises(ValueError, match="packed stream has 5 bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), 4, 64)


@pytest.mark.parametrize("grid", [Grid(8, 0, True), Grid(4, 32, False), Grid(3, 64, True), Grid(2, 16, False)])
def test_rtn_codes_stay_on_the_grid_and_error_shrinks_with_bits(grid):
    w = torch.randn(64, 128)
    codes, scales, mins = round_to_nearest(w, grid)
    assert int(codes.max()) < 2**grid.bits
    err = (dequantize(codes, grid, scales, mins) - w).norm() / w.norm()
    finer = Grid(8, grid.group, grid.symmetric)
    c8, s8, m8 = round_to_nearest(w, finer)
    assert (dequantize(c8, finer, s8, m8) - w).norm() / w.norm() <= err
    assert err < {8: 0.01, 4: 0.12, 3: 0.25, 2: 0.5}[grid.bits]


def test_values_already_on_a_grid_are_reproduced():
    """The GGUF Q4_1 situation: weights that sit on an asymmetric 4-bit g32 grid come back almost exactly."""
    scale = torch.rand(16, 4, 1) * 0.1 + 0.01
    low = torch.randn(16, 4, 1)
    q = torch.randint(0, 16, (16, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # every block spans the whole grid, as a quantizer's own output does
    w = (q * scale + low).reshape(16, 128)
    grid = Grid(4, 32, False)
    codes, s, m = round_to_nearest(w, grid, torch.float16)
    assert ((dequantize(codes, grid, s, m) - w).norm() / w.norm()) < 2e-3
    wide = Grid(4, 64, True)
    c2, s2, m2 = round_to_nearest(w, wide, torch.float16)
    assert ((dequantize(c2, wide, s2, m2) - w).norm() / w.norm()) > 0.02  # an unaligned grid is not exact


def test_grid_rejects_bad_values():
    with pytest.raises(ValueError, match="bits must be one of"):
        Grid(5).validate()
    with pytest.raises(ValueError, match="group 128 does not divide the input width 576"):
        Grid(4, 128).validate(576)
    with pytest.raises(ValueError, match="group must be an integer >= 0"):
        Grid(4, -1).validate()


@pytest.mark.parametrize("grid", [Grid(4, 64, False), Grid(3, 32, True), Grid(8, 0, True)])
def test_quant_bytes_count_codes_scales_and_minimums(grid):
    n_in, n_out = 128, 96
    groups = n_out * (n_in // (grid.group or n_in))
    expect = n_in * n_out * grid.bits // 8 + groups * 2 * (1 if grid.symmetric else 2)
    assert quant_bytes(n_in, n_out, grid) == expect


# ---- OBS: GPTQ and SparseGPT -------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [Grid(4, 32, True), Grid(3, 64, False), Grid(4, 0, True)])
def test_gptq_beats_rtn_on_output_error(grid):
    lin, stats = _linear(), _stats(128)
    w = lin.weight.detach()
    rtn = dequantize(*_codes_grid(round_to_nearest(w, grid), grid))
    got = dequantize(*_codes_grid(gptq(w, stats.xtx, grid), grid))
    assert _out_error(got - w, w, stats) < 0.9 * _out_error(rtn - w, w, stats)


def _codes_grid(triple, grid):
    codes, scales, mins = triple
    return codes, grid, scales, mins


def test_gptq_with_identity_hessian_and_no_damping_is_rtn():
    """Equivalence: with H = I there is nothing to propagate (H^-1 is diagonal), so GPTQ rounds like RTN."""
    w, grid = torch.randn(32, 64), Grid(4, 0, True)
    codes, scales, _ = gptq(w, torch.eye(64, dtype=torch.float64) * 7.0, grid)
    rcodes, rscales, _ = round_to_nearest(w, grid)
    assert torch.equal(scales, rscales) and torch.equal(codes, rcodes)


def test_sparsegpt_keeps_exact_counts_and_beats_magnitude_scores():
    lin, stats = _linear(), _stats(128)
    w = lin.weight.detach()
    pruned, mask = sparsegpt(w, stats.xtx, 64)
    assert (mask.sum(1) == 64).all() and torch.equal(pruned != 0, mask)
    score = w.abs() * stats.column_norms.float()[None]
    wanda = torch.zeros_like(mask).scatter_(1, score.topk(64, 1).indices, True)
    assert _out_error(pruned - w, w, stats) < 0.9 * _out_error(w * wanda - w, w, stats)
    nm_w, nm = sparsegpt(w, stats.xtx, 0, nm=True)
    assert (nm.reshape(96, -1, 4).sum(-1) == 2).all()


def test_sparsegpt_at_full_density_is_the_original():
    w = torch.randn(16, 32)
    pruned, mask = sparsegpt(w, _stats(32).xtx, 32)
    assert mask.all() and torch.allclose(pruned, w, atol=1e-5)


# ---- QuantLinear -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("grid", [Grid(4, 32, False), Grid(8, 0, True), Grid(3, 64, True)])
def test_quant_linear_forward_equals_its_dense_weight_and_bytes_are_exact(method, grid):
    lin, stats = _linear(), _stats(128)
    spec = LayerSpec(method=method, bits=grid.bits, qgroup=grid.group, symmetric=grid.symmetric)
    layer = QuantLinear.from_linear(lin, spec, stats=stats, dtype=torch.bfloat16)
    x = torch.randn(5, 128)
    with torch.inference_mode():
        assert torch.allclose(layer(x), x @ layer.to_dense().mT + lin.bias, atol=1e-4)
    assert layer.stored_bytes(torch.bfloat16) == predict_bytes(128, 96, spec, torch.bfloat16) \
        == quant_bytes(128, 96, grid)
    assert layer.codes.numel() == 128 * 96 * grid.bits // 8


def test_saten_q_repair_lowers_the_error_and_counts_its_bytes():
    lin, stats = _linear(), _stats(128)
    base = LayerSpec(method="rtn", bits=2, qgroup=32)
    q = QuantLinear.from_linear(lin, base, dtype=torch.float32)
    spec = LayerSpec(method="saten-q", bits=2, qgroup=32, rank=4, density=0.05, group="row")
    s = QuantLinear.from_linear(lin, spec, stats=stats, dtype=torch.float32)
    w = lin.weight.detach()
    with torch.no_grad():
        assert _out_error(s.to_dense() - w, w, stats) < 0.9 * _out_error(q.to_dense() - w, w, stats)
    assert s.stored_bytes() == predict_bytes(128, 96, spec, torch.float32) > q.stored_bytes()
    x = torch.randn(3, 128)
    with torch.inference_mode():
        assert torch.allclose(s(x), x @ s.to_dense().mT + lin.bias, atol=1e-4)


def test_saten_q_at_full_repair_density_is_the_original():
    """Equivalence: a repair that keeps every residual entry gives back the dense weight."""
    lin, stats = _linear(64, 32), _stats(64)
    spec = LayerSpec(method="saten-q", bits=2, qgroup=32, rank=1, density=1.0, group="row")
    layer = QuantLinear.from_linear(lin, spec, stats=stats, dtype=torch.float32)
    assert torch.allclose(layer.to_dense(), lin.weight, atol=1e-5)


def test_quantized_methods_need_statistics_where_they_use_them():
    lin = _linear()
    with pytest.raises(ValueError, match="needs calibration input statistics"):
        QuantLinear.from_linear(lin, LayerSpec(method="gptq", bits=4))
    with pytest.raises(ValueError, match="needs calibration input statistics"):
        QuantLinear.from_linear(lin, LayerSpec(method="saten-q", bits=4, rank=2, density=0.01))
    with pytest.raises(ValueError, match="QuantLinear stores"):
        QuantLinear(8, 8, LayerSpec(method="saten"), bias=False)


def test_sparsegpt_layer_is_a_pruned_saten_linear_with_exact_bytes():
    lin, stats = _linear(), _stats(128)
    spec = LayerSpec(method="sparsegpt", density=0.5, group="row")
    layer = SatenLinear.from_linear(lin, spec, stats=stats, dtype=torch.bfloat16)
    assert layer.values.numel() == 96 * 64
    assert layer.stored_bytes(torch.bfloat16) == predict_bytes(128, 96, spec, torch.bfloat16)
    wanda = SatenLinear.from_linear(lin, LayerSpec(method="wanda", density=0.5, group="row"), stats=stats)
    w = lin.weight.detach()
    assert _out_error(layer.to_dense() - w, w, stats) < _out_error(wanda.to_dense() - w, w, stats)


# ---- plans -------------------------------------------------------------------------------------------

def test_plan_round_trips_the_quant_fields():
    plan = Plan(method="saten-q", target_ratio=0.25, bits=3, quant_group=32, symmetric=True, quant_base="gptq")
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "rtn"}, "needs bits"),
    ({"method": "rtn", "bits": 5}, "bits must be one of"),
    ({"method": "saten", "rank": 4, "bits": 4}, "apply to the quantizing methods"),
    ({"method": "rtn", "bits": 4, "quant_group": -2}, "group must be"),
    ({"method": "saten-q", "target_ratio": 0.3, "quant_base": "awq"}, "unknown quant_base"),
    ({"method": "saten-q", "target_ratio": 0.3, "repair_share": 1.5}, "repair_share"),
])
def test_plan_rejects_bad_quant_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Plan(**kwargs).validate()


def test_group_that_does_not_divide_a_layer_names_it():
    with pytest.raises(ValueError, match="up_proj: group 128 does not divide the input width 576"):
        layer_spec(Plan(method="rtn", bits=4, quant_group=128), "model.layers.0.mlp.up_proj", 576, 1536)


@pytest.mark.parametrize("ratio", [0.5, 0.31, 0.25, 0.19])
def test_saten_q_budget_picks_bits_rank_and_density_within_the_budget(ratio):
    plan = Plan(method="saten-q", target_ratio=ratio)
    spec = layer_spec(plan, "model.layers.0.mlp.up_proj", 576, 1536)
    got = predict_bytes(576, 1536, spec, torch.bfloat16)
    budget = ratio * 576 * 1536 * 2
    assert got <= budget and got > 0.97 * budget
    assert spec.bits is not None and spec.rank >= 1 and spec.density > 0
    assert quant_bytes(576, 1536, spec.grid()) <= (1 - REPAIR_SHARE) * budget


def test_rtn_target_ratio_picks_the_most_bits_that_fit():
    spec = layer_spec(Plan(method="rtn", target_ratio=0.3, quant_group=64), "model.layers.0.mlp.up_proj", 576, 1536)
    assert spec.bits == 4  # int4 g64 with minimums: 4.5 bits of 16 = 28%; int8 does not fit
    with pytest.raises(ValueError, match="target_ratio 0.1 is too small"):
        layer_spec(Plan(method="rtn", target_ratio=0.1), "model.layers.0.mlp.up_proj", 576, 1536)


def test_sparsegpt_target_ratio_fits_like_pruning():
    plan = Plan(method="sparsegpt", target_ratio=0.5)
    spec = layer_spec(plan, "model.layers.0.mlp.up_proj", 576, 1536)
    assert spec.group == "row" and predict_bytes(576, 1536, spec, torch.bfloat16) <= 0.5 * 576 * 1536 * 2


# ---- whole models: compress, save, load, heal --------------------------------------------------------

@pytest.mark.parametrize("plan", [
    Plan(method="rtn", bits=4, quant_group=32),
    Plan(method="gptq", bits=3, quant_group=0, symmetric=True, calib_tokens=256, calib_seq_len=128),
    Plan(method="sparsegpt", target_ratio=0.5, calib_tokens=256, calib_seq_len=128),
    Plan(method="saten-q", target_ratio=0.25, calib_tokens=256, calib_seq_len=128, quant_base="gptq"),
], ids=["rtn", "gptq", "sparsegpt", "saten-q"])
def test_compress_save_load_round_trip(tiny_llama_dir, tmp_path, plan):
    from saten_core.build import compress_loaded
    from saten_core.checkpoint import load_compressed, save_compressed
    from saten_core.models import linear_layers, load_model

    loaded = load_model(str(tiny_llama_dir), dtype=torch.float32)
    info = compress_loaded(loaded, plan)
    layers = info["layers"]
    assert len(layers) == 14 and all(r["bytes_after"] < r["bytes_before"] for r in layers)
    changed = [m for _, m in linear_layers(loaded.model) if not isinstance(m, nn.Linear)]
    assert len(changed) == 14  # every planned layer changed
    loaded.model.to(torch.bfloat16)
    report = save_compressed(loaded, plan, layers, tmp_path / "out")
    again = load_compressed(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        a, b = loaded.model(input_ids=ids).logits, again.model(input_ids=ids).logits
    assert torch.allclose(a.float(), b.float(), atol=2e-2)  # bf16 noise: one rounding step of the logits
    assert report["totals"]["bytes_after"] == sum(r["bytes_after"] for r in layers)


def test_healing_tunes_quant_scales(tiny_llama_dir):
    from saten_core.build import compress_loaded
    from saten_core.models import load_model

    loaded = load_model(str(tiny_llama_dir), dtype=torch.float32)
    plan = Plan(method="rtn", bits=2, quant_group=32, heal_steps=3, heal_tokens=512, heal_eval_tokens=256,
                heal_seq_len=64, heal_batch_size=2, heal_eval_every=1, heal_lr=1e-2, calib_tokens=256)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    info = compress_loaded(loaded, plan)
    assert info["heal"] is not None
    scales = {n: p for n, p in loaded.model.named_parameters() if n.endswith(".scales")}
    assert scales and any(n not in before for n in scales)
    codes = [b for n, b in loaded.model.named_buffers() if n.endswith(".codes")]
    assert codes and all(c.dtype == torch.uint8 for c in codes)


# ---- CLI --------------------------------------------------------------------------------------------

def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "saten_core", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [
    ["--method", "rtn", "--bits", "4", "--group", "32"],
    ["--method", "gptq", "--bits", "3", "--group", "0", "--symmetric"],
    ["--method", "sparsegpt", "--target-ratio", "0.5"],
    ["--method", "sparsegpt", "--density", "0.5"],
    ["--method", "sparsegpt", "--structure", "2:4", "--target-ratio", "0.6"],
    ["--method", "saten-q", "--target-ratio", "0.25"],
    ["--method", "saten-q", "--target-ratio", "0.3", "--bits", "2"],
])
def test_cli_plan_forms(tiny_llama_dir, tmp_path, args):
    out = tmp_path / "p.json"
    res = _cli("plan", "--model", str(tiny_llama_dir), *args, "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["totals"]["layers_changed"] == 14
    assert Plan.from_json(out.read_text()).method == args[1]


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "rtn"], "needs --bits"),
    (["--method", "rtn", "--bits", "4", "--rank", "3"], "not --rank"),
    (["--method", "rtn", "--bits", "4", "--group", "48"], "group 48 does not divide the input width 64"),
    (["--method", "rtn", "--bits", "6"], "invalid choice"),
    (["--method", "saten", "--rank", "4", "--bits", "4"], "apply to the quantizing methods"),
    (["--method", "rtn", "--target-ratio", "0.3", "--allocate"], "quantizes every layer on one grid"),
])
def test_cli_plan_refuses_bad_quant_flags(tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "p.json"
    res = _cli("plan", "--model", str(tiny_llama_dir), *args, "--out", str(out))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


# ---- cross-check against torchao (the reference a user would compare with; never the source of our bytes) ----

def _torchao_weight(w: torch.Tensor, config) -> torch.Tensor:
    """torchao's dequantized weight (out, in), from its quantized tensor subclass."""
    torchao_q = pytest.importorskip("torchao.quantization")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = nn.Sequential(lin)
    torchao_q.quantize_(model, config)
    weight = model[0].weight
    return weight.dequantize().float() if hasattr(weight, "dequantize") else weight.float()


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, 64), (8, 0)])
def test_rtn_matches_torchao_symmetric_grids(bits, group):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.05
    config = Int8WeightOnlyConfig() if bits == 8 else IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                           granularity=PerGroup(group))
    theirs = _torchao_weight(w, config)
    grid = Grid(bits, group, True)
    ours = dequantize(*_codes_grid(round_to_nearest(w, grid, torch.float16), grid))
    assert not torch.equal(theirs, w)  # torchao did quantize this layer
    # the same grid and scales: the same value for >= 98% of the weights (torchao rounds some exact ties at the
    # negative end, w / scale = -7.5, one step inwards), and the same error level
    differ = ((ours - theirs).abs() > 1e-3 * w.abs().max()).float().mean().item()
    assert differ < 0.02
    err_ours, err_theirs = ((ours - w).norm() / w.norm()).item(), ((theirs - w).norm() / w.norm()).item()
    assert abs(err_ours - err_theirs) < 0.05 * err_theirs


def test_torchao_skips_a_layer_the_group_does_not_divide_and_we_refuse_it():
    """torchao leaves a 576-wide layer at g=128 as it was, silently; our plan names the layer instead."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    w = torch.randn(32, 576)
    try:
        theirs = _torchao_weight(w, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)))
        skipped = torch.allclose(theirs, w)
    except (ValueError, AssertionError, RuntimeError):
        skipped = True  # refused loudly is fine too; what matters is that ours refuses
    assert skipped
    with pytest.raises(ValueError, match="group 128 does not divide the input width 576"):
        QuantLinear.from_linear(nn.Linear(576, 32), LayerSpec(method="rtn", bits=4, qgroup=128))


# ---- the embedded SmolLM2 is Q4_1: a 4-bit asymmetric g32 RTN reproduces it (the artefact users must see) ----

@pytest.mark.slow
def test_rtn_int4_g32_asym_reproduces_the_q4_1_source():
    from saten_core.models import linear_layers, load_model
    from saten_core.quant.source import grid_artefact, source_quantization

    source = source_quantization("smollm2-135m")
    assert source["block_linear_types"] == {"Q4_1": 210} and source["bits_per_weight"] == 5.0
    layers = dict(linear_layers(load_model("smollm2-135m", dtype=torch.float32).model))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.mlp.down_proj", "model.layers.29.mlp.up_proj"):
        w = layers[name].weight.detach()
        aligned, other = Grid(4, 32, False), Grid(4, 64, True)
        exact = dequantize(*_codes_grid(round_to_nearest(w, aligned, torch.float16), aligned))
        plain = dequantize(*_codes_grid(round_to_nearest(w, other, torch.float16), other))
        err_aligned = ((exact - w).norm() / w.norm()).item()
        err_other = ((plain - w).norm() / w.norm()).item()
        assert err_aligned < 2e-3, name  # only fp16 rounding of the recomputed scales is left
        assert err_other > 30 * err_aligned, name  # an unaligned 4-bit grid pays the full quantization error
    assert "artefact" in grid_artefact(source, 4, 32, False)
    assert "artefact" not in (grid_artefact(source, 4, 64, True) or "")


def test_cli_compress_eval_and_jobs_accept_a_quantized_plan(tiny_llama_dir, tmp_path):
    """plan -> compress --eval -> eval of the folder, unchanged commands; the report counts every quantized byte."""
    plan = tmp_path / "sq.json"
    assert _cli("plan", "--model", str(tiny_llama_dir), "--method", "saten-q", "--target-ratio", "0.3",
                "--calib-tokens", "256", "--out", str(plan)).returncode == 0
    out = tmp_path / "run"
    res = _cli("compress", "--model", str(tiny_llama_dir), "--plan", str(plan), "--out", str(out), "--eval",
               "--device", "cpu")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert all(r["spec"]["method"] == "saten-q" and r["spec"]["bits"] for r in report["layers"])
    assert report["totals"]["bytes_after"] <= 0.3 * report["totals"]["bytes_before"]
    assert report["eval"]["resident_bytes"] > 0 and report["eval"]["ppl"] > 0
    again = _cli("eval", "--model", str(out), "--json", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["kl"] == pytest.approx(report["eval"]["kl"], rel=1e-3)
    rtn = tmp_path / "rtn.json"
    assert _cli("plan", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group", "32",
                "--out", str(rtn)).returncode == 0
    sub = _cli("jobs", "submit", "--model", str(tiny_llama_dir), "--plan", str(rtn), "--json")
    assert sub.returncode == 0, sub.stderr


@pytest.mark.parametrize("plan", [
    Plan(method="rtn", bits=3, quant_group=32),
    Plan(method="saten-q", target_ratio=0.3, calib_tokens=256, calib_seq_len=128),
], ids=["rtn-int3", "saten-q"])
def test_report_bytes_equal_the_saved_tensors(tiny_llama_dir, tmp_path, plan):
    """Codes, scales, minimums, masks, cores and values: what the report counts is what the file holds."""
    from safetensors import safe_open

    from saten_core.build import compress_loaded
    from saten_core.checkpoint import WEIGHTS, save_compressed
    from saten_core.models import load_model

    loaded = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    loaded.model.float()
    layers = compress_loaded(loaded, plan)["layers"]
    loaded.model.to(torch.bfloat16)
    save_compressed(loaded, plan, layers, tmp_path / "dir")
    with safe_open(str(tmp_path / "dir" / WEIGHTS), "pt") as f:
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118
    for layer in layers:
        prefix = layer["name"] + "."
        stored = sum(b for k, b in sizes.items() if k.startswith(prefix))
        assert stored == layer["bytes_after"], layer["name"]
