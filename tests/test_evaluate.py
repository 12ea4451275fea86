"""Perplexity, agreement, embedding similarity, latency, memory and file size on tiny models.

Run: .venv/bin/python -m pytest -q tests/test_evaluate.py         (add -m "not slow" for the fast loop)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from saten_core import evaluate
from saten_core.corpus import default_text, split_text
from saten_core.models import load_model


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir: Path):
    return load_model(str(tiny_bert_dir))


@pytest.fixture(scope="module")
def held_out() -> str:
    return split_text(default_text())[1]


def test_perplexity_finite_positive_and_matches_manual(tiny_llama, held_out: str):
    ppl = evaluate.perplexity(tiny_llama.model, tiny_llama.tokenizer, held_out, tokens=96, seq_len=32)
    assert math.isfinite(ppl) and ppl > 1
    # the same number by hand: three windows of 32, each predicting 31 tokens
    ids = tiny_llama.tokenizer(held_out[:5000], add_special_tokens=False)["input_ids"][:96]
    nll = 0.0
    with torch.no_grad():
        for s in range(0, 96, 32):
            w = torch.tensor([ids[s:s + 32]])
            nll += torch.nn.functional.cross_entropy(tiny_llama.model(w).logits[0, :-1], w[0, 1:], reduction="sum")
    assert ppl == pytest.approx(math.exp(nll / 93), rel=1e-4)


def test_random_tiny_model_is_near_uniform(tiny_llama, held_out: str):
    # an untrained model knows nothing: its perplexity is close to the vocabulary size, far above a trained one
    ppl = evaluate.perplexity(tiny_llama.model, tiny_llama.tokenizer, held_out, tokens=64, seq_len=32)
    vocab = tiny_llama.model.config.vocab_size
    assert 0.5 * vocab < ppl < 2 * vocab


def test_too_short_text_names_both_numbers(tiny_llama):
    with pytest.raises(ValueError, match=r"text has \d+ tokens, fewer than the 2048"):
        evaluate.perplexity(tiny_llama.model, tiny_llama.tokenizer, "just a few words here", tokens=2048)


@pytest.mark.parametrize("seq_len", [0, 1])
def test_bad_seq_len(tiny_llama, held_out: str, seq_len: int):
    with pytest.raises(ValueError, match=f"got {seq_len}"):
        evaluate.perplexity(tiny_llama.model, tiny_llama.tokenizer, held_out, tokens=64, seq_len=seq_len)


def test_agreement_with_itself(tiny_llama, held_out: str):
    out = evaluate.agreement(tiny_llama.model, tiny_llama.model, tiny_llama.tokenizer, held_out,
                             tokens=64, seq_len=32)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["top1_agreement"] == 1.0
    assert out["tokens"] == 64


def test_agreement_detects_a_changed_model(tiny_llama_dir: Path, tiny_llama, held_out: str):
    other = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        for p in other.model.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    out = evaluate.agreement(tiny_llama.model, other.model, tiny_llama.tokenizer, held_out, tokens=64, seq_len=32)
    assert out["kl"] > 1e-3
    assert out["top1_agreement"] < 1.0


def test_embedding_similarity(tiny_bert_dir: Path, tiny_bert):
    sentences = ["the cat sat on the mat", "a short one", "tensor trains compress weight matrices well"]
    assert evaluate.embedding_similarity(tiny_bert.model, tiny_bert.model, tiny_bert.tokenizer,
                                         sentences) == pytest.approx(1.0, abs=1e-5)
    other = load_model(str(tiny_bert_dir))
    with torch.no_grad():
        for p in other.model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert evaluate.embedding_similarity(tiny_bert.model, other.model, tiny_bert.tokenizer, sentences) < 0.999


def test_embedding_similarity_rejects_empty(tiny_bert):
    with pytest.raises(ValueError, match="sentences"):
        evaluate.embedding_similarity(tiny_bert.model, tiny_bert.model, tiny_bert.tokenizer, [])


def test_latency_decoder(tiny_llama):
    out = evaluate.latency(tiny_llama.model, tiny_llama.tokenizer, prefill_tokens=16, decode_tokens=4, repeats=2)
    assert out["prefill_ms"] > 0 and out["decode_ms_per_token"] > 0
    assert out["tokens_per_s"] == pytest.approx(1000 / out["decode_ms_per_token"])
    assert out["decode_tokens"] == 4 and out["device"] == "cpu"
    assert out["peak_memory_bytes"] > 0


def test_latency_encoder_has_no_decode(tiny_bert):
    out = evaluate.latency(tiny_bert.model, tiny_bert.tokenizer, prefill_tokens=16, decode_tokens=4, repeats=2)
    assert out["prefill_ms"] > 0 and out["decode_ms_per_token"] is None


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"prefill_tokens": 0}, {"decode_tokens": -1},
                                    {"prefill_tokens": 500, "decode_tokens": 100}])
def test_latency_bad_args(tiny_llama, kwargs: dict):
    with pytest.raises(ValueError, match=str(list(kwargs.values())[-1]) if len(kwargs) == 1 else "600"):
        evaluate.latency(tiny_llama.model, tiny_llama.tokenizer, **kwargs)


def test_file_size(tmp_path: Path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 7)
    assert evaluate.file_size(tmp_path / "a.bin") == 10
    assert evaluate.file_size(tmp_path) == 17
    with pytest.raises(FileNotFoundError):
        evaluate.file_size(tmp_path / "missing")


@pytest.mark.slow
def test_smollm2_held_out_perplexity(held_out: str):
    lm = load_model("smollm2-135m")
    ppl = evaluate.perplexity(lm.model, lm.tokenizer, held_out, tokens=2048, seq_len=512)
    assert math.isfinite(ppl) and 1 < ppl < 40


@pytest.mark.slow
def test_minilm_embeds(held_out: str):
    lm = load_model("minilm-l6")
    sentences = [ln for ln in held_out.splitlines() if len(ln.split()) >= 4][:16]
    assert evaluate.embedding_similarity(lm.model, lm.model, lm.tokenizer, sentences) == pytest.approx(1.0, abs=1e-5)
    batch = lm.tokenizer(sentences[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = evaluate._mean_pooled(lm.model, dict(batch))
    assert emb.shape == (2, 384) and torch.isfinite(emb).all()
