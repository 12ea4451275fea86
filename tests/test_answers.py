"""Side-by-side greedy answers of the original and a compressed run (tiny Llama, a few tokens).

Run: .venv/bin/python -m pytest -q tests/test_answers.py
"""

from __future__ import annotations

import pytest

from saten_core.answers import compare_answers, greedy_answer
from saten_core.checkpoint import load_compressed
from saten_core.models import load_model
from saten_core.pipeline import compress_to_dir
from saten_core.plan import Override, Plan


@pytest.fixture(scope="module")
def run_dirs(tiny_llama_dir, tmp_path_factory):
    """Two compressed copies: one that changes nothing measurable (exact rank), one that is heavily cut."""
    root = tmp_path_factory.mktemp("answers")
    narrow = [Override(pattern=p, rank=32) for p in ("*k_proj", "*v_proj")]  # 32 x 64: full rank is 32
    exact = Plan(method="svd", rank=64, overrides=narrow)
    compress_to_dir(str(tiny_llama_dir), exact, root / "exact")
    compress_to_dir(str(tiny_llama_dir), Plan(method="svd", rank=1), root / "cut")
    return {"exact": root / "exact", "cut": root / "cut"}


def test_greedy_answer_is_deterministic_and_counts_new_tokens(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    a = greedy_answer(lm, "the quick brown fox", max_new_tokens=5)
    b = greedy_answer(lm, "the quick brown fox", max_new_tokens=5)
    assert a["text"] == b["text"] and a["tokens"] == 5 and a["seconds"] > 0
    assert "the quick brown fox" not in a["text"]  # the continuation only, not the prompt again


def test_compare_answers_runs_the_original_and_the_compressed_model(run_dirs, tiny_llama_dir):
    same = compare_answers(run_dirs["exact"], "the quick brown fox", max_new_tokens=6)
    assert same["same"] and same["original"]["text"] == same["compressed"]["text"]  # full rank: nothing lost
    cut = compare_answers(run_dirs["cut"], "the quick brown fox", max_new_tokens=6)
    # a random tiny model's greedy text is dominated by its (uncompressed) embeddings, so check the wiring:
    # each column is exactly what that model writes on its own
    assert cut["original"] == {**greedy_answer(load_model(str(tiny_llama_dir)), "the quick brown fox",
                                               max_new_tokens=6), "seconds": cut["original"]["seconds"]}
    alone = greedy_answer(load_compressed(run_dirs["cut"]), "the quick brown fox", max_new_tokens=6)
    assert cut["compressed"]["text"] == alone["text"] and cut["compressed"]["tokens"] == 6
    assert cut["same"] == (cut["original"]["text"] == cut["compressed"]["text"])


@pytest.mark.parametrize(("prompt", "tokens", "message"), [("   ", 4, "prompt is empty"),
                                                          ("hello", 0, "max_new_tokens must be >= 1")])
def test_bad_input_names_the_value(tiny_llama_dir, prompt, tokens, message):
    lm = load_model(str(tiny_llama_dir))
    with pytest.raises(ValueError, match=message):
        greedy_answer(lm, prompt, max_new_tokens=tokens)


def test_encoders_do_not_answer(tiny_bert_dir):
    with pytest.raises(ValueError, match="embeds text"):
        greedy_answer(load_model(str(tiny_bert_dir)), "hello there", max_new_tokens=3)
