"""Sweeps: one queued job per combination of method, byte ratio and healing length, tagged with one sweep id.

Why a config dataclass: the sweep is stored and re-run exactly as typed (`SweepConfig.to_json` round-trips), and
every combination is validated before any job is queued, so a bad value queues nothing.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class SweepConfig:
    """What `jobs sweep` queues: len(methods) x len(ratios) x len(heal_steps) jobs of one model.

    Example:
        cfg = SweepConfig("smollm2-135m", methods=["saten-aw", "wanda"], ratios=[0.5, 0.8], evaluate=True)
        sweep_id, ids = submit_sweep(cfg)   # 4 jobs; jobs list --sweep <sweep_id>
    """

    model: str
    methods: list[str]
    ratios: list[float]
    heal_steps: list[int] = field(default_factory=lambda: [0])
    evaluate: bool = False
    tokens: int | None = None
    device: str = "auto"
    dtype: str | None = None  # deploy dtype of every plan (None: the plan default)
    time_budget_s: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SweepConfig:
        data = json.loads(text)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown sweep fields: {', '.join(unknown)}")
        return cls(**data)

    def validate(self) -> None:
        """ValueError naming the first bad value; plans are checked one by one in `plans`."""
        for name in ("methods", "ratios", "heal_steps"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"a sweep needs at least one value in {name}, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} repeats a value: {list(values)}")
        for ratio in self.ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        for steps in self.heal_steps:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"heal steps must be integers >= 0, got {steps!r}")

    def plans(self) -> list[Any]:
        """One validated Plan per combination, in (method, ratio, heal_steps) order."""
        from saten_core.plan import Plan

        self.validate()
        extra = {} if self.dtype is None else {"dtype": self.dtype}
        out = []
        for method, ratio, steps in itertools.product(self.methods, self.ratios, self.heal_steps):
            plan = Plan(method=method, target_ratio=float(ratio), heal_steps=steps, **extra)
            try:
                plan.validate()
            except ValueError as exc:
                raise ValueError(f"{method} at ratio {ratio} with {steps} heal steps: {exc}") from None
            out.append(plan)
        return out


def new_sweep_id() -> str:
    """Sortable by creation time, unique across processes: sweep-YYYYmmdd-HHMMSS-xxxx."""
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit_sweep(config: SweepConfig) -> tuple[str, list[int]]:
    """Validate every combination, then queue all of them in one transaction; returns (sweep id, job ids)."""
    from saten_core.jobs import store

    sweep_id = new_sweep_id()
    rows = [store.checked_job(config.model, plan.to_json(), evaluate=config.evaluate, tokens=config.tokens,
                              device=config.device, time_budget_s=config.time_budget_s, sweep=sweep_id)
            for plan in config.plans()]
    return sweep_id, store.insert_jobs(rows)
