"""Run: .venv/bin/python -m pytest -q tests/test_tensorize.py"""

import pytest
import torch

from saten_core.tensorize import factorize, matricize, tensorize, tensorized_shape


@pytest.mark.parametrize(
    ("shape", "order", "expected"),
    [
        ((768, 3072), 2, [32, 24, 64, 48]),
        ((2048, 8192), 2, [64, 32, 128, 64]),
        ((576, 1536), 2, [24, 24, 48, 32]),
        ((384, 1536), 2, [24, 16, 48, 32]),
        ((576, 192), 2, [24, 24, 16, 12]),
        ((768, 768), 3, [12, 8, 8, 12, 8, 8]),
        ((7, 13), 2, [7, 1, 13, 1]),
        ((64, 128), 1, [64, 128]),
    ],
)
def test_authors_shapes(shape, order, expected):
    in_modes, out_modes = tensorized_shape(*shape, order)
    assert in_modes + out_modes == expected


def test_min_sum_over_all_factorisations():
    for n in (60, 96, 97, 360, 1000):
        best = factorize(n, 2)
        assert best[0] * best[1] == n and best[0] >= best[1]
        assert sum(best) == min(d + n // d for d in range(1, n + 1) if n % d == 0)


def test_round_trip():
    wt = torch.randn(576, 192)
    in_modes, out_modes = tensorized_shape(576, 192)
    t = tensorize(wt, in_modes, out_modes)
    assert t.shape == (24, 24, 16, 12)
    assert torch.equal(matricize(t, in_modes, out_modes), wt)
    assert torch.equal(t[3, 5, 7, 2], wt[3 * 24 + 5, 7 * 12 + 2])  # row-major: first mode is most significant


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_width_raises(bad):
    with pytest.raises(ValueError, match=str(bad)):
        factorize(bad, 2)


def test_mismatched_modes_raise():
    with pytest.raises(ValueError, match="do not match"):
        tensorize(torch.zeros(6, 8), [2, 2], [2, 4])
