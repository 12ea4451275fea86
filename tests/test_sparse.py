"""Run: .venv/bin/python -m pytest -q tests/test_sparse.py"""

import math

import pytest
import torch

from saten_core.sparse import mask_bytes, mask_format, nm_mask, pack_mask, sparse_bytes, topk_mask, unpack_mask


def test_topk_keeps_the_largest():
    scores = torch.randn(40, 30).abs()
    mask = topk_mask(scores, 0.1)
    assert int(mask.sum()) == round(0.1 * 1200)
    assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize("density", [0.0, 0.001, 0.37, 1.0])
def test_topk_count(density):
    assert int(topk_mask(torch.randn(33, 17), density).sum()) == round(density * 33 * 17)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_topk_per_row_keeps_the_largest_of_every_output(density):
    scores = torch.randn(40, 30).abs()
    scores[:, 0] *= 1000  # one output dominates: a per-layer top-k would spend its budget there
    mask = topk_mask(scores, density, "row")
    k = round(density * 40)
    assert torch.equal(mask.sum(0), torch.full((30,), k))
    for o in range(30):
        if 0 < k < 40:
            assert scores[mask[:, o], o].min() >= scores[~mask[:, o], o].max()
    if 0 < density < 1:
        assert not torch.equal(mask, topk_mask(scores, density))


def test_topk_bad_group_raises():
    with pytest.raises(ValueError, match="column"):
        topk_mask(torch.randn(4, 4), 0.5, "column")
    with pytest.raises(ValueError, match="shape"):
        topk_mask(torch.randn(4, 4, 2), 0.5, "row")


def test_nm_mask_two_of_every_four_along_input():
    scores = torch.randn(64, 24).abs()
    mask = nm_mask(scores)
    groups = mask.reshape(16, 4, 24)
    assert torch.equal(groups.sum(1), torch.full((16, 24), 2))
    kept = torch.where(groups, scores.reshape(16, 4, 24), torch.inf).amin(1)
    dropped = torch.where(groups, -torch.inf, scores.reshape(16, 4, 24)).amax(1)
    assert bool((kept >= dropped).all())


def test_nm_mask_bad_width_raises():
    with pytest.raises(ValueError, match="30"):
        nm_mask(torch.randn(30, 8))


def test_bad_density_raises():
    with pytest.raises(ValueError, match="1.5"):
        topk_mask(torch.randn(4, 4), 1.5)


def test_byte_counts():
    numel = 1000
    assert mask_bytes(numel, 10, "unstructured") == 40  # indices beat the 125-byte bitmask
    assert mask_bytes(numel, 500, "unstructured") == 125  # bitmask beats 2000 bytes of indices
    assert mask_bytes(numel, 0, "unstructured") == 0
    assert mask_bytes(numel, 500, "2:4") == 125  # 2 bits per kept value
    assert sparse_bytes(numel, 10, "unstructured", 2) == 60
    assert sparse_bytes(numel, 500, "2:4", 2) == 1125
    with pytest.raises(ValueError, match="2:8"):
        mask_bytes(numel, 10, "2:8")


@pytest.mark.parametrize(("density", "structure", "fmt"), [
    (0.0, "unstructured", "index"), (0.01, "unstructured", "index"), (0.3, "unstructured", "bitmask"),
    (1.0, "unstructured", "bitmask"), (None, "2:4", "nm")])
def test_pack_round_trip_with_exact_bytes(density, structure, fmt):
    scores = torch.randn(36, 20)
    mask = nm_mask(scores) if structure == "2:4" else topk_mask(scores, density)
    got_fmt, packed = pack_mask(mask, structure)
    assert got_fmt == fmt == mask_format(mask.numel(), int(mask.sum()), structure)
    assert packed.numel() * packed.element_size() == mask_bytes(mask.numel(), int(mask.sum()), structure)
    assert torch.equal(unpack_mask(fmt, packed, (36, 20)), mask)


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="csc"):
        unpack_mask("csc", torch.zeros(1, dtype=torch.uint8), (2, 4))


def test_bitmask_size_rounds_up():
    mask = torch.ones(3, 5, dtype=torch.bool)
    fmt, packed = pack_mask(mask, "unstructured")
    assert fmt == "bitmask" and packed.numel() == math.ceil(15 / 8)
    assert torch.equal(unpack_mask(fmt, packed, (3, 5)), mask)
