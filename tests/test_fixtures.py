"""Run: .venv/bin/python -m pytest -q tests/test_fixtures.py"""

import json


def test_tiny_models_are_saved_as_safetensors(tiny_llama_dir, tiny_bert_dir):
    for d in (tiny_llama_dir, tiny_bert_dir):
        assert (d / "model.safetensors").exists()
        assert json.loads((d / "config.json").read_text())["hidden_size"] == 64
