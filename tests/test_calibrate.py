"""Run: .venv/bin/python -m pytest -q tests/test_calibrate.py"""

import pytest
import torch
from torch import nn

from saten_core.calibrate import InputStats, collect_input_stats, token_windows, whitening_factor


class _Tok:
    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[ord(c) % 50 for c in text]])}


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 8)

    def forward(self, input_ids):
        return self.b(torch.relu(self.a(self.emb(input_ids))))


def test_second_moment_matches_explicit_inputs():
    torch.manual_seed(0)
    m = _Tiny()
    text = "the quick brown fox jumps over the lazy dog " * 3
    stats = collect_input_stats(m, _Tok(), text, [("a", m.a), ("b", m.b)], tokens=100, seq_len=32)
    ids = _Tok()(text)["input_ids"][0, :100]
    x = m.emb(ids).detach().double()
    assert stats["a"].tokens == 100
    torch.testing.assert_close(stats["a"].xtx, x.T @ x, rtol=1e-5, atol=1e-5)  # float32 per-window products
    assert stats["b"].xtx.shape == (12, 12)
    torch.testing.assert_close(stats["a"].column_norms, x.norm(dim=0))


def test_whitening_factor_reproduces_covariance_and_handles_rank_deficiency():
    x = torch.randn(500, 6, dtype=torch.float64)
    x[:, 5] = 0  # a dead input direction
    s = InputStats(x.T @ x, 500)
    low = whitening_factor(s)
    c = s.second_moment()
    assert torch.allclose(low @ low.T, c + 1e-2 * c.diagonal().mean() * torch.eye(6), atol=1e-10)
    assert torch.all(low.diagonal() > 0)


@pytest.mark.parametrize("text,tokens", [("", 10), ("short", 100)])
def test_too_short_or_empty_text_is_a_clear_error(text, tokens):
    with pytest.raises(ValueError, match="fewer than"):
        token_windows(_Tok(), text, tokens, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(_Tok(), "abc", 2, 0)
    with pytest.raises(ValueError, match="damp"):
        whitening_factor(InputStats(torch.eye(3, dtype=torch.float64), 1), damp=-1)


class _Shared(nn.Module):
    """Two layers fed the very same tensor (like q/k/v) and one fed another: the first two share stats."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.o(self.q(h) + self.k(h))


def test_layers_fed_the_same_tensor_share_one_entry():
    torch.manual_seed(0)
    m = _Shared()
    text = "the quick brown fox jumps over the lazy dog " * 3
    stats = collect_input_stats(m, _Tok(), text, [("q", m.q), ("k", m.k), ("o", m.o)], tokens=100, seq_len=32)
    x = m.emb(_Tok()(text)["input_ids"][0, :100]).detach().double()
    assert stats["q"] is stats["k"] and stats["q"] is not stats["o"]
    assert stats["k"].tokens == 100 and stats["o"].tokens == 100
    torch.testing.assert_close(stats["k"].xtx, x.T @ x, rtol=1e-5, atol=1e-5)


def test_whitening_factor_retries_with_more_damping_from_a_fresh_moment():
    """A first damping too small for an indefinite moment fails; the retry starts from the moment again (the
    in-place factorisation overwrote it) with ten times the ridge, and the stats are left untouched."""
    xtx = torch.diag(torch.tensor([1.0, 1.0, -0.02], dtype=torch.float64))
    stats = InputStats(xtx.clone(), 1)
    low = whitening_factor(stats)  # ridge 0.01 * mean diag: fails once, then 10x
    ridge = 0.01 * float(xtx.diagonal().mean()) * 10
    torch.testing.assert_close(low @ low.T, xtx + ridge * torch.eye(3, dtype=torch.float64))
    assert torch.equal(stats.xtx, xtx)


def test_damped_factor_is_the_cholesky_of_the_damped_moment_in_its_storage():
    """The in-place factor equals an out-of-place Cholesky (to rounding: LAPACK may block a transposed view
    differently on another CPU), and the ridge it reports is the one used."""
    from saten_core.calibrate import damped_factor

    x = torch.randn(300, 40, dtype=torch.float64)
    s = InputStats(x.T @ x, 300)
    low, ridge = damped_factor(s)
    c = s.second_moment()
    assert ridge == pytest.approx(1e-2 * float(c.diagonal().mean()), rel=1e-12)
    want = torch.linalg.cholesky(c + ridge * torch.eye(40, dtype=torch.float64))
    torch.testing.assert_close(low, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(s.xtx, x.T @ x)  # the statistics themselves are untouched


def test_gram_slabs_sum_to_the_whole_product(monkeypatch):
    """accumulate_gram in slabs of a few rows equals one x^T x (what the hook accumulated before the slabs)."""
    import saten_core.calibrate as cal

    x = torch.randn(50, 37)
    whole = torch.zeros(37, 37, dtype=torch.float64)
    whole.add_(x.T @ x)
    monkeypatch.setattr(cal, "GRAM_CHUNK", 37 * 5)  # 5 rows per slab, the last one short
    slabs = torch.zeros(37, 37, dtype=torch.float64)
    cal.accumulate_gram(slabs, x)
    torch.testing.assert_close(slabs, whole, rtol=1e-5, atol=1e-4)  # float32 products: GEMM blocking differs by CPU
    cal.accumulate_gram(slabs, x)  # accumulates, never overwrites
    torch.testing.assert_close(slabs, 2 * whole, rtol=1e-5, atol=1e-4)
