"""Block-sequential calibration and compression (saten_core/blocks/walk.py).

Run: .venv/bin/python -m pytest -q tests/test_blocks.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from saten_core.blocks.walk import compress_blockwise, transformer_blocks, walk
from saten_core.build import calibration_text, compress_loaded
from saten_core.calibrate import collect_input_stats, token_windows
from saten_core.compress import Cancelled, planned_layers
from saten_core.models import linear_layers, load_model
from saten_core.plan import Plan


def _loaded(folder):
    loaded = load_model(str(folder))
    loaded.model.eval()
    return loaded


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir"])
def test_walk_without_changes_sees_what_all_at_once_calibration_sees(fixture, request):
    """Equivalence: when no block changes, block-by-block statistics equal one pass over the whole model."""
    loaded = _loaded(request.getfixturevalue(fixture))
    text = calibration_text(Plan())
    layers = linear_layers(loaded.model)
    want = collect_input_stats(loaded.model, loaded.tokenizer, text, layers, tokens=256, seq_len=64)
    windows = token_windows(loaded.tokenizer, text, 256, 64)
    got: dict = {}
    walk(loaded.model, windows, loaded.kind == "decoder", lambda i, block, stats: got.update(stats),
         {name for name, _ in layers})
    assert set(got) == set(want)
    for name in want:
        assert got[name].tokens == want[name].tokens
        torch.testing.assert_close(got[name].xtx, want[name].xtx, rtol=1e-5, atol=1e-6)


def test_blockwise_compression_uses_the_compressed_blocks_outputs(tiny_llama_dir):
    """Same specs and bytes as all-at-once; block 0 sees the same inputs, later blocks see compressed outputs."""
    plan = Plan(method="saten-aw", target_ratio=0.5, calib_tokens=256, calib_seq_len=64)
    together = _loaded(tiny_llama_dir)
    seq = _loaded(tiny_llama_dir)
    a = compress_loaded(together, plan)["layers"]
    info = compress_loaded(seq, Plan(**{**json.loads(plan.to_json()), "sequential": True, "overrides": []}))
    b = info["layers"]
    assert info["calibration"]["order"] == "sequential"
    assert [r["name"] for r in a] == [r["name"] for r in b] and len(b) == 14
    assert [r["bytes_after"] for r in a] == [r["bytes_after"] for r in b]
    first = [(x, y) for x, y in zip(a, b, strict=True) if ".layers.0." in x["name"]]
    later = [(x, y) for x, y in zip(a, b, strict=True) if ".layers.1." in x["name"]]
    assert all(x["rel_output_error"] == pytest.approx(y["rel_output_error"], rel=1e-4) for x, y in first)
    assert any(x["rel_output_error"] != pytest.approx(y["rel_output_error"], rel=1e-3) for x, y in later)


def test_blockwise_resolves_every_spec_before_changing_a_layer(tiny_llama_dir):
    loaded = _loaded(tiny_llama_dir)
    bad = Plan(method="rtn", bits=4, quant_group=48, sequential=True)  # 48 does not divide the width 64
    windows = token_windows(loaded.tokenizer, calibration_text(bad), 128, 64)
    with pytest.raises(ValueError, match="group 48 does not divide"):
        compress_blockwise(loaded.model, bad, windows, True)
    assert len(planned_layers(loaded.model, Plan(method="saten", rank=2))) == 14  # still all dense


def test_blockwise_cancels_between_layers(tiny_llama_dir):
    loaded = _loaded(tiny_llama_dir)
    plan = Plan(method="wanda", target_ratio=0.5, sequential=True, calib_tokens=128, calib_seq_len=64)
    windows = token_windows(loaded.tokenizer, calibration_text(plan), 128, 64)
    calls = iter(range(100))
    with pytest.raises(Cancelled, match="cancelled after 3 of 14 layers"):
        compress_blockwise(loaded.model, plan, windows, True, should_stop=lambda: next(calls) >= 3)


def test_a_model_without_a_block_list_is_refused_with_one_line():
    with pytest.raises(ValueError, match="model type Sequential: no list of transformer blocks"):
        transformer_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_plan_field_round_trips_and_is_checked():
    plan = Plan(method="saten-aw", target_ratio=0.5, sequential=True)
    assert Plan.from_json(plan.to_json()).sequential is True
    with pytest.raises(ValueError, match="sequential must be true or false, got 'yes'"):
        Plan(sequential="yes").validate()


def test_cli_plan_and_compress_sequential(tiny_llama_dir, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "saten_core", *args], capture_output=True, text=True)

    plan = tmp_path / "p.json"
    res = cli("plan", "--model", str(tiny_llama_dir), "--method", "wanda", "--target-ratio", "0.5", "--sequential",
              "--calib-tokens", "256", "--out", str(plan))
    assert res.returncode == 0, res.stderr
    assert json.loads(plan.read_text())["sequential"] is True
    out = tmp_path / "run"
    res = cli("compress", "--model", str(tiny_llama_dir), "--plan", str(plan), "--out", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "block 2/2" in res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["order"] == "sequential" and len(report["layers"]) == 14


def test_a_16_bit_model_stays_16_bit_but_for_the_block_being_compressed(tiny_llama_dir):
    """Block by block, only the current block is fp32; the result matches a run on the fp32 model."""
    plan = Plan(method="saten-aw", target_ratio=0.5, sequential=True, calib_tokens=256, calib_seq_len=64)
    half = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    full = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    full.model.float()
    seen = []
    a = compress_loaded(half, plan, progress=lambda stage, f, msg: seen.append(
        {p.dtype for p in half.model.parameters()}))["layers"]
    b = compress_loaded(full, plan)["layers"]
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert any(dtypes == {torch.bfloat16, torch.float32} for dtypes in seen)  # one block at work precision
    assert [r["bytes_after"] for r in a] == [r["bytes_after"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["rel_output_error"] == pytest.approx(y["rel_output_error"], rel=0.05, abs=1e-3), x["name"]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir"])
def test_capture_runs_no_later_block_and_no_head(fixture, request):
    """The capture records every block's call from stand-ins: no linear of blocks 1.. runs, the forward stops
    before the head / pooler, and the blocks are restored afterwards."""
    from saten_core.blocks.walk import capture_calls

    loaded = _loaded(request.getfixturevalue(fixture))
    _, blocks = transformer_blocks(loaded.model)
    windows = token_windows(loaded.tokenizer, calibration_text(Plan()), 192, 64)
    ran: list[str] = []
    watched = [m for b in blocks[1:] for m in b.modules() if isinstance(m, nn.Linear)]
    watched += [m for name, m in loaded.model.named_modules() if name.endswith(("lm_head", "pooler"))]
    handles = [m.register_forward_hook(lambda *a: ran.append("x")) for m in watched]
    first, calls = capture_calls(loaded.model, blocks, windows, loaded.kind == "decoder")
    assert ran == []
    assert len(first) == len(windows) and all(len(c) == len(windows) for c in calls)
    assert all("forward" not in vars(b) for b in blocks)  # the stand-ins are gone
    with torch.no_grad():
        loaded.model(input_ids=windows[0].reshape(1, -1))
    for h in handles:
        h.remove()
    assert ran  # the real blocks run again after the capture
