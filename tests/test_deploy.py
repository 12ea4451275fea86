"""Deploy dtype, compact resident inference, exact resident bytes and side-by-side ratios.

Run: .venv/bin/python -m pytest -q tests/test_deploy.py
No test here asserts on a measured time or memory figure: ratios come from injected times, and resident bytes
are an exact count of tensor storage.
"""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from saten_core.deploy.dtype import check_dtype, compute_dtype, torch_dtype
from saten_core.deploy.memory import held_tensors, resident_bytes
from saten_core.deploy.speed import no_measurable_difference, round_ratios, summarise
from saten_core.layer import SatenLinear
from saten_core.plan import Plan, dry_run, layer_spec
from saten_core.spec import LayerSpec

IN, OUT = 96, 192


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def _no_dense_tensor(layer: SatenLinear) -> bool:
    return all(t.numel() < IN * OUT for t in held_tensors(layer))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [LayerSpec(rank=8, density=0.3), LayerSpec(method="prune", density=0.5),
                                  LayerSpec(rank=8, structure="2:4"), LayerSpec(method="svd", rank=6)])
def test_compact_path_equals_materialized_and_keeps_nothing_dense(linear, spec, dtype):
    layer = SatenLinear.from_linear(linear.to(dtype), spec)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        compact = layer(x)
        assert _no_dense_tensor(layer)
        layer.materialize()
        dense = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert compact.dtype == dtype and torch.allclose(compact.float(), dense.float(), atol=tol, rtol=tol)
    linear.float()


def test_resident_bytes_count_caches_exactly(linear):
    layer = SatenLinear.from_linear(linear, LayerSpec(rank=8, density=0.3))
    x = torch.randn(3, IN)
    with torch.no_grad():
        layer(x)
        rank = layer.rank()
        compact = resident_bytes(layer)
        layer.materialize()
        layer(x)
        materialized = resident_bytes(layer)
    pair, offsets = rank * (IN + OUT) * 4, (IN + 1) * 8  # factor pair + the kernels' per-row value offsets
    assert compact == layer.stored_bytes() + layer.bias.numel() * 4 + pair + offsets
    assert materialized >= compact - offsets + IN * OUT * 4  # the dense residual the opt-in path caches


def test_resident_bytes_counts_shared_storage_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert resident_bytes(nn.ModuleList([emb, head])) == 10 * 4 * 4


def test_bf16_computes_in_fp32_only_on_a_cpu_without_bf16_units(linear, monkeypatch):
    from saten_core.deploy import dtype as deploy_dtype

    layer = SatenLinear.from_linear(linear.to(torch.bfloat16), LayerSpec(rank=8, density=0.2))
    linear.float()
    monkeypatch.setattr(deploy_dtype, "_cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert compute_dtype(torch.bfloat16, "cpu") == torch.float32
    assert compute_dtype(torch.float16, "cpu") == torch.float32
    monkeypatch.setattr(deploy_dtype, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert compute_dtype(torch.float16, "cpu") == torch.float32
    assert compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert {t.dtype for t in layer.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}


def test_deploy_dtype_rounds_cores_before_the_residual(linear):
    """Fitted in fp32 with dtype=bf16: after model.to(bf16) the sparse part has corrected the rounded cores."""
    spec = LayerSpec(rank=8, density=0.5)
    aware = SatenLinear.from_linear(linear, spec, dtype=torch.bfloat16)
    assert all(torch.equal(g, g.to(torch.bfloat16).float()) for g in aware.cores)
    assert aware.stored_bytes(torch.bfloat16) < aware.stored_bytes()


def test_plan_dtype_default_round_trip_and_legacy():
    plan = Plan(method="saten", target_ratio=0.5)
    assert plan.dtype == "bfloat16" and Plan.from_json(plan.to_json()) == plan
    legacy = json.loads(plan.to_json())
    del legacy["dtype"]
    assert Plan.from_dict(legacy).dtype == "float32"
    with pytest.raises(ValueError, match="'int8'"):
        Plan(dtype="int8").validate()
    with pytest.raises(ValueError, match="'float64'"):
        check_dtype("float64")
    assert torch_dtype("float16") == torch.float16


def test_budgets_and_dry_run_use_the_deploy_dtype(linear):
    """A 50% budget at bf16 keeps fewer values than at fp32: the bitmask costs twice as much relatively."""
    bf = layer_spec(Plan(method="saten", target_ratio=0.5), "x", IN, OUT)
    fp = layer_spec(Plan(method="saten", target_ratio=0.5, dtype="float32"), "x", IN, OUT)
    assert bf.density < fp.density
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"proj": linear})])})
    row_bf = dry_run(model, Plan(method="svd", rank=4))[0]
    row_fp = dry_run(model, Plan(method="svd", rank=4, dtype="float32"))[0]
    assert row_bf["bytes_before"] == (IN * OUT + OUT) * 2 and row_fp["bytes_before"] == (IN * OUT + OUT) * 4


def test_round_ratios_median_and_spread_from_injected_times():
    cand = [(10.0, 2.0), (12.0, 3.0), (11.0, 2.5)]
    orig = [(20.0, 2.0), (20.0, 2.0), (20.0, 2.0)]
    r = round_ratios(cand, orig)
    assert r["decode_ratio"] == 1.25 and r["decode_ratio_min"] == 1.0 and r["decode_ratio_max"] == 1.5
    assert r["prefill_ratio"] == 0.55
    assert no_measurable_difference(r["decode_ratio_min"], r["decode_ratio_max"])
    assert not no_measurable_difference(1.1, 1.4)


def test_summarise_picks_the_faster_original():
    times = {"compressed": [(5.0, 3.0)] * 5, "bfloat16": [(20.0, 2.0)] * 5, "float32": [(10.0, 4.0)] * 5}
    out = summarise(times)
    assert out["ratio_reference"] == "bfloat16" and out["decode_ratio"] == 1.5
    assert out["ratios"]["float32"]["decode_ratio"] == 0.75 and out["rounds"] == 5


@pytest.fixture(scope="module")
def compressed_dir(tiny_llama_dir, tmp_path_factory):
    from saten_core.pipeline import compress_to_dir

    out = tmp_path_factory.mktemp("deploy") / "s50"
    compress_to_dir(str(tiny_llama_dir), Plan(method="saten", target_ratio=0.5), out, device="cpu")
    return out


def test_compressed_dir_saves_and_reloads_at_bf16_compactly(compressed_dir):
    from safetensors.torch import load_file

    from saten_core.checkpoint import load_compressed, read_report
    from saten_core.evaluate import forward_once

    report = read_report(compressed_dir)
    assert report["dtype"] == "bfloat16" and report["totals"]["dtype"] == "bfloat16"
    state = load_file(str(compressed_dir / "model.safetensors"))
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}
    loaded = load_compressed(compressed_dir)
    forward_once(loaded, 64)
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert resident_bytes(loaded.model) <= 1.1 * stored
    assert all(t.dtype != torch.float32 for t in loaded.model.parameters())
    saten = [m for m in loaded.model.modules() if isinstance(m, SatenLinear)]
    assert saten and all(_no_dense_tensor_of(m) for m in saten)


def _no_dense_tensor_of(m: SatenLinear) -> bool:
    return all(t.numel() < m.in_features * m.out_features for t in held_tensors(m))


def test_eval_json_reports_memory_and_side_by_side_fields(compressed_dir):
    """The fields exist and are numbers; their values are measurements and are not asserted."""
    done = subprocess.run([sys.executable, "-m", "saten_core", "eval", "--model", str(compressed_dir), "--tokens",
                           "128", "--device", "cpu", "--latency", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key in ("resident_bytes", "resident_bytes_original", "peak_memory_bytes", "peak_memory_bytes_original",
                "decode_ratio", "decode_ratio_min", "decode_ratio_max", "prefill_ratio"):
        assert isinstance(out[key], int | float), key
    assert out["dtype"] == "bfloat16" and out["ratio_reference"] in ("bfloat16", "float32")
    assert out["decode_ratio_min"] <= out["decode_ratio"] <= out["decode_ratio_max"]
    assert out["latency"]["side_by_side"]["rounds"] >= 5


def test_eval_refuses_a_dtype_other_than_the_saved_one(compressed_dir):
    done = subprocess.run([sys.executable, "-m", "saten_core", "eval", "--model", str(compressed_dir),
                           "--dtype", "float16", "--tokens", "64"], capture_output=True, text=True)
    assert done.returncode == 2 and "float16" in done.stderr and "Traceback" not in done.stderr


def test_plan_cli_writes_the_dtype(tiny_llama_dir, tmp_path):
    out = tmp_path / "p.json"
    done = subprocess.run([sys.executable, "-m", "saten_core", "plan", "--model", str(tiny_llama_dir), "--method",
                           "svd", "--rank", "4", "--dtype", "float16", "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["plan"]["dtype"] == "float16"
    first = got["layers"][0]
    assert first["bytes_before"] == first["shape"][0] * first["shape"][1] * 2


@pytest.mark.slow
def test_smollm2_at_half_its_bf16_bytes_is_resident_compactly(tmp_path):
    """Issue 15's bound on the embedded model: resident bytes (an exact count) <= 1.1x the checkpoint's tensors."""
    from safetensors.torch import load_file

    from saten_core.checkpoint import load_compressed, read_report
    from saten_core.evaluate import forward_once
    from saten_core.pipeline import compress_to_dir

    out = tmp_path / "s50"
    compress_to_dir("smollm2-135m", Plan(method="saten", target_ratio=0.5), out, device="cpu")
    totals = read_report(out)["totals"]
    assert totals["dtype"] == "bfloat16" and totals["bytes_after"] <= 0.5 * totals["bytes_before"]
    assert totals["bytes_before"] == 2 * totals["params_before"]  # every block linear counted at 2 bytes
    stored = sum(t.numel() * t.element_size() for t in load_file(str(out / "model.safetensors")).values())
    loaded = load_compressed(out)
    forward_once(loaded, 512)
    assert resident_bytes(loaded.model) <= 1.1 * stored
    assert all(_no_dense_tensor_of(m) for m in loaded.model.modules() if isinstance(m, SatenLinear))
