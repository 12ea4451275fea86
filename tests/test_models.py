"""Model registry, safe loading, device resolution and linear-layer listing.

Run: .venv/bin/python -m pytest -q tests/test_models.py            (add -m "not slow" for the fast loop)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from saten_core import models


@pytest.fixture()
def pickle_only_dir(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A copy of the tiny Llama whose weights are a pytorch_model.bin pickle instead of safetensors."""
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    return folder


def test_load_local_llama_folder(tiny_llama_dir: Path):
    lm = models.load_model(str(tiny_llama_dir))
    assert lm.kind == "decoder" and not lm.model.training
    assert lm.source_dir == tiny_llama_dir.resolve()
    names = [n for n, _ in models.linear_layers(lm.model)]
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj"
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_load_local_bert_folder_is_encoder(tiny_bert_dir: Path):
    lm = models.load_model(str(tiny_bert_dir))
    assert lm.kind == "encoder"
    names = [n for n, _ in models.linear_layers(lm.model)]
    assert len(names) == 2 * 6
    assert "encoder.layer.1.attention.output.dense" in names
    assert not any("pooler" in n for n in names)


def test_pickle_checkpoint_refused(pickle_only_dir: Path):
    with pytest.raises(ValueError, match="pickle.*pytorch_model.bin"):
        models.load_model(str(pickle_only_dir))


def test_offline_hub_id_is_one_line_error():
    with pytest.raises(ValueError, match="someone/some-model") as info:
        models.load_model("someone/some-model")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ref", ["no-such-model", "/no/such/folder", "./missing-dir", ""])
def test_bad_names_raise(ref: str):
    with pytest.raises(ValueError, match=repr(ref) if ref else "non-empty"):
        models.load_model(ref)


def test_folder_without_config_raises(tmp_path: Path):
    with pytest.raises(ValueError, match="config.json"):
        models.load_model(str(tmp_path))


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu:0", "cpu:0"])
def test_resolve_device_rejects(device: str):
    with pytest.raises(ValueError, match=repr(device)):
        models.resolve_device(device)


def test_resolve_device_auto():
    assert models.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_device("CPU") == "cpu"


def test_layer_table_counts_bias_and_bytes(tiny_bert_dir: Path):
    lm = models.load_model(str(tiny_bert_dir))
    rows = models.layer_table(lm.model)
    row = next(r for r in rows if r["name"] == "encoder.layer.0.intermediate.dense")
    assert (row["in_features"], row["out_features"]) == (64, 128)
    assert row["params"] == 64 * 128 + 128
    assert row["bytes"] == row["params"] * 4


def test_compressed_layers_still_listed(tiny_llama_dir: Path):
    from saten_core.layer import SatenLinear
    from saten_core.spec import LayerSpec

    lm = models.load_model(str(tiny_llama_dir))
    attn = lm.model.model.layers[0].self_attn
    attn.q_proj = SatenLinear.from_linear(attn.q_proj, LayerSpec(method="saten", rank=4, density=0.1))
    rows = {r["name"]: r for r in models.layer_table(lm.model)}
    assert len(rows) == 14
    q = rows["model.layers.0.self_attn.q_proj"]
    assert q["type"] == "SatenLinear" and (q["in_features"], q["out_features"]) == (64, 64)
    assert q["params"] == attn.q_proj.param_count() < 64 * 64
    assert q["bytes"] == attn.q_proj.stored_bytes()
    assert rows["model.layers.0.self_attn.k_proj"]["type"] == "dense"


def test_list_models_params_are_counted():
    rows = {r["name"]: r for r in models.list_models()}
    assert set(rows) == {"smollm2-135m", "gemma3-270m", "minilm-l6"}
    assert rows["smollm2-135m"]["kind"] == rows["gemma3-270m"]["kind"] == "decoder"
    assert rows["minilm-l6"]["kind"] == "encoder"
    # counted from the architectures, so they land near the published sizes, not on round numbers
    assert 130e6 < rows["smollm2-135m"]["params"] < 140e6
    assert 260e6 < rows["gemma3-270m"]["params"] < 275e6
    assert 20e6 < rows["minilm-l6"]["params"] < 25e6
    assert all(r["source"] and r["description"] for r in rows.values())


def test_interrupted_cache_write_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SATEN_MODEL_CACHE", str(tmp_path))

    def boom(name: str, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_dequantise", boom)
    with pytest.raises(KeyboardInterrupt):
        models.warm_cache()  # the first GGUF model, SmolLM2, is interrupted
    assert not models.smollm_cache_dir().exists()
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_smollm2_loads_from_cache():
    models.warm_cache()
    assert models._cache_complete(models.smollm_cache_dir())
    lm = models.load_model("smollm2-135m")
    assert lm.kind == "decoder" and lm.name == "smollm2-135m"
    layers = models.linear_layers(lm.model)
    assert len(layers) == 210
    block = sum(r["params"] for r in models.layer_table(lm.model))
    assert 100e6 < block < 110e6
    assert lm.tokenizer("def f():").input_ids


@pytest.mark.slow
def test_minilm_loads():
    lm = models.load_model("minilm-l6")
    assert lm.kind == "encoder"
    assert len(models.linear_layers(lm.model)) == 36


def test_warm_cache_is_a_no_op_when_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SATEN_MODEL_CACHE", str(tmp_path))
    for name in ("smollm2-135m", "gemma3-270m"):
        folder = models.cache_dir(name)
        folder.mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (folder / f).write_text("{}")

    def must_not_run(name: str, out_dir: Path) -> None:
        raise AssertionError(f"dequantised {name} although the cache was complete")

    monkeypatch.setattr(models, "_dequantise", must_not_run)
    models.warm_cache()


def test_warm_cache_builds_only_what_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SATEN_MODEL_CACHE", str(tmp_path))
    built = []

    def fake(name: str, out_dir: Path) -> None:
        built.append(name)
        for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out_dir / f).write_text("{}")

    monkeypatch.setattr(models, "_dequantise", fake)
    models.warm_cache("gemma3-270m")
    models.warm_cache()
    assert built == ["gemma3-270m", "smollm2-135m"]  # minilm ships safetensors: nothing to dequantise


def test_config_kind_without_architectures():
    from transformers import BertConfig, LlamaConfig

    assert models.config_kind(LlamaConfig()) == "decoder"
    assert models.config_kind(BertConfig()) == "encoder"
    assert models.config_kind(LlamaConfig(architectures=["LlamaForSequenceClassification"])) == "encoder"


def test_file_instead_of_folder(tiny_llama_dir: Path):
    with pytest.raises(ValueError, match="is a file"):
        models.load_model(str(tiny_llama_dir / "config.json"))
