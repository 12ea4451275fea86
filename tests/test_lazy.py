"""Lazily read models (saten_core.lazy): the meta skeleton and per-layer reads equal the loaded model, and the
streamed spectrum shares the loaded model's cache entry."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from saten_core.lazy import StoredLinears, folder_key, read_linear, skeleton
from saten_core.models import block_linears, layer_table, load_model
from saten_core.plan import Plan, dry_run


@pytest.fixture(scope="module")
def sharded_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama_dir re-saved in bf16 over several shards with an index (how 1B+ checkpoints ship)."""
    lm = load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("sharded_llama")
    lm.model.save_pretrained(out, max_shard_size="100KB")
    lm.tokenizer.save_pretrained(out)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir", "sharded_llama_dir"])
def test_skeleton_has_the_loaded_models_layers_and_no_weights(fixture, request):
    folder = str(request.getfixturevalue(fixture))
    lazy, full = skeleton(folder, torch.bfloat16), load_model(folder, dtype=torch.bfloat16)
    assert {p.device.type for p in lazy.model.parameters()} == {"meta"}
    assert layer_table(lazy.model) == layer_table(full.model)
    plan = Plan(method="saten", target_ratio=0.5)
    assert dry_run(lazy.model, plan) == dry_run(full.model, plan)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_bert_dir", "sharded_llama_dir"])
def test_read_linear_equals_the_loaded_layer(fixture, request):
    folder = request.getfixturevalue(fixture)
    full = dict(block_linears(load_model(str(folder), dtype=torch.bfloat16).model))
    stored = StoredLinears(folder, list(full), torch.bfloat16)
    assert len(stored) == len(full)
    for name, lin in stored:
        assert torch.equal(lin.weight, full[name].weight)
        assert (lin.bias is None) == (full[name].bias is None)
        if lin.bias is not None:
            assert torch.equal(lin.bias, full[name].bias)


def test_a_missing_layer_is_named(tiny_llama_dir):
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        read_linear(tiny_llama_dir, "model.layers.9.mlp.up_proj")
    with pytest.raises(ValueError, match="nope.weight"):
        StoredLinears(tiny_llama_dir, ["nope"], torch.bfloat16)


def test_stored_spectra_match_the_loaded_models_and_are_found_by_folder(sharded_llama_dir):
    from saten_core.spectrum import cached_for_source, model_spectra, stored_spectra

    key = folder_key(sharded_llama_dir, torch.bfloat16)
    assert cached_for_source(key) is None
    streamed = stored_spectra(str(sharded_llama_dir), device="cpu", use_cache=False)
    loaded = model_spectra(load_model(str(sharded_llama_dir), dtype=torch.bfloat16).model, device="cpu",
                           use_cache=False)
    assert streamed["fingerprint"] == loaded["fingerprint"]
    for a, b in zip(streamed["layers"], loaded["layers"], strict=True):
        assert a["name"] == b["name"]
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-6, abs=1e-7)
        for u, v in zip(a["tt_unfoldings"], b["tt_unfoldings"], strict=True):
            assert u == pytest.approx(v, rel=1e-6, abs=1e-7)
    found = cached_for_source(key)
    assert found is not None and found["fingerprint"] == streamed["fingerprint"] and found["cached"]
    assert stored_spectra(str(sharded_llama_dir), device="cpu")["cached"]


def test_folder_key_changes_with_the_files_and_dtype(tiny_llama_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    key = folder_key(copy, torch.bfloat16)
    assert folder_key(copy, torch.float32) != key
    weights = next(copy.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert folder_key(copy, torch.bfloat16) != key


def test_cli_plan_allocate_reads_the_folder_lazily_and_matches_the_loaded_allocation(tiny_llama_dir, tmp_path):
    from saten_core.__main__ import main
    from saten_core.allocate import allocate_plan

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_llama_dir), "--method", "saten", "--target-ratio", "0.5",
                 "--allocate", "--out", str(out)]) == 0
    want = allocate_plan(load_model(str(tiny_llama_dir), dtype=torch.bfloat16), Plan(method="saten",
                                                                                       target_ratio=0.5))
    assert Plan.from_json(out.read_text()).overrides == want.overrides



def test_release_mapped_drops_only_checkpoint_pages_and_the_values_survive(sharded_llama_dir):
    from saten_core.lazy.pages import byte_ranges, release_mapped

    model = load_model(str(sharded_llama_dir), dtype=torch.bfloat16).model  # bf16 at bf16: mapped pages
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert release_mapped(byte_ranges(model.parameters())) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # faulted in again from the file
    ordinary = torch.randn(100_000)
    copy = ordinary.clone()
    assert release_mapped(byte_ranges([ordinary])) == 0 and torch.equal(ordinary, copy)


def test_blockwise_compression_is_the_same_with_and_without_releasing_pages(sharded_llama_dir, monkeypatch):
    import saten_core.blocks.walk as walk_module
    from saten_core.blocks.walk import compress_blockwise
    from saten_core.build import calibration_text
    from saten_core.calibrate import token_windows

    def compressed(release: bool) -> dict:
        if not release:
            monkeypatch.setattr(walk_module, "release_mapped", lambda ranges: 0)
        lm = load_model(str(sharded_llama_dir), dtype=torch.bfloat16)
        plan = Plan(method="saten-aw", target_ratio=0.5, sequential=True)
        windows = token_windows(lm.tokenizer, calibration_text(plan), 256, 64)
        compress_blockwise(lm.model, plan, windows, True)
        return {k: v.clone() for k, v in lm.model.state_dict().items()}

    released, kept = compressed(True), compressed(False)
    assert released.keys() == kept.keys() and all(torch.equal(released[k], kept[k]) for k in kept)
