"""Activation-aware methods (saten-aw, svd-w, wanda), calibration + healing through plan / pipeline / CLI.

Run: .venv/bin/python -m pytest -q tests/test_activation.py
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from saten_core.calibrate import InputStats
from saten_core.layer import SatenLinear, predict_bytes
from saten_core.plan import Plan
from saten_core.spec import LayerSpec

N_IN, N_OUT, TOKENS = 64, 96, 2000


@pytest.fixture(scope="module")
def correlated():
    """A layer and strongly correlated inputs with uneven scales (as in LLM activations)."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(N_IN, N_IN, generator=gen) * torch.logspace(0.5, -2, N_IN)  # decaying input directions
    x = torch.randn(TOKENS, N_IN, generator=gen) @ mix.T
    x[:, :4] *= 8.0  # a few outlier input features
    lin = nn.Linear(N_IN, N_OUT, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N_OUT, N_IN, generator=gen) / N_IN**0.5)
    return lin, x, InputStats((x.T @ x).double(), TOKENS)


def out_error(layer: SatenLinear, lin: nn.Linear, x: torch.Tensor) -> float:
    """||X (W - W_hat)^T||_F / ||X W^T||_F."""
    with torch.no_grad():
        return float(torch.linalg.norm(x @ (lin.weight - layer.to_dense()).T) / torch.linalg.norm(x @ lin.weight.T))


@pytest.mark.parametrize("aware, free, spec", [
    ("svd-w", "svd", dict(rank=8, order=1)),
    ("saten-aw", "saten", dict(rank=8, density=0.1)),
    ("saten-aw", "saten", dict(rank=4, density=0.05)),  # rank below the first mode: lossy re-TT, still better
    ("saten-aw", "saten", dict(rank=8, structure="2:4")),
])
def test_whitened_low_rank_beats_data_free_at_same_bytes(correlated, aware, free, spec):
    lin, x, stats = correlated
    if spec.get("structure") == "2:4":
        spec = dict(spec, density=0.5)
    a = SatenLinear.from_linear(lin, LayerSpec(method=aware, **spec), stats=stats)
    f = SatenLinear.from_linear(lin, LayerSpec(method=free, **spec))
    assert a.stored_bytes() == f.stored_bytes() == predict_bytes(N_IN, N_OUT, a.spec, torch.float32)
    assert a.ranks == f.ranks
    assert out_error(a, lin, x) < 0.9 * out_error(f, lin, x)


def test_whitened_tt_is_exact_at_full_rank(correlated):
    lin, x, stats = correlated
    layer = SatenLinear.from_linear(lin, LayerSpec(method="saten-aw", rank=None), stats=stats)
    torch.testing.assert_close(layer.to_dense(), lin.weight.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure, density", [("unstructured", 0.2), ("2:4", 0.5)])
def test_activation_scored_residual_mask_beats_magnitude_mask(correlated, structure, density):
    lin, x, stats = correlated
    spec = LayerSpec(method="saten", rank=4, density=density, structure=structure)
    scores = stats.column_norms.float()[:, None].expand(N_IN, N_OUT)
    scored = SatenLinear.from_linear(lin, spec, scores=scores)
    plain = SatenLinear.from_linear(lin, spec)
    assert scored.stored_bytes() == plain.stored_bytes()
    assert out_error(scored, lin, x) < 0.95 * out_error(plain, lin, x)


@pytest.mark.parametrize("structure, density", [("unstructured", 0.3), ("2:4", 0.5)])
def test_wanda_beats_magnitude_pruning(correlated, structure, density):
    lin, x, stats = correlated
    wanda = SatenLinear.from_linear(lin, LayerSpec(method="wanda", density=density, structure=structure),
                                    stats=stats)
    prune = SatenLinear.from_linear(lin, LayerSpec(method="prune", density=density, structure=structure))
    assert wanda.stored_bytes() == prune.stored_bytes() and not len(wanda.cores)
    assert out_error(wanda, lin, x) < 0.9 * out_error(prune, lin, x)


@pytest.mark.parametrize("method", ["saten-aw", "svd-w", "wanda"])
def test_missing_statistics_name_the_method(correlated, method):
    lin = correlated[0]
    spec = LayerSpec(method=method, rank=None if method == "wanda" else 4, density=0.1)
    with pytest.raises(ValueError, match=method):
        SatenLinear.from_linear(lin, spec)
    with pytest.raises(ValueError, match="do not fit"):
        SatenLinear.from_linear(lin, spec, stats=InputStats(torch.eye(3, dtype=torch.float64), 5))


def test_compress_without_stats_fails_before_any_change(tiny_llama_dir):
    from saten_core.compress import compress_
    from saten_core.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="saten-aw"):
        compress_(loaded.model, Plan(method="saten-aw", target_ratio=0.6))
    assert not any(isinstance(m, SatenLinear) for m in loaded.model.modules())


@pytest.mark.parametrize("method, twin", [("saten-aw", "saten"), ("svd-w", "svd"), ("wanda", "prune")])
def test_target_ratio_resolves_like_the_data_free_twin(method, twin):
    from saten_core.plan import layer_spec

    for structure in ("unstructured", "2:4") if twin != "svd" else ("unstructured",):
        for group in ("layer", "row"):  # the same top-k group; "auto" differs (row for wanda / saten-aw)
            args = dict(target_ratio=0.6, lowrank_share=0.3, structure=structure, mask_group=group,
                        **({"fit_rounds": 2} if twin == "saten" else {}))  # the default rounds differ by method
            aware = layer_spec(Plan(method=method, **args), "x", 576, 1536, torch.float32)
            free = layer_spec(Plan(method=twin, **args), "x", 576, 1536, torch.float32)
            assert aware.to_dict() == dict(free.to_dict(), method=method)


# ---------------------------------------------------------------- pipeline: calibrate, compress, heal, save

HEAL = dict(heal_steps=3, heal_seq_len=32, heal_batch_size=2, heal_tokens=256, heal_eval_tokens=64,
            heal_eval_every=1, heal_lr=1e-3)


def test_compress_to_dir_calibrates_heals_and_reloads(tiny_llama_dir, tmp_path):
    from saten_core.checkpoint import load_compressed
    from saten_core.models import load_model
    from saten_core.pipeline import compress_to_dir

    plan = Plan(method="saten-aw", target_ratio=0.6, calib="default", calib_tokens=256, calib_seq_len=128, **HEAL)
    stages = []
    report = compress_to_dir(str(tiny_llama_dir), plan, tmp_path / "out", device="cpu",
                             progress=lambda stage, frac, msg: stages.append(stage))
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == ["load", "calibrate", "compress",
                                                                                 "heal", "save"]
    heal = report["heal"]
    assert len(heal["loss_curve"]) == 3 and [s for s, _ in heal["eval_curve"]] == [0, 1, 2, 3]
    assert heal["config"]["steps"] == 3 and heal["config"]["lr"] == 1e-3 and heal["seconds"] > 0
    assert report["calibration"] == {"source": "default", "tokens": 256, "seq_len": 128, "order": "all-at-once",
                                     "seconds": report["calibration"]["seconds"]}
    assert all(0 < r["rel_output_error"] < 1 for r in report["layers"])
    assert report["totals"]["bytes_after"] <= 0.6 * report["totals"]["bytes_before"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["heal"]["loss_curve"] == heal["loss_curve"] and saved["plan"]["heal_steps"] == 3
    again = load_compressed(tmp_path / "out")
    assert Plan.from_json((tmp_path / "out" / "plan.json").read_text()) == plan
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        reloaded = again.model(input_ids=ids).logits
        original = load_model(str(tiny_llama_dir)).model(input_ids=ids).logits
    assert not torch.allclose(reloaded.float(), original.float())  # compressed, not a copy
    fresh = load_compressed(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(input_ids=ids).logits, reloaded, rtol=0, atol=0)


def test_build_compressed_in_memory_matches_heal_off(tiny_llama_dir):
    from saten_core.build import build_compressed, collect_stats, compress_loaded
    from saten_core.models import load_model, to_working_precision

    plan = Plan(method="wanda", target_ratio=0.7, calib_tokens=256, calib_seq_len=128)
    loaded, info = build_compressed(str(tiny_llama_dir), plan, device="cpu")
    assert info["heal"] is None and info["calibration"]["tokens"] == 256 and len(info["layers"]) == 14
    other = load_model(str(tiny_llama_dir), dtype=plan.torch_dtype())  # the deployed weights, in fp32 for work
    to_working_precision(other.model)
    stats = collect_stats(other, plan)
    again = compress_loaded(other, plan, stats=stats)
    assert again["calibration"] is None  # statistics were given, not collected
    for a, b in zip(loaded.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("content, word", [("", "empty"), ("just a few words here", "fewer than calib_tokens")])
def test_empty_or_short_calibration_text_fails_clearly(tiny_llama_dir, tmp_path, content, word):
    from saten_core.pipeline import compress_to_dir

    text = tmp_path / "calib.txt"
    text.write_text(content, encoding="utf-8")
    plan = Plan(method="saten-aw", target_ratio=0.6, calib=str(text), calib_tokens=256)
    with pytest.raises(ValueError, match=word):
        compress_to_dir(str(tiny_llama_dir), plan, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_heal_text_too_short_and_encoder_heal_fail_clearly(tiny_llama_dir, tiny_bert_dir, tmp_path):
    from saten_core.pipeline import compress_to_dir

    plan = Plan(method="saten", target_ratio=0.6, **dict(HEAL, heal_tokens=10**6))
    with pytest.raises(ValueError, match="heal_tokens 1000000"):
        compress_to_dir(str(tiny_llama_dir), plan, tmp_path / "a", device="cpu")
    with pytest.raises(ValueError, match="decoder"):
        compress_to_dir(str(tiny_bert_dir), Plan(method="saten", target_ratio=0.6, **HEAL), tmp_path / "b",
                        device="cpu")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- CLI

def test_cli_plan_and_compress_with_calibration_flags(tiny_llama_dir, tmp_path):
    from test_cli import cli

    plan, out = tmp_path / "plan.json", tmp_path / "out"
    proc = cli("plan", "--model", tiny_llama_dir, "--method", "wanda", "--structure", "2:4", "--calib-tokens", "256",
               "--out", plan, "--json")
    assert proc.returncode == 0, proc.stderr
    written = json.loads(plan.read_text())
    assert written["method"] == "wanda" and written["calib_tokens"] == 256
    plan.write_text(json.dumps(dict(written, **{k: v for k, v in HEAL.items() if k != "heal_steps"})))
    calib = tmp_path / "calib.txt"
    from saten_core.corpus import default_text

    calib.write_text(default_text()[:20000], encoding="utf-8")
    proc = cli("compress", "--model", tiny_llama_dir, "--plan", plan, "--out", out, "--device", "cpu",
               "--calib", calib, "--heal-steps", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["plan"]["calib"] == str(calib.resolve()) and report["plan"]["heal_steps"] == 2
    assert len(report["heal"]["loss_curve"]) == 2 and "healed 2 steps" in proc.stderr


@pytest.mark.parametrize("args, word", [
    (["--heal-steps", "-1"], "-1"),
    (["--heal-steps", "x"], "'x'"),
    (["--heal-lr", "0"], "0"),
    (["--calib-tokens", "0"], "0"),
    (["--calib", "no-such-calib.txt"], "no-such-calib.txt"),
    (["--calib", "EMPTY"], "empty"),
    (["--calib", "SHORT"], "fewer than calib_tokens"),
])
def test_cli_compress_bad_calibration_values(tiny_llama_dir, tmp_path, args, word):
    from test_cli import assert_bad_input, assert_no_dir, cli

    (tmp_path / "EMPTY").write_text("  \n", encoding="utf-8")
    (tmp_path / "SHORT").write_text("a short text", encoding="utf-8")
    args = [str(tmp_path / a) if a in ("EMPTY", "SHORT") else a for a in args]
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    plan.write_text(Plan(method="saten-aw", target_ratio=0.6, calib_tokens=256).to_json(), encoding="utf-8")
    assert_bad_input(cli("compress", "--model", tiny_llama_dir, "--plan", plan, "--out", out, "--device", "cpu",
                         *args), word)
    assert_no_dir(out)


def test_cli_plan_rejects_rank_for_wanda(tiny_llama_dir, tmp_path):
    from test_cli import assert_bad_input, cli

    assert_bad_input(cli("plan", "--model", tiny_llama_dir, "--method", "wanda", "--rank", "4",
                         "--out", tmp_path / "p.json"), "wanda")


def test_cli_plan_mask_group(tiny_llama_dir, tmp_path):
    from test_cli import assert_bad_input, cli

    out = tmp_path / "p.json"
    done = cli("plan", "--model", tiny_llama_dir, "--method", "wanda", "--target-ratio", "0.6", "--mask-group",
               "layer", "--out", out)
    assert done.returncode == 0, done.stderr
    assert Plan.from_json(out.read_text()).mask_group == "layer"
    assert_bad_input(cli("plan", "--model", tiny_llama_dir, "--method", "wanda", "--target-ratio", "0.6",
                         "--mask-group", "column", "--out", tmp_path / "q.json"), "column")


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_lossy_input_split_is_refined_in_the_whitened_norm(correlated, rank):
    """Rank caps below the first input mode (8 here) cannot keep L^-T M_hat exactly; ALS gets close to it."""
    from saten_core.calibrate import whitening_factor
    from saten_core.whiten import rett_loss

    lin, _, stats = correlated
    d = rett_loss(lin.weight.detach().mT, whitening_factor(stats), [8, 8], [12, 8], max_rank=rank)
    assert d["tt"] <= 1.002 * d["dense"] < d["reference"]


def test_refinement_from_the_moment_equals_refinement_from_the_factor(correlated):
    """C passed as X^T X / T + ridge I (never formed) gives the same ALS cores as C = L L^T formed from L."""
    from saten_core.whiten import Whitening, refine_input_pair, split_input_side

    lin, _, stats = correlated
    wt = lin.weight.detach().mT.double()
    white = Whitening.of(stats)
    exact = wt[:, :6]  # any (in, r) target factor
    cores = split_input_side(exact.float(), [8, 8], [3])
    from_moment = refine_input_pair(cores, white, exact)
    from_factor = refine_input_pair(cores, Whitening(white.low), exact)
    for a, b in zip(from_moment, from_factor, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_slabbed_error_products_equal_the_whole_products(correlated, monkeypatch):
    """output_error, whiten_weight and relative_output_error in tiny slabs equal the one-product formulas."""
    import saten_core.whiten as wh
    from saten_core.calibrate import whitening_factor
    from saten_core.compress import relative_output_error

    lin, _, stats = correlated
    low = whitening_factor(stats)
    w = lin.weight.detach()
    delta = torch.randn_like(w) * 0.1
    c = stats.xtx
    d64, w64 = delta.double(), w.double()
    want_rel = float(torch.sqrt(torch.sum((d64 @ c) * d64) / torch.sum((w64 @ c) * w64)))
    want_err = float(torch.linalg.matrix_norm(low.mT @ delta.mT.double()))
    want_m = (low.mT @ w.mT.double()).float()
    monkeypatch.setattr(wh, "SLAB", 3 * N_IN)  # 3 columns / rows per slab
    assert relative_output_error(delta, w, c) == pytest.approx(want_rel, rel=1e-10)
    assert wh.output_error(delta.mT, low) == pytest.approx(want_err, rel=1e-10)
    torch.testing.assert_close(wh.whiten_weight(low, w.mT), want_m)
