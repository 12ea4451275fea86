"""Joint TT + sparse fitting: LayerSpec.fit_rounds (layer maths) and Plan.fit_rounds (plan resolution, CLI)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saten_core.calibrate import InputStats
from saten_core.layer import SatenLinear, mask_of
from saten_core.plan import FIT_ROUNDS, Plan, fit_rounds, layer_spec
from saten_core.spec import LayerSpec
from saten_core.tt import tt_factor_pair

N_IN, N_OUT, TOKENS = 64, 96, 2000


def linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@pytest.fixture(scope="module")
def low_rank_plus_spikes() -> nn.Linear:
    """A weight of TT ranks 4 (modes [8, 8] x [12, 8]) plus 3% large spikes: one-shot TT-SVD spends rank on spikes."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, 8, 4), (4, 8, 4), (4, 12, 4), (4, 8, 1)]
    a, b = tt_factor_pair([torch.randn(*s, generator=gen) for s in shapes], 2)
    w = (a @ b).mT / (a @ b).std()
    spikes = (torch.rand(N_OUT, N_IN, generator=gen) < 0.03) * torch.randn(N_OUT, N_IN, generator=gen) * 6
    return linear(w + spikes)


@pytest.fixture(scope="module")
def correlated() -> tuple[nn.Linear, torch.Tensor, InputStats]:
    """A random layer and correlated inputs of uneven scale (as in LLM activations)."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(N_IN, N_IN, generator=gen) * torch.logspace(0.5, -2, N_IN)
    x = torch.randn(TOKENS, N_IN, generator=gen) @ mix.T
    x[:, :4] *= 8.0
    lin = linear(torch.randn(N_OUT, N_IN, generator=gen) / N_IN**0.5)
    return lin, x, InputStats((x.T @ x).double(), TOKENS)


def weight_error(layer: SatenLinear, lin: nn.Linear) -> float:
    with torch.no_grad():
        return float(torch.linalg.norm(lin.weight - layer.to_dense()) / torch.linalg.norm(lin.weight))


def out_error(layer: SatenLinear, lin: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.linalg.norm(x @ (lin.weight - layer.to_dense()).T) / torch.linalg.norm(x @ lin.weight.T))


def test_joint_rounds_separate_low_rank_from_spikes_at_the_same_bytes(low_rank_plus_spikes):
    lin = low_rank_plus_spikes
    one = SatenLinear.from_linear(lin, LayerSpec(rank=4, density=0.04))
    joint = SatenLinear.from_linear(lin, LayerSpec(rank=4, density=0.04, fit_rounds=8))
    assert joint.ranks == one.ranks and joint.stored_bytes() == one.stored_bytes()
    assert int(mask_of(joint).sum()) == int(mask_of(one).sum())
    assert weight_error(joint, lin) < 0.5 * weight_error(one, lin)


@pytest.mark.parametrize("rounds", [1, 3, 8])
@pytest.mark.parametrize("spec", [dict(rank=4, density=0.1), dict(rank=8, density=0.2),
                                  dict(rank=4, density=0.5, structure="2:4")])
def test_joint_rounds_never_raise_the_calibration_output_error(correlated, rounds, spec):
    """The best round is kept, measured in the whitened norm, i.e. output error on the calibration inputs."""
    lin, x, stats = correlated
    one = SatenLinear.from_linear(lin, LayerSpec(method="saten-aw", **spec), stats=stats)
    joint = SatenLinear.from_linear(lin, LayerSpec(method="saten-aw", fit_rounds=rounds, **spec), stats=stats)
    assert joint.stored_bytes() == one.stored_bytes()
    assert out_error(joint, lin, x) <= out_error(one, lin, x) * (1 + 1e-5)


def test_joint_rounds_lower_saten_aw_output_error(correlated):
    lin, x, stats = correlated
    spec = dict(method="saten-aw", rank=8, density=0.2, group="row")
    one = SatenLinear.from_linear(lin, LayerSpec(**spec), stats=stats)
    joint = SatenLinear.from_linear(lin, LayerSpec(fit_rounds=8, **spec), stats=stats)
    assert out_error(joint, lin, x) < 0.97 * out_error(one, lin, x)


def test_zero_rounds_is_the_one_shot_split(correlated):
    lin, _, stats = correlated
    a = SatenLinear.from_linear(lin, LayerSpec(method="saten-aw", rank=4, density=0.1), stats=stats)
    b = SatenLinear.from_linear(lin, LayerSpec(method="saten-aw", rank=4, density=0.1, fit_rounds=0), stats=stats)
    torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_layer_spec_rejects_bad_rounds(bad):
    with pytest.raises(ValueError, match="fit_rounds"):
        LayerSpec(rank=4, density=0.1, fit_rounds=bad).validate()


def test_layer_spec_without_rounds_field_loads_as_one_shot():
    """Layouts saved before fit_rounds existed carry no such key."""
    assert LayerSpec.from_dict({"method": "saten", "rank": 4, "density": 0.1}).fit_rounds == 0


def test_default_tt_share_follows_method_rounds_and_budget():
    from saten_core.plan import JOINT_SHARE, JOINT_SHARE_MAX_RATIO, LOWRANK_SHARE, lowrank_share

    tight, loose = JOINT_SHARE_MAX_RATIO - 0.15, JOINT_SHARE_MAX_RATIO + 0.15
    assert lowrank_share(Plan(method="saten-aw", target_ratio=tight, fit_rounds=4)) == JOINT_SHARE
    assert lowrank_share(Plan(method="saten-aw", target_ratio=loose, fit_rounds=4)) == LOWRANK_SHARE
    assert lowrank_share(Plan(method="saten-aw", target_ratio=tight, fit_rounds=0)) == LOWRANK_SHARE
    assert lowrank_share(Plan(method="saten", target_ratio=tight)) == LOWRANK_SHARE
    assert lowrank_share(Plan(method="saten-aw", target_ratio=tight, lowrank_share=0.4)) == 0.4
    spec = layer_spec(Plan(method="saten-aw", target_ratio=tight, fit_rounds=4), "x", 576, 1536, torch.float32)
    shared = layer_spec(Plan(method="saten-aw", target_ratio=tight, lowrank_share=JOINT_SHARE, fit_rounds=4), "x",
                        576, 1536, torch.float32)
    assert spec == shared


def test_legacy_plan_json_without_rounds_stays_one_shot():
    """A plan saved before joint fitting existed reproduces the model it made: no rounds, its own share."""
    import json

    legacy = json.loads(Plan(method="saten-aw", target_ratio=0.5, lowrank_share=0.05).to_json())
    del legacy["fit_rounds"]
    plan = Plan.from_dict(legacy)
    assert fit_rounds(plan) == 0 and plan.lowrank_share == 0.05


def test_plan_rounds_default_per_method_and_round_trip():
    assert fit_rounds(Plan(method="saten-aw", target_ratio=0.5)) == FIT_ROUNDS
    assert fit_rounds(Plan(method="saten", target_ratio=0.5)) == 0
    assert fit_rounds(Plan(method="saten-aw", target_ratio=0.5, fit_rounds=0)) == 0
    plan = Plan(method="saten", target_ratio=0.5, fit_rounds=3)
    assert Plan.from_json(plan.to_json()) == plan
    assert layer_spec(plan, "model.layers.0.mlp.up_proj", 576, 1536, torch.float32).fit_rounds == 3


@pytest.mark.parametrize("method", ["wanda", "svd-w", "tt", "prune"])
def test_plan_rejects_rounds_for_methods_without_both_parts(method):
    with pytest.raises(ValueError, match=method):
        Plan(method=method, target_ratio=0.5, fit_rounds=2).validate()


@pytest.mark.parametrize("bad", [-2, 2.5, False])
def test_plan_rejects_bad_rounds(bad):
    with pytest.raises(ValueError, match="fit_rounds"):
        Plan(method="saten-aw", target_ratio=0.5, fit_rounds=bad).validate()


def test_cli_plan_fit_rounds(tiny_llama_dir, tmp_path):
    from test_cli import assert_bad_input, cli

    out = tmp_path / "p.json"
    done = cli("plan", "--model", tiny_llama_dir, "--method", "saten-aw", "--target-ratio", "0.6", "--fit-rounds",
               "3", "--out", out)
    assert done.returncode == 0, done.stderr
    assert Plan.from_json(out.read_text()).fit_rounds == 3
    assert_bad_input(cli("plan", "--model", tiny_llama_dir, "--method", "wanda", "--target-ratio", "0.6",
                         "--fit-rounds", "3", "--out", tmp_path / "q.json"), "wanda")
    assert_bad_input(cli("plan", "--model", tiny_llama_dir, "--method", "saten", "--target-ratio", "0.6",
                         "--fit-rounds", "-1", "--out", tmp_path / "r.json"), "-1")
