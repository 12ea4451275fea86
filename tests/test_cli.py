"""The command line as a user runs it (subprocess): good paths on tiny models, every bad input -> exit 2, one line.

Run: .venv/bin/python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saten_core", *map(str, args)], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def assert_bad_input(proc: subprocess.CompletedProcess, word: str) -> None:
    """Exit 2, exactly one stderr line `error: ...` naming the bad value, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and word in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def assert_no_dir(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp folder left behind"


@pytest.fixture(scope="module")
def odd_llama_dir(tmp_path_factory) -> Path:
    """Tiny Llama whose MLP width (130) is not divisible by 4, for the 2:4 error."""
    import torch
    from conftest import minilm_tokenizer_dir
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=130, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("odd_llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_help_lists_the_commands():
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("models", "plan", "compress", "eval", "warm-cache"):
        assert command in proc.stdout


def test_models_json():
    proc = cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    names = {r["name"]: r for r in rows}
    assert {"smollm2-135m", "minilm-l6"} <= set(names)
    assert all(isinstance(r["params"], int) and r["params"] > 0 and r["kind"] in ("decoder", "encoder") for r in rows)


def serialised_bytes(path: Path) -> int:
    """Tensor bytes actually written to a safetensors file (its header excluded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def test_plan_compress_eval_decoder(tiny_llama_dir, tmp_path):
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    proc = cli("plan", "--model", tiny_llama_dir, "--method", "saten", "--target-ratio", "0.7", "--out", plan, "--json")
    assert proc.returncode == 0, proc.stderr
    dry = json.loads(proc.stdout)
    assert dry["totals"]["layers_changed"] == 14 and dry["totals"]["predicted_bytes"] <= 0.7 * dry["totals"][
        "bytes_before"]
    assert json.loads(plan.read_text())["target_ratio"] == 0.7
    proc = cli("compress", "--model", tiny_llama_dir, "--plan", plan, "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "[compress" in proc.stderr  # progress on stderr
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["bytes_after"] == dry["totals"]["predicted_bytes"]
    assert {"bytes_before", "bytes_after", "seconds"} <= set(report["totals"]) and len(report["layers"]) == 14
    assert report["totals"]["model_bytes_after"] == serialised_bytes(out / "model.safetensors")
    assert report["totals"]["model_bytes_before"] - report["totals"]["model_bytes_after"] == (
        report["totals"]["bytes_before"] - report["totals"]["bytes_after"])
    proc = cli("eval", "--model", out, "--tokens", "256", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["tokens"] == 256 and math.isfinite(got["ppl"])
    assert got["kl"] >= 0 and 0 <= got["top1_agreement"] <= 1


def test_encoder_path(tiny_bert_dir, tmp_path):
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    assert cli("plan", "--model", tiny_bert_dir, "--method", "svd", "--rank", "8", "--out", plan).returncode == 0
    proc = cli("compress", "--model", tiny_bert_dir, "--plan", plan, "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    proc = cli("eval", "--model", out, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["kind"] == "encoder" and got["ppl"] is None
    assert -1.0 <= got["embedding_similarity"] <= 1.0 + 1e-6


def plan_file(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(fields))
    return path


@pytest.mark.parametrize("args, word", [
    (["--method", "saten", "--rank", "0"], "0"),
    (["--method", "tt", "--rank", "1000"], "1000"),
    (["--method", "prune", "--density", "1.5"], "1.5"),
    (["--method", "prune", "--density", "-0.1"], "-0.1"),
    (["--method", "saten", "--eps", "2"], "2"),
    (["--method", "svd", "--target-ratio", "1.5"], "1.5"),
    (["--method", "zap", "--rank", "2"], "zap"),
    (["--method", "saten"], "--target-ratio"),
    (["--method", "saten", "--rank", "2", "--heal-core-lr-scale", "-1"], "-1"),
    (["--method", "saten", "--rank", "2", "--heal-lr", "0"], "0"),
])
def test_plan_bad_numbers(tiny_llama_dir, tmp_path, args, word):
    out = tmp_path / "plan.json"
    assert_bad_input(cli("plan", "--model", tiny_llama_dir, *args, "--out", out), word)
    assert not out.exists()


def test_plan_heal_core_lr_scale_lands_in_the_plan(tiny_llama_dir, tmp_path):
    out = tmp_path / "plan.json"
    proc = cli("plan", "--model", tiny_llama_dir, "--method", "saten", "--rank", "2", "--density", "0.1",
               "--heal-steps", "4", "--heal-core-lr-scale", "0", "--out", out)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert (plan["heal_steps"], plan["heal_core_lr_scale"]) == (4, 0.0)


def test_plan_unknown_model(tmp_path):
    assert_bad_input(cli("plan", "--model", "no-such-model-xyz", "--method", "svd", "--rank", "2",
                         "--out", tmp_path / "p.json"), "no-such-model-xyz")


def test_plan_2_4_on_odd_width(odd_llama_dir, tmp_path):
    assert_bad_input(cli("plan", "--model", odd_llama_dir, "--method", "prune", "--structure", "2:4",
                         "--out", tmp_path / "p.json"), "130")


def test_allocate(tiny_llama_dir, tmp_path):
    out = tmp_path / "p.json"
    args = ["plan", "--model", tiny_llama_dir, "--method", "saten", "--target-ratio", "0.6", "--allocate",
            "--out", out, "--json"]
    if importlib.util.find_spec("saten_core.allocate") is None:
        assert_bad_input(cli(*args), "--allocate is not available yet")
        return
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    tot = json.loads(proc.stdout)["totals"]
    assert tot["layers_changed"] == 14 and tot["predicted_bytes"] <= 0.6 * tot["bytes_before"]
    assert len(json.loads(out.read_text())["overrides"]) == 14
    assert_bad_input(cli("plan", "--model", tiny_llama_dir, "--method", "svd", "--rank", "2", "--allocate",
                         "--out", out), "--target-ratio")


def _whole_model_bytes(model_dir: Path, plan_file: Path) -> tuple[int, int, int]:
    """(dense model bytes, the plan's predicted whole-model bytes, largest block linear's bytes)."""
    from saten_core.models import linear_layers, load_model, parameter_bytes
    from saten_core.plan import Plan, dry_run, dry_run_totals

    model = load_model(str(model_dir)).model
    tot = dry_run_totals(dry_run(model, Plan.from_json(plan_file.read_text())))
    largest = max(lin.weight.numel() * lin.weight.element_size() for _, lin in linear_layers(model))
    dense = parameter_bytes(model)
    return dense, dense - tot["bytes_before"] + tot["predicted_bytes"], largest


@pytest.mark.parametrize("allocate", [True, False])
def test_plan_target_bytes_fits_the_whole_model(tiny_llama_dir, tmp_path, allocate):
    from saten_core.models import linear_layers, load_model, parameter_bytes

    model = load_model(str(tiny_llama_dir)).model  # mostly embeddings: aim at 70% of its block linears
    linear = sum(lin.weight.numel() * lin.weight.element_size() for _, lin in linear_layers(model))
    target = parameter_bytes(model) - linear + int(0.7 * linear)
    out = tmp_path / "p.json"
    proc = cli("plan", "--model", tiny_llama_dir, "--method", "saten", "--target-bytes", target, "--dtype", "float32",
               *(["--allocate"] if allocate else []), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"target of {target:,} B" in proc.stderr
    dense, whole, largest = _whole_model_bytes(tiny_llama_dir, out)
    assert whole <= target < dense
    assert target - whole <= largest  # met within one layer's granularity, never above


@pytest.mark.parametrize("value, word", [("10", "10"), ("12XB", "12XB"), ("1TiB", "1TiB"), ("0", "0")])
def test_plan_target_bytes_bad_values(tiny_llama_dir, tmp_path, value, word):
    out = tmp_path / "p.json"
    assert_bad_input(cli("plan", "--model", tiny_llama_dir, "--method", "saten", "--target-bytes", value,
                         "--allocate", "--out", out), word)
    assert not out.exists()


def test_plan_allocate_on_whitened_spectra(tiny_llama_dir, tmp_path):
    """The opt-in activation-aware allocation: calibration text -> W L spectra -> a plan within budget."""
    out, text = tmp_path / "p.json", tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
    proc = cli("plan", "--model", tiny_llama_dir, "--method", "saten-aw", "--target-ratio", "0.6", "--allocate",
               "--allocate-spectra", "whitened", "--calib", text, "--calib-tokens", "512", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    tot = json.loads(proc.stdout)["totals"]
    assert tot["layers_changed"] == 14 and tot["predicted_bytes"] <= 0.6 * tot["bytes_before"]
    assert_bad_input(cli("plan", "--model", tiny_llama_dir, "--method", "saten", "--target-ratio", "0.6",
                         "--allocate", "--allocate-spectra", "whitened", "--out", out), "saten")


def test_byte_sizes_parse_units():
    from saten_core.__main__ import byte_size

    assert byte_size("400MiB") == 400 * 2**20 and byte_size("0.4GB") == 400_000_000
    assert byte_size("419430400") == 419430400 and byte_size("2e6") == 2_000_000


def test_compress_bad_inputs_leave_no_dir(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_bad_input(cli("compress", "--model", tiny_llama_dir, "--plan", tmp_path / "missing.json", "--out", out),
                     "missing.json")
    assert_no_dir(out)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    assert_bad_input(cli("compress", "--model", tiny_llama_dir, "--plan", corrupt, "--out", out), "corrupt.json")
    assert_no_dir(out)
    assert_bad_input(cli("compress", "--model", tiny_llama_dir, "--plan", plan_file(tmp_path, rank=999),
                         "--out", out), "999")
    assert_no_dir(out)
    assert_bad_input(cli("compress", "--model", "nope-model", "--plan", plan_file(tmp_path, rank=2),
                         "--out", out), "nope-model")
    assert_no_dir(out)


def test_compress_refuses_non_empty_out(tiny_llama_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(cli("compress", "--model", tiny_llama_dir, "--plan", plan_file(tmp_path, rank=2),
                         "--out", out), "taken")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_eval_bad_inputs(tiny_llama_dir, tmp_path):
    assert_bad_input(cli("eval", "--model", tiny_llama_dir, "--tokens", "5000000", "--json"), "5000000")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    assert_bad_input(cli("eval", "--model", tiny_llama_dir, "--text", latin, "--json"), "latin1.txt")
    assert_bad_input(cli("eval", "--model", tmp_path / "nothing-here", "--json"), "nothing-here")
    assert_bad_input(cli("eval", "--model", tiny_llama_dir, "--tokens", "0"), "0")


@pytest.mark.slow
def test_smollm_end_to_end(tmp_path):
    """plan (--target-ratio 0.8 saten) -> compress -> eval --json on the embedded SmolLM2-135M."""
    plan, out = tmp_path / "plan.json", tmp_path / "s80"
    proc = cli("plan", "--model", "smollm2-135m", "--method", "saten", "--target-ratio", "0.8", "--out", plan)
    assert proc.returncode == 0, proc.stderr
    proc = cli("compress", "--model", "smollm2-135m", "--plan", plan, "--out", out, "--device", "cpu",
               timeout=1800)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 210 and report["totals"]["bytes_after"] <= 0.8 * report["totals"]["bytes_before"]
    proc = cli("eval", "--model", out, "--device", "cpu", "--json", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert math.isfinite(got["ppl"]) and got["kl"] >= 0 and 0 <= got["top1_agreement"] <= 1
