"""Run: .venv/bin/python -m pytest -q tests/test_heal.py"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saten_core.corpus import default_text, split_text
from saten_core.heal import HealConfig, heal, param_groups, trainable_parameters
from saten_core.layer import SatenLinear, mask_of
from saten_core.spec import LayerSpec


def _compress(model):
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "layers" in f"{name}.{child_name}":
                spec = LayerSpec(method="saten", rank=4, density=0.05)
                setattr(module, child_name, SatenLinear.from_linear(child, spec))
    return model


def _pair(model_dir):
    """(teacher, compressed copy, tokenizer, (train text, held-out text))."""
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    student = _compress(copy.deepcopy(teacher))
    return teacher, student, AutoTokenizer.from_pretrained(model_dir), split_text(default_text())


def test_heal_lowers_distillation_loss_and_keeps_frozen_parts_identical(tiny_llama_dir):
    teacher, student, tok, (calib, held) = _pair(tiny_llama_dir)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if "cores" not in k and "values" not in k}
    masks = {n: mask_of(m).clone() for n, m in student.named_modules() if isinstance(m, SatenLinear)}
    cfg = HealConfig(steps=30, lr=3e-3, seq_len=64, batch_size=4, tokens=4096, eval_tokens=512, eval_every=10)
    result = heal(student, teacher, tok, calib, held, cfg)
    assert result.eval_curve[0][1] > 0
    assert result.best_eval < result.eval_curve[0][1], result.eval_curve
    assert len(result.loss_curve) == 30
    after = student.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    for n, m in student.named_modules():
        if isinstance(m, SatenLinear):
            assert torch.equal(mask_of(m), masks[n]), n


def test_heal_refuses_model_without_compressed_layers(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match="no compressed"):
        trainable_parameters(model)


def test_heal_config_validation():
    with pytest.raises(ValueError, match="steps"):
        HealConfig(steps=0).validate()
    with pytest.raises(ValueError, match="lr"):
        HealConfig(lr=0).validate()
    with pytest.raises(ValueError, match="core_lr_scale"):
        HealConfig(core_lr_scale=-0.1).validate()


def test_core_lr_scale_zero_freezes_cores_and_still_heals_values(tiny_llama_dir):
    teacher, student, tok, (calib, held) = _pair(tiny_llama_dir)
    cores = {k: v.clone() for k, v in student.state_dict().items() if "cores" in k}
    values = {k: v.clone() for k, v in student.state_dict().items() if k.endswith("values")}
    cfg = HealConfig(steps=20, lr=3e-3, seq_len=64, batch_size=4, tokens=4096, eval_tokens=512, eval_every=5,
                     core_lr_scale=0.0)
    result = heal(student, teacher, tok, calib, held, cfg)
    assert result.best_eval < result.eval_curve[0][1], result.eval_curve
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in cores.items())
    assert any(not torch.equal(after[k], v) for k, v in values.items())


def test_param_groups_give_cores_the_scaled_lr(tiny_llama_dir):
    student = _compress(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    params = trainable_parameters(student)
    groups = param_groups(params, student, HealConfig(lr=1e-3, core_lr_scale=0.25))
    layers = [m for m in student.modules() if isinstance(m, SatenLinear)]
    assert [g["lr"] for g in groups] == [1e-3, 2.5e-4]
    assert {id(p) for p in groups[0]["params"]} == {id(m.values) for m in layers}
    assert {id(p) for p in groups[1]["params"]} == {id(c) for m in layers for c in m.cores}
    assert len(trainable_parameters(student, cores=False)) == len(layers)


def test_frozen_cores_without_sparse_values_say_nothing_would_heal(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.model.layers[0].mlp.up_proj = SatenLinear.from_linear(model.model.layers[0].mlp.up_proj,
                                                                LayerSpec(method="tt", rank=2))
    with pytest.raises(ValueError, match="frozen"):
        trainable_parameters(model, cores=False)
