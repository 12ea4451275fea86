"""Healing: fine-tune only the compressed layers' TT cores and kept sparse values by distillation.

The paper compresses during fine-tuning; training-free compression of a small, long-trained model loses a
lot, so a short distillation against the original model's logits recovers part of the gap. Masks and every
other weight stay frozen (bit-identical), so the compressed layout and byte count never change.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from saten_core.calibrate import token_windows

Progress = Callable[[str, float, str], None]


@dataclass
class HealConfig:
    """Knobs of one healing run; round-trips through JSON via asdict / HealConfig(**d)."""

    steps: int = 100
    lr: float = 1e-4
    seq_len: int = 256
    batch_size: int = 4
    tokens: int = 16384  # training tokens drawn from the calibration text
    eval_tokens: int = 2048  # held-out tokens for choosing the best checkpoint
    eval_every: int = 10
    lm_weight: float = 0.0  # weight of the next-token cross-entropy added to the KL loss
    seed: int = 0
    core_lr_scale: float = 1.0  # TT cores train at lr x this (kept values at lr); 0 freezes the cores

    def validate(self) -> None:
        for name in ("steps", "seq_len", "batch_size", "tokens", "eval_tokens", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lm_weight < 0:
            raise ValueError(f"lm_weight must be >= 0, got {self.lm_weight}")
        if not self.core_lr_scale >= 0:
            raise ValueError(f"core_lr_scale must be >= 0, got {self.core_lr_scale}")


@dataclass
class HealResult:
    loss_curve: list[float] = field(default_factory=list)  # training loss per step
    eval_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KL)
    best_step: int = 0
    best_eval: float = float("inf")
    stopped: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _compressed_layers(model: nn.Module) -> list[nn.Module]:
    """The model's SatenLinear and QuantLinear layers (matched by name: heal does not import the layer modules).

    A QuantLinear heals its 16-bit scales and minimums with the codes fixed; saten-q's repair is a SatenLinear.
    """
    return [m for m in model.modules() if type(m).__name__ in ("SatenLinear", "QuantLinear")]


def trainable_parameters(model: nn.Module, *, cores: bool = True) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the compressed layers' kept values and (with `cores`) TT cores.

    Empty tensors (a layer without a sparse part stores zero values) are left out: they have nothing to train.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for module in _compressed_layers(model):
        for name, p in module.named_parameters():
            if p.numel() and (name in ("values", "value_scales", "scales", "mins")
                              or (cores and name.startswith(("cores.", "core_scales.")))):
                p.requires_grad_(True)
                params.append(p)
    if not params:
        raise ValueError("the model has no compressed (SatenLinear) layers to heal" if cores else
                         "with the TT cores frozen (core_lr_scale 0) no layer keeps sparse values to heal")
    return params


def param_groups(params: list[nn.Parameter], model: nn.Module, cfg: HealConfig) -> list[dict]:
    """Optimizer groups: kept values at cfg.lr, TT cores at cfg.lr x cfg.core_lr_scale.

    Why: a TT core's update moves every entry of the layer's weight at once, while a kept value moves one, so
    the two may want different step sizes (docs/BENCHMARKS.md, "healing the TT cores").
    """
    core_ids = {id(p) for m in _compressed_layers(model)
                for p in [*getattr(m, "cores", []), *getattr(m, "core_scales", [])]}
    cores = [p for p in params if id(p) in core_ids]
    rest = [p for p in params if id(p) not in core_ids]
    groups = [{"params": rest, "lr": cfg.lr}] if rest else []
    return groups + ([{"params": cores, "lr": cfg.lr * cfg.core_lr_scale}] if cores else [])


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
                 lm_weight: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student) plus optional next-token cross-entropy. logits (B, T, V)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    loss = F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss


@torch.no_grad()
def _eval_kl(student: nn.Module, teacher: nn.Module, windows: list[torch.Tensor], device) -> float:
    student.eval()
    total = 0.0
    for w in windows:
        w = w.to(device)
        total += float(distill_loss(student(input_ids=w).logits, teacher(input_ids=w).logits, w, 0.0))
    return total / len(windows)


def _batches(windows: list[torch.Tensor], cfg: HealConfig):
    full = [w for w in windows if w.shape[1] == cfg.seq_len]
    if not full:
        raise ValueError(f"calibration text gives no full window of seq_len {cfg.seq_len}")
    rng = random.Random(cfg.seed)
    while True:
        yield torch.cat(rng.sample(full, min(cfg.batch_size, len(full))), dim=0)  # (B, T)


def heal(student: nn.Module, teacher: nn.Module, tokenizer, train_text: str, eval_text: str,
         cfg: HealConfig, *, progress: Progress | None = None,
         should_stop: Callable[[], bool] | None = None) -> HealResult:
    """Distil `teacher` into `student` in place; keep the parameters with the lowest held-out KL.

    Example:
        result = heal(compressed, original, tok, calib, heldout, HealConfig(steps=50))
        print(result.best_eval, result.loss_curve[-1])
    """
    cfg.validate()
    device = next(student.parameters()).device
    params = trainable_parameters(student, cores=cfg.core_lr_scale > 0)
    teacher.eval().requires_grad_(False)
    train = _batches(token_windows(tokenizer, train_text, cfg.tokens, cfg.seq_len), cfg)
    held = token_windows(tokenizer, eval_text, cfg.eval_tokens, cfg.seq_len)
    opt = torch.optim.AdamW(param_groups(params, student, cfg), lr=cfg.lr, weight_decay=0.0)
    result = HealResult()
    best = _snapshot(params)
    result.best_eval = _eval_kl(student, teacher, held, device)
    result.eval_curve.append((0, result.best_eval))
    for step in range(1, cfg.steps + 1):
        if should_stop and should_stop():
            result.stopped = True
            break
        result.loss_curve.append(_train_step(student, teacher, next(train).to(device), opt, cfg))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            kl = _eval_kl(student, teacher, held, device)
            result.eval_curve.append((step, kl))
            if kl < result.best_eval:
                result.best_eval, result.best_step, best = kl, step, _snapshot(params)
        if progress:
            progress("heal", step / cfg.steps, f"step {step}/{cfg.steps} loss {result.loss_curve[-1]:.4f}")
    _restore(params, best)
    student.eval()
    return result


def _train_step(student, teacher, batch, opt, cfg: HealConfig) -> float:
    student.train()
    with torch.no_grad():
        target = teacher(input_ids=batch).logits
    loss = distill_loss(student(input_ids=batch).logits, target, batch, cfg.lm_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [copy.deepcopy(p.detach()) for p in params]


@torch.no_grad()
def _restore(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)
