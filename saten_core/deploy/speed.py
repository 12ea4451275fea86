"""Speed as a deployment sees it: a compressed model timed against its original in one process, interleaved.

Why: on a shared machine the same model's decode time moves by +-30% between runs minutes apart, so a ratio of
two separately timed jobs is noise. Timing A B A B ... in one process, on one device, and taking the median of
the per-round ratios (with their min-max) is what stays stable.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

ROUNDS = 5  # interleaved rounds after one warm-up each; the floor


def _check(rounds: int, models: dict[str, nn.Module]) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if "compressed" not in models or len(models) < 2:
        raise ValueError(f"need 'compressed' and at least one original to compare, got {sorted(models)}")


def interleaved_times(models: dict[str, nn.Module], prompt: torch.Tensor, decode_tokens: int,
                      rounds: int = ROUNDS) -> dict[str, list[tuple[float, float | None]]]:
    """(prefill ms, decode ms/token) per round for each model, timed in rotating order within every round.

    Every model is warmed up once first; rotating who goes first keeps a slow start-of-round (frequency,
    cache) from always landing on the same model.
    """
    from saten_core.evaluate import _time_once

    _check(rounds, models)
    names = list(models)
    for name in names:
        _time_once(models[name], prompt, decode_tokens)
    times: dict[str, list] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_time_once(models[name], prompt, decode_tokens))
    return times


def round_ratios(cand: list[tuple], orig: list[tuple]) -> dict[str, float | None]:
    """Median and min-max over rounds of compressed / original time (decode and prefill); <1 = faster.

    Example:
        >>> round_ratios([(2.0, 1.0)] * 3, [(1.0, 2.0)] * 3)["decode_ratio"]
        0.5
    """
    out: dict[str, float | None] = {}
    for key, k in (("prefill", 0), ("decode", 1)):
        pairs = [(c[k], o[k]) for c, o in zip(cand, orig, strict=True) if c[k] is not None and o[k]]
        ratios = [c / o for c, o in pairs]
        out[f"{key}_ratio"] = statistics.median(ratios) if ratios else None
        out[f"{key}_ratio_min"] = min(ratios) if ratios else None
        out[f"{key}_ratio_max"] = max(ratios) if ratios else None
    return out


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(times: dict[str, list[tuple]]) -> dict[str, Any]:
    """Ratios against every original, and the headline ratio against the fastest original (by decode).

    The headline is what a user would deploy instead: on this CPU bf16 decodes faster than fp32, fp32
    prefills faster, so the reference is named (`ratio_reference`) rather than assumed.
    """
    originals = {name: t for name, t in times.items() if name != "compressed"}
    ratios = {name: round_ratios(times["compressed"], t) for name, t in originals.items()}
    abs_ms = {name: {"prefill_ms": _median([p for p, _ in t]), "decode_ms_per_token": _median([d for _, d in t])}
              for name, t in times.items()}

    def speed(name: str) -> float:
        ms = abs_ms[name]
        return ms["decode_ms_per_token"] if ms["decode_ms_per_token"] is not None else ms["prefill_ms"]

    fastest = min(originals, key=speed)
    return {**ratios[fastest], "ratio_reference": fastest, "rounds": len(times["compressed"]),
            "original": {n: abs_ms[n] for n in originals}, "compressed": abs_ms["compressed"], "ratios": ratios}


@torch.inference_mode()
def side_by_side(compressed: nn.Module, originals: dict[str, nn.Module], tokenizer: Any, *,
                 prefill_tokens: int = 128, decode_tokens: int = 16, rounds: int = ROUNDS) -> dict[str, Any]:
    """Time `compressed` against each original (keyed by a label, e.g. its dtype) interleaved in this process.

    Returns summarise()'s dict: decode_ratio / prefill_ratio (median compressed / original time, against the
    fastest original), their _min / _max, ratio_reference, rounds, absolute medians and per-original ratios.
    Example:
        side_by_side(lm.model, {"bfloat16": orig.model}, lm.tokenizer)["decode_ratio"]
    """
    from saten_core.evaluate import _check_latency_args, _prompt, model_device

    models = {"compressed": compressed, **originals}
    _check_latency_args(compressed, prefill_tokens, decode_tokens, 1)
    devices = {str(model_device(m)) for m in models.values()}
    if len(devices) != 1:
        raise ValueError(f"side-by-side timing needs every model on one device, got {sorted(devices)}")
    prompt = _prompt(tokenizer, prefill_tokens).to(model_device(compressed))
    return summarise(interleaved_times(models, prompt, decode_tokens, rounds))


def no_measurable_difference(lo: float | None, hi: float | None) -> bool:
    """True when the min-max spread of a ratio spans 1.0: the models cannot be told apart on speed."""
    return lo is not None and hi is not None and lo <= 1.0 <= hi
