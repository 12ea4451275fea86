"""Build a compressed model in memory: calibrate (when the plan needs it), compress, heal (when asked).

Used by pipeline.compress_to_dir (CLI and job worker) and by whole-model comparison scripts, which call
`build_compressed` (or `compress_loaded` with statistics collected once by `collect_stats`) without saving.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from saten_core.plan import Plan
from saten_core.spec import needs_stats

Progress = Callable[[str, float, str], None]


def calibration_text(plan: Plan) -> str:
    """The plan's calibration text: the bundled calibration split (calib None / "default") or a UTF-8 file.

    The bundled split never overlaps the held-out half that evaluation uses.
    """
    from saten_core.corpus import default_text, read_text_file, split_text
    from saten_core.files import check_text_path

    if plan.calib in (None, "default"):
        return split_text(default_text())[0]
    check_text_path(plan.calib)  # a shared studio reads only allowed folders (also for jobs queued earlier)
    return read_text_file(plan.calib)


def heal_texts(text: str) -> tuple[str, str]:
    """(train, held-out) halves of the calibration text: the best checkpoint is picked on text it never saw,
    and nothing of the evaluation text is used."""
    from saten_core.corpus import split_text

    try:
        return split_text(text)
    except ValueError as exc:
        raise ValueError(f"calibration text is too short for healing: {exc}") from None


def heal_config(plan: Plan) -> Any:
    """The plan's heal_* fields as a heal.HealConfig."""
    from saten_core.heal import HealConfig

    return HealConfig(steps=plan.heal_steps, lr=plan.heal_lr, seq_len=plan.heal_seq_len,
                      batch_size=plan.heal_batch_size, tokens=plan.heal_tokens, eval_tokens=plan.heal_eval_tokens,
                      eval_every=plan.heal_eval_every, lm_weight=plan.heal_lm_weight,
                      core_lr_scale=plan.heal_core_lr_scale)


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_calibration(loaded: Any, plan: Plan, text: str) -> None:
    """Fail before any layer changes when the text cannot feed calibration or healing (ValueError, numbers)."""
    tok = loaded.tokenizer
    if needs_stats(plan.method) and (have := _count_tokens(tok, text)) < plan.calib_tokens:
        raise ValueError(f"calibration text has {have} tokens, fewer than calib_tokens {plan.calib_tokens}")
    if plan.heal_steps <= 0:
        return
    if loaded.kind != "decoder":
        raise ValueError(f"healing needs a decoder (causal LM); {loaded.name} is an {loaded.kind}")
    if plan.heal_tokens < plan.heal_seq_len:
        raise ValueError(f"heal_tokens {plan.heal_tokens} is less than one sequence of heal_seq_len "
                         f"{plan.heal_seq_len}")
    train, held = heal_texts(text)
    for half, part, need, name in (("training", train, plan.heal_tokens, "heal_tokens"),
                                   ("held-out", held, plan.heal_eval_tokens, "heal_eval_tokens")):
        if (have := _count_tokens(tok, part)) < need:
            raise ValueError(f"calibration text is too short for healing: its {half} half has {have} tokens, "
                             f"fewer than {name} {need}")


def _stoppable(progress: Progress | None, should_stop: Callable[[], bool] | None) -> Progress:
    """A progress callback that also cancels (between calibration windows) when should_stop() says so."""
    from saten_core.compress import Cancelled

    def report(stage: str, fraction: float, message: str) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled at stage {stage}")
        if progress is not None:
            progress(stage, fraction, message)

    return report


def collect_stats(loaded: Any, plan: Plan, text: str | None = None, *, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Input statistics of every layer the plan compresses, from plan.calib_tokens of the calibration text.

    Collect once and pass to several `compress_loaded` calls when comparing methods on one model.
    """
    from saten_core.calibrate import collect_input_stats
    from saten_core.compress import planned_layers

    text = calibration_text(plan) if text is None else text
    layers = [(name, lin) for name, lin, _ in planned_layers(loaded.model, plan)]
    if progress is not None:
        progress("calibrate", 0.0, f"input statistics of {len(layers)} layers from {plan.calib_tokens} tokens")
    return collect_input_stats(loaded.model, loaded.tokenizer, text, layers, tokens=plan.calib_tokens,
                               seq_len=plan.calib_seq_len, progress=_stoppable(progress, should_stop))


def heal_loaded(loaded: Any, teacher: Any, plan: Plan, text: str, *, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None) -> dict:
    """Distil `teacher` (the original model) into the compressed `loaded.model` in place; report dict.

    Cancelled (no half-healed model is handed on) when should_stop() stops the run.
    """
    from saten_core.compress import Cancelled
    from saten_core.heal import heal

    cfg = heal_config(plan)
    train, held = heal_texts(text)
    if progress is not None:
        progress("heal", 0.0, f"healing {cfg.steps} steps at lr {cfg.lr:g}")
    start = time.perf_counter()
    result = heal(loaded.model, teacher, loaded.tokenizer, train, held, cfg, progress=progress,
                  should_stop=should_stop)
    if result.stopped:
        raise Cancelled(f"cancelled during healing after {len(result.loss_curve)} of {cfg.steps} steps")
    return {"config": asdict(cfg), **result.to_dict(), "seconds": time.perf_counter() - start}


def compress_loaded(loaded: Any, plan: Plan, *, progress: Progress | None = None,
                    should_stop: Callable[[], bool] | None = None, stats: dict[str, Any] | None = None,
                    teacher: Any = None) -> dict:
    """Calibrate (if needed and `stats` is None), compress and heal (if plan.heal_steps) `loaded` in place.

    teacher: the original model for healing (default: a copy of loaded.model taken before compressing).
    Returns {"layers": per-layer reports, "calibration": ... | None, "heal": ... | None}.
    Example:
        loaded = load_model("smollm2-135m")
        info = compress_loaded(loaded, Plan(method="saten-aw", target_ratio=0.5, heal_steps=100))
    """
    from saten_core.compress import compress_
    from saten_core.models import to_working_precision

    plan.validate()
    text = calibration_text(plan) if plan.needs_calibration() else None
    if text is not None:
        check_calibration(loaded, plan, text)
    if plan.heal_steps and teacher is None:
        teacher = copy.deepcopy(loaded.model)
    info: dict[str, Any] = {"calibration": None, "heal": None}
    start = time.perf_counter()
    calib = {"source": plan.calib or "default", "tokens": plan.calib_tokens, "seq_len": plan.calib_seq_len,
             "order": "sequential" if plan.sequential else "all-at-once"}
    if needs_stats(plan.method) and stats is None and plan.sequential:
        info["layers"] = _compress_sequential(loaded, plan, text, progress, should_stop)
        info["calibration"] = {**calib, "seconds": time.perf_counter() - start}  # compression included
    else:
        if needs_stats(plan.method) and stats is None:
            stats = collect_stats(loaded, plan, text, progress=progress, should_stop=should_stop)
            info["calibration"] = {**calib, "seconds": time.perf_counter() - start}
        info["layers"] = compress_(loaded.model, plan, progress=progress, should_stop=should_stop, stats=stats)
    stats = None  # free the statistics (hundreds of MB on real models) before healing
    if plan.heal_steps:
        to_working_precision(loaded.model)  # a block-sequential run kept the model at its deploy dtype
        info["heal"] = heal_loaded(loaded, teacher, plan, text, progress=progress, should_stop=should_stop)
    return info


def _compress_sequential(loaded: Any, plan: Plan, text: str, progress: Progress | None,
                         should_stop: Callable[[], bool] | None) -> list[dict]:
    """Calibrate and compress block by block (plan.sequential): blocks/walk.py."""
    from saten_core.blocks.walk import compress_blockwise
    from saten_core.calibrate import token_windows

    windows = token_windows(loaded.tokenizer, text, plan.calib_tokens, plan.calib_seq_len)
    return compress_blockwise(loaded.model, plan, windows, loaded.kind == "decoder",
                              progress=_stoppable(progress, should_stop), should_stop=should_stop)


def build_compressed(model_ref: str, plan: Plan, *, device: str = "auto", progress: Progress | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     stats: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """Load `model_ref` and return (LoadedModel compressed and healed per the plan, compress_loaded's info).

    Nothing is saved; pipeline.compress_to_dir adds evaluation and the DIR on top.
    Example:
        loaded, info = build_compressed("smollm2-135m", Plan(method="saten-aw", target_ratio=0.8))
        perplexity(loaded.model, loaded.tokenizer, held_out_text(None))
    """
    from saten_core.models import load_model, resolve_device, to_working_precision

    plan.validate()
    dev = resolve_device(device)
    if progress is not None:
        progress("load", 0.0, f"loading {model_ref} on {dev}")
    loaded = load_model(model_ref, device=dev, dtype=plan.torch_dtype())  # the deployed weights,
    to_working_precision(loaded.model)  # compressed and healed in fp32 (cast with .to(plan.torch_dtype()))
    return loaded, compress_loaded(loaded, plan, progress=progress, should_stop=should_stop, stats=stats)
