"""Compressed DIRs: save -> load is identical without the original, bytes match the file, dense export, pipeline.

Run: .venv/bin/python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from saten_core.checkpoint import (
    WEIGHTS,
    export_dense,
    is_compressed_dir,
    load_any,
    load_compressed,
    save_compressed,
)
from saten_core.compress import compress_
from saten_core.layer import SatenLinear
from saten_core.models import load_model
from saten_core.pipeline import compress_to_dir, held_out_text, text_fingerprint
from saten_core.plan import Override, Plan


def fp32_plan(**fields) -> Plan:
    """These tests compress fp32 models in memory and check bytes as stored, so their plans count at fp32."""
    return Plan(dtype="float32", **fields)

PLANS = [
    fp32_plan(method="saten", target_ratio=0.7),
    fp32_plan(method="saten", structure="2:4", target_ratio=0.95, overrides=[Override("*o_proj", skip=True)]),
    fp32_plan(method="prune", density=0.2),
    fp32_plan(method="tt", eps=0.4),
]


def serialised_bytes(path: Path) -> dict[str, int]:
    """Bytes each tensor occupies in a safetensors file, read from its header (data_offsets)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def logits(loaded, ids):
    with torch.no_grad():
        out = loaded.model(input_ids=ids)
    return out.logits if loaded.kind == "decoder" else out.last_hidden_state


def compressed_copy(src: Path, tmp_path: Path, plan: Plan):
    """Compress a private copy of a model folder, save it, then delete the copy (the original is gone)."""
    copy = tmp_path / "original"
    shutil.copytree(src, copy)
    loaded = load_model(str(copy))
    report = compress_(loaded.model, plan)
    written = save_compressed(loaded, plan, report, tmp_path / "dir")
    shutil.rmtree(copy)
    return loaded, written, tmp_path / "dir"


@pytest.mark.parametrize("plan", PLANS, ids=range(len(PLANS)))
def test_save_load_identical_without_original(tiny_llama_dir, tmp_path, plan):
    loaded, report, out = compressed_copy(tiny_llama_dir, tmp_path, plan)
    ids = torch.randint(0, 1000, (2, 10))
    again = load_compressed(out)
    assert torch.equal(logits(loaded, ids), logits(again, ids))
    assert again.kind == "decoder" and is_compressed_dir(out)
    assert Plan.from_json((out / "plan.json").read_text()) == plan
    assert {"config.json", "tokenizer.json", "plan.json", "report.json", WEIGHTS} <= {p.name for p in out.iterdir()}
    assert report == json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("plan", PLANS[:3], ids=range(3))
def test_report_bytes_equal_serialised_bytes(tiny_llama_dir, tmp_path, plan):
    _, report, out = compressed_copy(tiny_llama_dir, tmp_path, plan)
    on_disk = serialised_bytes(out / WEIGHTS)
    for layer in report["layers"]:
        prefix = layer["name"] + "."
        stored = sum(b for k, b in on_disk.items() if k.startswith(prefix) and not k.endswith(".bias"))
        bias = sum(b for k, b in on_disk.items() if k == prefix + "bias")
        assert stored + bias == layer["bytes_after"], layer["name"]
    t = report["totals"]
    assert t["bytes_after"] == sum(x["bytes_after"] for x in report["layers"]) < t["bytes_before"]
    assert t["file_bytes"] == (out / WEIGHTS).stat().st_size and t["seconds"] > 0
    assert set(report["layouts"]) == {x["name"] for x in report["layers"]}


def test_export_dense_loads_with_from_pretrained(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    loaded, _, out = compressed_copy(tiny_llama_dir, tmp_path, PLANS[0])
    dense_dir = export_dense(out, tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense_dir, use_safetensors=True).eval()
    assert not any(isinstance(m, SatenLinear) for m in model.modules())
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, logits(loaded, ids), atol=1e-4, rtol=1e-4)


def test_failed_save_leaves_no_dir(tiny_llama_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_llama_dir))
    report = compress_(loaded.model, fp32_plan(method="svd", rank=4))

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(loaded, fp32_plan(method="svd", rank=4), report, tmp_path / "dir")
    assert list(tmp_path.iterdir()) == []


def test_load_any_dispatches(tiny_llama_dir, tmp_path):
    _, _, out = compressed_copy(tiny_llama_dir, tmp_path, fp32_plan(method="svd", rank=4))
    assert any(isinstance(m, SatenLinear) for m in load_any(str(out)).model.modules())
    assert not any(isinstance(m, SatenLinear) for m in load_any(str(tiny_llama_dir)).model.modules())
    with pytest.raises(ValueError, match="not a compressed"):
        load_compressed(tiny_llama_dir)


def test_encoder_round_trip_counts_biases(tiny_bert_dir, tmp_path):
    plan = fp32_plan(method="saten", target_ratio=0.6)
    loaded, report, out = compressed_copy(tiny_bert_dir, tmp_path, plan)
    ids = torch.randint(0, 1000, (2, 9))
    again = load_compressed(out)
    assert again.kind == "encoder" and torch.equal(logits(loaded, ids), logits(again, ids))
    on_disk = serialised_bytes(out / WEIGHTS)
    for layer in report["layers"]:
        assert on_disk[layer["name"] + ".bias"] > 0
        assert sum(b for k, b in on_disk.items() if k.startswith(layer["name"] + ".")) == layer["bytes_after"]


def test_compress_to_dir_with_evaluation(tiny_llama_dir, tmp_path):
    stages = []
    report = compress_to_dir(str(tiny_llama_dir), fp32_plan(method="saten", target_ratio=0.8), tmp_path / "dir",
                             device="cpu", progress=lambda s, f, m: stages.append(s), evaluate=True, tokens=256)
    ev = report["eval"]
    assert ev["tokens"] == 256 and ev["ppl"] > 1 and ev["ppl_original"] > 1
    assert ev["kl"] >= 0 and 0 <= ev["top1_agreement"] <= 1 and ev["latency"]
    assert ev["text_sha256"] == text_fingerprint(held_out_text(None)) != text_fingerprint("other text")
    assert {"load", "compress", "evaluate", "save"} <= set(stages)
    assert json.loads((tmp_path / "dir" / "report.json").read_text())["eval"]["kl"] == ev["kl"]
    with pytest.raises(ValueError, match="not empty"):
        compress_to_dir(str(tiny_llama_dir), fp32_plan(method="svd", rank=2), tmp_path / "dir", device="cpu")


def test_evaluate_ref_names_a_missing_original(tiny_llama_dir, tmp_path):
    from saten_core.pipeline import evaluate_ref

    _, report, out = compressed_copy(tiny_llama_dir, tmp_path, fp32_plan(method="svd", rank=4))
    assert Path(report["source_ref"]).is_absolute()
    with pytest.raises(ValueError, match="original model .* cannot be loaded"):
        evaluate_ref(str(out), tokens=128, device="cpu")
