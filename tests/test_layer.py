"""Run: .venv/bin/python -m pytest -q tests/test_layer.py"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from saten_core.layer import SatenLinear, mask_of, predict_bytes
from saten_core.spec import LayerSpec

IN, OUT = 96, 192
PATHS = ("dense", "csr", "gather")
KERNEL_PATHS = ("reference", "cpu-decode", "cpu-prefill")  # this CPU's kernels; test_kernels_cpu covers the ISAs


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


@pytest.fixture(scope="module")
def x():
    return torch.randn(7, IN, generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _outputs(layer, x):
    """Outputs of every compact kernel path, every materialized sparse path and the differentiable training path."""
    with torch.no_grad():
        outs = {"compact": layer(x)}
        for path in KERNEL_PATHS:
            layer.kernel_path = path
            outs[f"kernel {path}"] = layer(x)
        layer.kernel_path = "auto"
        layer.materialize()
        for path in PATHS:
            layer.sparse_path = path
            outs[path] = layer(x)
    layer.sparse_path = "auto"
    layer.materialize(False)
    outs["train"] = layer(x).detach()
    return outs


EXACT_SPECS = [
    LayerSpec(method="saten", density=1.0),
    LayerSpec(method="saten", structure="2:4"),
    LayerSpec(method="saten", order=3, density=0.5),
    LayerSpec(method="tt"),
    LayerSpec(method="svd"),
    LayerSpec(method="prune", density=1.0),
    LayerSpec(method="svd", rank=IN, density=0.2),
    LayerSpec(method="saten", density=1.0, group="row"),
]


@pytest.mark.parametrize("spec", EXACT_SPECS, ids=lambda s: f"{s.method}-{s.structure}-{s.density}-o{s.order}")
def test_full_rank_equals_original(linear, x, spec):
    layer = SatenLinear.from_linear(linear, spec)
    ref = linear(x).detach()
    for path, y in _outputs(layer, x).items():
        assert _rel(y, ref) < 1e-5, path
    assert _rel(layer.to_dense().detach(), linear.weight.detach()) < 1e-5


@pytest.mark.parametrize("spec", [LayerSpec(rank=4, density=0.1), LayerSpec(rank=8, structure="2:4"),
                                  LayerSpec(method="prune", density=0.3), LayerSpec(method="prune", structure="2:4"),
                                  LayerSpec(method="svd", rank=5)])
def test_paths_agree_and_match_to_dense(linear, x, spec):
    layer = SatenLinear.from_linear(linear, spec)
    ref = x @ layer.to_dense().detach().T + linear.bias.detach()
    for path, y in _outputs(layer, x).items():
        assert torch.allclose(y, ref, atol=1e-5), path


def _weight_error(linear, spec):
    layer = SatenLinear.from_linear(linear, spec)
    return _rel(layer.to_dense().detach(), linear.weight.detach())


@pytest.mark.parametrize("method", ["saten", "tt", "svd"])
def test_error_never_grows_with_rank(linear, method):
    errors = [_weight_error(linear, LayerSpec(method=method, rank=r, density=0.05)) for r in (1, 2, 4, 8, 16, 48, 96)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[0] > errors[-1]


@pytest.mark.parametrize("method", ["saten", "prune"])
def test_error_never_grows_with_density(linear, method):
    errors = [_weight_error(linear, LayerSpec(method=method, rank=4, density=d)) if method == "saten" else
              _weight_error(linear, LayerSpec(method=method, density=d)) for d in (0.0, 0.05, 0.2, 0.5, 0.9, 1.0)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-6 < errors[0]


def test_eps_bound_honoured(linear):
    ranks = []
    for eps in (0.05, 0.3, 0.7):
        layer = SatenLinear.from_linear(linear, LayerSpec(method="tt", eps=eps))
        assert _rel(layer.to_dense().detach(), linear.weight.detach()) <= eps * (1 + 1e-5)
        ranks.append(layer.rank())
    assert ranks == sorted(ranks, reverse=True) and ranks[-1] < IN


def test_2_4_mask_has_two_of_each_four(linear):
    for method in ("saten", "prune"):
        layer = SatenLinear.from_linear(linear, LayerSpec(method=method, rank=4, structure="2:4"))
        mask = mask_of(layer)
        assert torch.equal(mask.reshape(IN // 4, 4, OUT).sum(1), torch.full((IN // 4, OUT), 2))


SIZE_SPECS = [LayerSpec(rank=6, density=0.01), LayerSpec(rank=6, density=0.3), LayerSpec(rank=6, structure="2:4"),
              LayerSpec(method="tt", rank=10), LayerSpec(method="svd", rank=3), LayerSpec(method="prune", density=0.5),
              LayerSpec(method="prune", structure="2:4"), LayerSpec(rank=3, density=0.0),
              LayerSpec(method="prune", density=0.37, group="row"), LayerSpec(rank=6, density=0.3, group="row")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spec", SIZE_SPECS, ids=str)
def test_stored_bytes_equal_serialised_bytes(tmp_path, linear, spec, dtype):
    layer = SatenLinear.from_linear(linear.to(dtype), spec)
    linear.float()
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, path)
    saved = load_file(path)
    serialised = sum(t.numel() * t.element_size() for k, t in saved.items() if k != "bias")
    assert layer.stored_bytes() == serialised == predict_bytes(IN, OUT, spec, dtype)
    assert "bias" in saved


def test_predict_bytes_none_when_eps_decides():
    assert predict_bytes(IN, OUT, LayerSpec(eps=0.1, density=0.1), torch.float32) is None
    assert predict_bytes(IN, OUT, LayerSpec(method="prune", eps=0.1, density=0.1), torch.float32) is not None


@pytest.mark.parametrize("spec", SIZE_SPECS[:4] + [LayerSpec(method="prune", structure="2:4")], ids=str)
def test_from_layout_and_load_state_dict_restore_exactly(linear, x, spec):
    layer = SatenLinear.from_linear(linear, spec)
    layout = json.loads(json.dumps(layer.layout()))
    skeleton = SatenLinear.from_layout(layout)
    skeleton.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(skeleton(x), layer(x))
    assert skeleton.layout() == layer.layout()


def test_training_changes_cores_and_values_never_mask(linear, x):
    layer = SatenLinear.from_linear(linear, LayerSpec(rank=4, density=0.1))
    mask, cores, values = layer.mask.clone(), [g.detach().clone() for g in layer.cores], layer.values.detach().clone()
    with torch.no_grad():
        before = layer(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.mask, mask)
    assert not torch.equal(layer.values.detach(), values)
    assert all(not torch.equal(g.detach(), c) for g, c in zip(layer.cores, cores, strict=True))
    with torch.no_grad():  # the inference cache follows the new parameters
        after = layer(x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, x @ layer.to_dense().detach().T + layer.bias.detach(), atol=1e-5)


def test_training_after_inference_mode_evaluation_of_a_loaded_layer(linear, x):
    """A reloaded layer evaluated under inference_mode first (load, eval, then heal) must still train."""
    trained = SatenLinear.from_linear(linear, LayerSpec(rank=4, density=0.1))
    layer = SatenLinear.from_layout(json.loads(json.dumps(trained.layout())))
    layer.load_state_dict(trained.state_dict())
    with torch.inference_mode():
        before = layer(x)
    layer(x).pow(2).mean().backward()
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0
    with torch.inference_mode():
        assert torch.equal(layer(x), before)


def test_inference_reuses_cached_factor_pair(linear, x):
    layer = SatenLinear.from_linear(linear, LayerSpec(rank=4, density=0.5))
    layer.materialize()
    with torch.no_grad():
        layer(x)
        first = layer._cached(layer._choose_path(x.shape[0]))
        layer(x[:1])
        second = layer._cached(layer._choose_path(1))
    assert first[0][0] is second[0][0] and first[0][1] is second[0][1]
    assert first[1] is second[1] or layer._choose_path(1) != layer._choose_path(x.shape[0])


def test_scores_change_the_mask(linear):
    scores = torch.ones(IN, OUT)
    scores[:10] = 100.0
    plain = mask_of(SatenLinear.from_linear(linear, LayerSpec(method="prune", density=0.1)))
    weighted = mask_of(SatenLinear.from_linear(linear, LayerSpec(method="prune", density=0.1), scores=scores))
    assert int(weighted[:10].sum()) > int(plain[:10].sum())
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        SatenLinear.from_linear(linear, LayerSpec(method="prune", density=0.1), scores=torch.ones(3, 3))


def test_counts(linear):
    layer = SatenLinear.from_linear(linear, LayerSpec(rank=4, density=0.1))
    nnz = round(0.1 * IN * OUT)
    assert layer.ranks == [1, 4, 4, 4, 1]
    assert layer.param_count() == 12 * 4 + 4 * 8 * 4 + 4 * 16 * 4 + 4 * 12 + nnz
    assert layer.macs_per_token() == 4 * (IN + OUT) + nnz
    svd = SatenLinear.from_linear(linear, LayerSpec(method="svd", rank=5))
    assert svd.param_count() == 5 * (IN + OUT) and svd.macs_per_token() == 5 * (IN + OUT)


def test_no_bias_and_batch_shapes():
    lin = nn.Linear(IN, OUT, bias=False)
    layer = SatenLinear.from_linear(lin, LayerSpec(rank=4, density=0.1))
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert layer(torch.randn(2, 3, IN)).shape == (2, 3, OUT)


@pytest.mark.parametrize(("spec", "word"), [
    (LayerSpec(rank=IN + 1), str(IN + 1)), (LayerSpec(rank=0), "rank"), (LayerSpec(density=1.5), "1.5"),
    (LayerSpec(method="magic"), "magic")])
def test_bad_specs_raise(linear, spec, word):
    with pytest.raises(ValueError, match=word):
        SatenLinear.from_linear(linear, spec)


def test_2_4_needs_width_divisible_by_4():
    with pytest.raises(ValueError, match="30"):
        SatenLinear.from_linear(nn.Linear(30, 8), LayerSpec(structure="2:4"))


def test_semi_structured_refuses_cpu(linear):
    layer = SatenLinear.from_linear(linear, LayerSpec(rank=4, structure="2:4"))
    with pytest.raises(ValueError, match="cpu"):
        layer.enable_semi_structured()


def test_half_precision_forward_auto_path(linear, x):
    half = nn.Linear(IN, OUT).half()
    layer = SatenLinear.from_linear(half, LayerSpec(rank=4, density=0.05))
    assert all(g.dtype == torch.float16 for g in layer.cores) and layer.values.dtype == torch.float16
    with torch.no_grad():
        y = layer(x.half())
    ref = x.half().float() @ layer.to_dense().detach().float().T + half.bias.detach().float()
    assert y.dtype == torch.float16 and torch.allclose(y.float(), ref, atol=1e-2)


def test_row_group_keeps_the_same_count_in_every_output(linear):
    spec = LayerSpec(method="prune", density=0.3, group="row")
    layer = SatenLinear.from_linear(linear, spec)
    assert torch.equal(mask_of(layer).sum(0), torch.full((OUT,), round(0.3 * IN)))
    assert layer.values.numel() == OUT * round(0.3 * IN)
