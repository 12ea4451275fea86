"""Decoder architectures beyond Llama (issue 18: Qwen2/3, Mistral, Gemma 2 at least): each tiny model, built from
its config and saved as a bf16 folder, is read lazily, walked block by block with the statistics all-at-once
calibration sees, and planned / compressed block by block / evaluated through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_walk_sees_all_at_once_stats, minilm_tokenizer_dir

from saten_core.lazy import StoredLinears, skeleton
from saten_core.models import block_linears, load_model

SHAPE = {"vocab_size": 30522, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _config(kind: str):
    from transformers import Gemma2Config, MistralConfig, Qwen2Config, Qwen3Config

    if kind == "qwen2":
        return Qwen2Config(**SHAPE, tie_word_embeddings=True)
    if kind == "qwen3":
        return Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=True)
    if kind == "mistral":
        return MistralConfig(**SHAPE, sliding_window=32, tie_word_embeddings=False)
    return Gemma2Config(**SHAPE, head_dim=16, sliding_window=32)


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral", "gemma2"])
def arch_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(request.param)).eval().to(torch.bfloat16)
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model.save_pretrained(path, max_shard_size="200KB")  # sharded, with an index, as real checkpoints ship
    AutoTokenizer.from_pretrained(minilm_tokenizer_dir()).save_pretrained(path)
    return path


def test_lazy_reads_equal_the_loaded_model(arch_dir):
    full = dict(block_linears(load_model(str(arch_dir), dtype=torch.bfloat16).model))
    lazy = skeleton(str(arch_dir), torch.bfloat16)
    assert [n for n, _ in block_linears(lazy.model)] == list(full)
    assert len(full) == 2 * 7
    for name, lin in StoredLinears(arch_dir, list(full), torch.bfloat16):
        assert torch.equal(lin.weight, full[name].weight)


def test_walk_sees_what_all_at_once_calibration_sees(arch_dir):
    assert_walk_sees_all_at_once_stats(load_model(str(arch_dir)))


def test_cli_plan_compress_sequential_and_eval(arch_dir, tmp_path):
    from saten_core.__main__ import main

    plan, out = tmp_path / "plan.json", tmp_path / "compressed"
    assert main(["plan", "--model", str(arch_dir), "--method", "saten-aw", "--target-ratio", "0.5", "--allocate",
                 "--sequential", "--calib-tokens", "256", "--out", str(plan)]) == 0
    assert main(["compress", "--model", str(arch_dir), "--plan", str(plan), "--out", str(out), "--device",
                 "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["dtype"] == "bfloat16" and len(report["layers"]) == 14
    assert report["calibration"]["order"] == "sequential"
    assert main(["eval", "--model", str(out), "--json", "--device", "cpu", "--tokens", "256"]) == 0
