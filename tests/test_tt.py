"""Run: .venv/bin/python -m pytest -q tests/test_tt.py"""

import pytest
import tensorly as tl
import torch

from saten_core.tensorize import tensorize
from saten_core.tt import capped_ranks, tt_factor_pair, tt_param_count, tt_ranks, tt_svd, tt_to_tensor

IN_MODES, OUT_MODES = [12, 8], [16, 12]  # tensorized_shape(96, 192)
MODES = IN_MODES + OUT_MODES


def _weight(seed=0, m=96, n=192, decay=20.0):
    """An (m, n) matrix with a slowly decaying spectrum, like trained weights."""
    g = torch.Generator().manual_seed(seed)
    qa = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
    qb = torch.linalg.qr(torch.randn(n, m, generator=g)).Q
    return (qa * torch.exp(-torch.arange(m) / decay)) @ qb.T


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _tensor(seed=0):
    return tensorize(_weight(seed), IN_MODES, OUT_MODES)


def test_exact_when_uncapped():
    t = _tensor()
    cores = tt_svd(t)
    assert tt_ranks(cores) == capped_ranks(MODES, None) == [1, 12, 96, 12, 1]
    assert _rel(tt_to_tensor(cores), t) < 1e-5


def test_reconstruction_matches_tensorly():
    cores = tt_svd(torch.randn(4, 5, 6, 3), max_rank=3)
    with tl.backend_context("pytorch"):
        ref = tl.tt_to_tensor(cores)
    assert torch.allclose(tt_to_tensor(cores), ref)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.3, 0.6])
def test_eps_bound_honoured(eps):
    t = _tensor(1)
    cores = tt_svd(t, eps=eps)
    assert _rel(tt_to_tensor(cores), t) <= eps * (1 + 1e-5)
    assert tt_ranks(cores)[2] < 96  # it did truncate


def test_eps_with_cap_takes_the_smaller_rank():
    t = _tensor(2)
    assert tt_ranks(tt_svd(t, eps=0.01, max_rank=5))[2] == 5
    assert tt_ranks(tt_svd(t, eps=0.5, max_rank=90))[2] < 90


def test_error_never_grows_with_rank():
    t = _tensor(3)
    errors = [_rel(tt_to_tensor(tt_svd(t, max_rank=r)), t) for r in (1, 2, 4, 8, 16, 32, 64, 96)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-5 < errors[0]


def test_randomized_path_is_near_optimal():
    """At a small cap (randomized SVD) the error is within 1% of the optimal truncated SVD (order 1)."""
    w = _weight(4, 192, 384, decay=60.0)
    cores = tt_svd(w, max_rank=16)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = _rel((u[:, :16] * s[:16]) @ vh[:16], w)
    assert _rel(tt_to_tensor(cores), w) <= best * 1.01


def test_capped_ranks_predict_tt_svd():
    t = torch.randn(4, 6, 5, 3)
    for cap in (1, 2, 5, 7, None):
        assert tt_ranks(tt_svd(t, max_rank=cap)) == capped_ranks([4, 6, 5, 3], cap)


def test_factor_pair_equals_matricized_tt():
    t = _tensor(5)
    cores = tt_svd(t, max_rank=6)
    a, b = tt_factor_pair(cores, 2)
    assert a.shape == (96, 6) and b.shape == (6, 192)
    assert torch.allclose(a @ b, tt_to_tensor(cores).reshape(96, 192), atol=1e-6)
    order3 = tt_svd(torch.randn(2, 3, 4, 5, 2, 3), max_rank=4)
    a, b = tt_factor_pair(order3, 3)
    assert torch.allclose(a @ b, tt_to_tensor(order3).reshape(24, 30), atol=1e-5)


def test_param_count():
    ranks = capped_ranks(MODES, 6)
    assert ranks == [1, 6, 6, 6, 1]
    assert tt_param_count(MODES, ranks) == 12 * 6 + 6 * 8 * 6 + 6 * 16 * 6 + 6 * 12
    assert tt_param_count(MODES, ranks) == sum(g.numel() for g in tt_svd(torch.randn(*MODES), max_rank=6))


def test_half_precision_input_keeps_dtype():
    cores = tt_svd(torch.randn(8, 8, 8).half(), max_rank=4)
    assert all(g.dtype == torch.float16 for g in cores)
    assert tt_to_tensor(cores).shape == (8, 8, 8)


@pytest.mark.parametrize(("kw", "word"), [({"max_rank": 0}, "max_rank"), ({"eps": 1.5}, "eps"),
                                          ({"max_rank": 2.5}, "2.5")])
def test_bad_arguments_raise(kw, word):
    with pytest.raises(ValueError, match=word):
        tt_svd(torch.randn(4, 4), **kw)
