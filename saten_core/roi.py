"""Serving-cost model: turns a run's measured size, speed and quality into replicas, cost and payback."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12
GIB = 1024**3

# Memory of common serving GPUs (GiB) and a typical on-demand cloud price ($/hour). The prices are only the
# default of an input box: the user types their own.
GPU_CATALOG: dict[str, dict[str, float]] = {
    "NVIDIA T4 (16 GB)": {"memory_gib": 16.0, "price_per_hour": 0.53},
    "NVIDIA L4 (24 GB)": {"memory_gib": 24.0, "price_per_hour": 0.80},
    "NVIDIA A10G (24 GB)": {"memory_gib": 24.0, "price_per_hour": 1.01},
    "NVIDIA A100 (40 GB)": {"memory_gib": 40.0, "price_per_hour": 3.67},
    "NVIDIA A100 (80 GB)": {"memory_gib": 80.0, "price_per_hour": 4.10},
    "NVIDIA H100 (80 GB)": {"memory_gib": 80.0, "price_per_hour": 6.98},
}


@dataclass
class RoiInputs:
    """What the business side knows; every field has a unit in its name or comment."""

    gpu: str = "NVIDIA L4 (24 GB)"
    gpu_memory_gib: float = 24.0
    gpu_price_per_hour: float = 0.80  # $/GPU-hour
    requests_per_day: float = 100_000.0
    tokens_per_request: float = 500.0  # prompt + generated tokens
    current_replicas: int = 2  # replicas serving the original model today, sized for the load
    overhead_gib: float = 2.0  # per replica: runtime, activations, KV cache
    engineering_days: float = 10.0  # PoC + rollout effort
    day_rate: float = 800.0  # $/engineer-day
    max_ppl_ratio: float = 1.05  # go/no-go: highest acceptable compressed / original perplexity
    max_payback_months: float = 12.0  # go/no-go: the work must pay for itself within this many months

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value."""
        positive = ("gpu_memory_gib", "gpu_price_per_hour", "requests_per_day", "tokens_per_request")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if int(self.current_replicas) != self.current_replicas or self.current_replicas < 1:
            raise ValueError(f"current_replicas must be an integer >= 1, got {self.current_replicas!r}")
        for name in ("overhead_gib", "engineering_days", "day_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.max_ppl_ratio >= 1:
            raise ValueError(f"max_ppl_ratio must be >= 1 (1 = no quality loss), got {self.max_ppl_ratio!r}")
        if not self.max_payback_months > 0:
            raise ValueError(f"max_payback_months must be > 0, got {self.max_payback_months!r}")


@dataclass
class Measured:
    """Numbers measured on one run and its original model (bytes, seconds per decoded token, perplexity)."""

    bytes_original: int
    bytes_compressed: int
    decode_s_original: float  # seconds per generated token, original model
    decode_s_compressed: float
    ppl_original: float | None = None
    ppl_compressed: float | None = None
    device: str = "cpu"  # where the latency was measured

    def validate(self) -> None:
        """Raise ValueError naming the first impossible measurement."""
        for name in ("bytes_original", "bytes_compressed", "decode_s_original", "decode_s_compressed"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class Deployment:
    """One side of the comparison: what serving a model costs."""

    memory_per_replica_gib: float
    gpus_per_replica: int
    replicas: int
    gpus: int
    monthly_cost: float  # $
    cost_per_million_tokens: float  # $


@dataclass
class RoiResult:
    """Original vs compressed deployment, the saving, the payback and the assumptions behind them."""

    original: Deployment
    compressed: Deployment
    monthly_saving: float  # $, negative when the compressed model costs more
    engineering_cost: float  # $
    payback_months: float | None  # None when there is no saving to pay the work back
    speedup: float  # >1 faster, <1 slower than the original
    size_ratio: float  # compressed bytes / original bytes
    ppl_ratio: float | None
    assumptions: list[str] = field(default_factory=list)
    go: bool = False  # every go/no-go criterion of the inputs holds
    criteria: list[str] = field(default_factory=list)  # one line per criterion: what was asked, what was measured

    def to_dict(self) -> dict:
        return asdict(self)


def monthly_tokens(inputs: RoiInputs) -> float:
    """Tokens served per month at the stated traffic."""
    return inputs.requests_per_day * inputs.tokens_per_request * HOURS_PER_MONTH / 24.0


def deployment(model_bytes: int, replicas: int, inputs: RoiInputs) -> Deployment:
    """Cost of `replicas` copies of a model of `model_bytes`, each on whole GPUs of the chosen type."""
    memory = model_bytes / GIB + inputs.overhead_gib
    gpus_per_replica = max(1, math.ceil(memory / inputs.gpu_memory_gib))
    gpus = replicas * gpus_per_replica
    monthly = gpus * inputs.gpu_price_per_hour * HOURS_PER_MONTH
    per_million = monthly / monthly_tokens(inputs) * 1e6
    return Deployment(memory, gpus_per_replica, replicas, gpus, monthly, per_million)


def replicas_needed(current_replicas: int, speedup: float) -> int:
    """Replicas that give the same throughput when each one runs `speedup` times as fast (at least one)."""
    return max(1, math.ceil(current_replicas / speedup - 1e-9))


def assumptions(inputs: RoiInputs, measured: Measured) -> list[str]:
    """The model's simplifications, spelled out so a reader can challenge them."""
    return [
        f"Today's {inputs.current_replicas} replica(s) are exactly sized for {inputs.requests_per_day:,.0f} "
        f"requests/day x {inputs.tokens_per_request:,.0f} tokens; throughput per replica scales with "
        "1 / measured decode time per token.",
        f"Decode time was measured on {measured.device} at batch 1; on a {inputs.gpu} the ratio between the "
        "two models, not the absolute speed, is what this model carries over.",
        f"Memory per replica = model bytes as stored + {inputs.overhead_gib:g} GiB for runtime, activations "
        "and KV cache; a replica that does not fit one GPU takes several whole GPUs.",
        f"GPUs are billed {HOURS_PER_MONTH:g} hours/month at ${inputs.gpu_price_per_hour:,.2f}/hour, "
        "with no autoscaling, reserved discounts or idle time.",
        f"Engineering cost = {inputs.engineering_days:g} days x ${inputs.day_rate:,.0f}/day, paid once.",
        "Quality is held-out perplexity on the bundled text; check it on your own traffic before rollout.",
    ]


def compute_roi(inputs: RoiInputs, measured: Measured) -> RoiResult:
    """Compare serving the original and the compressed model at the same traffic.

    Example:
        >>> r = compute_roi(RoiInputs(), Measured(4 * GIB, 2 * GIB, 0.02, 0.02))
        >>> r.compressed.memory_per_replica_gib
        4.0
    """
    inputs.validate()
    measured.validate()
    speedup = measured.decode_s_original / measured.decode_s_compressed
    original = deployment(measured.bytes_original, int(inputs.current_replicas), inputs)
    compressed = deployment(measured.bytes_compressed, replicas_needed(int(inputs.current_replicas), speedup), inputs)
    saving = original.monthly_cost - compressed.monthly_cost
    engineering = inputs.engineering_days * inputs.day_rate
    payback = engineering / saving if saving > 0 else None
    ppl_ratio = None
    if measured.ppl_original and measured.ppl_compressed:
        ppl_ratio = measured.ppl_compressed / measured.ppl_original
    go, criteria = decision(inputs, ppl_ratio, payback)
    return RoiResult(original, compressed, saving, engineering, payback, speedup,
                     measured.bytes_compressed / measured.bytes_original, ppl_ratio, assumptions(inputs, measured),
                     go, criteria)


def decision(inputs: RoiInputs, ppl_ratio: float | None, payback_months: float | None) -> tuple[bool, list[str]]:
    """Go / no-go for the PoC: quality within the stated tolerance and the work paid back in time.

    An unmeasured perplexity is a no-go, not a pass: the decision must rest on measured numbers.
    """
    if ppl_ratio is None:
        quality_ok, quality = False, "quality: perplexity not measured (evaluate the run)"
    else:
        quality_ok = ppl_ratio <= inputs.max_ppl_ratio
        quality = (f"quality: perplexity {ppl_ratio:.3f}x the original, limit {inputs.max_ppl_ratio:.3f}x"
                   f" ({'met' if quality_ok else 'MISSED'})")
    money_ok = payback_months is not None and payback_months <= inputs.max_payback_months
    paid = "never (no saving)" if payback_months is None else f"{payback_months:.1f} months"
    money = f"payback: {paid}, limit {inputs.max_payback_months:g} months ({'met' if money_ok else 'MISSED'})"
    return quality_ok and money_ok, [quality, money]


def roi_table(result: RoiResult) -> list[dict]:
    """Rows (metric, original, compressed) ready for a table in the page or the report."""
    o, c = result.original, result.compressed
    return [
        {"metric": "Memory per replica (GiB)", "original": round(o.memory_per_replica_gib, 3),
         "compressed": round(c.memory_per_replica_gib, 3)},
        {"metric": "GPUs per replica", "original": o.gpus_per_replica, "compressed": c.gpus_per_replica},
        {"metric": "Replicas needed", "original": o.replicas, "compressed": c.replicas},
        {"metric": "GPUs", "original": o.gpus, "compressed": c.gpus},
        {"metric": "Monthly cost ($)", "original": round(o.monthly_cost, 2), "compressed": round(c.monthly_cost, 2)},
        {"metric": "Cost per million tokens ($)", "original": round(o.cost_per_million_tokens, 4),
         "compressed": round(c.cost_per_million_tokens, 4)},
    ]


def measured_from_run(run: dict, model_bytes: int | None = None) -> Measured:
    """Measured numbers of one compressed run (a row of charts.runs_frame) and its original.

    Sizes are whole-model: the run's `model_bytes_before` (recorded by jobs since it existed) or, for older
    runs, `model_bytes` (the original's parameter bytes). Everything the plan left alone (embeddings, norms,
    head, unchanged layers) counts on both sides, since a replica holds it all.
    Raises ValueError naming what is missing, e.g. when the original was never timed on that device.
    """
    whole = model_bytes if is_missing(run.get("model_bytes_before")) else int(run["model_bytes_before"])
    if whole is None:
        raise ValueError(f"run {run.get('id')} has no whole-model size: pass model_bytes")
    if (why := missing_measurement(run)) is not None:
        raise ValueError(why)
    other_bytes = int(whole) - int(run["bytes_before"])
    if other_bytes < 0:
        raise ValueError(f"run {run.get('id')}: model bytes {whole} are fewer than its changed layers' "
                         f"{run['bytes_before']}")
    return Measured(bytes_original=int(whole), bytes_compressed=int(run["bytes_after"]) + other_bytes,
                    decode_s_original=float(run["decode_ms_original"]) / 1000.0,
                    decode_s_compressed=float(run["decode_ms"]) / 1000.0,
                    ppl_original=_number(run.get("ppl_original")), ppl_compressed=_number(run.get("ppl")),
                    device=str(run.get("device") or "cpu"))


def missing_measurement(run: dict) -> str | None:
    """Why the ROI cannot be computed from this run (the first measured number it lacks), or None if it can.

    Sizes come with every finished compression; the decode timings only with an evaluated run and a reference
    job on the same device, so an unevaluated run is the usual case.
    """
    for key in ("bytes_before", "bytes_after", "decode_ms", "decode_ms_original"):
        if is_missing(run.get(key)):
            hint = " (run the reference job that times the original model)" if key == "decode_ms_original" else ""
            return f"run {run.get('id')} has no measured {key}{hint}"
    return None


def default_run(runs: list[dict]) -> int:
    """Position of the first run (newest first, as the job store lists them) the ROI can be computed from.

    The page opens on it rather than on the newest run, which may not have been evaluated; 0 when none can.
    """
    return next((i for i, run in enumerate(runs) if missing_measurement(run) is None), 0)


def _number(value: object) -> float | None:
    return None if is_missing(value) else float(value)


def is_missing(value: object) -> bool:
    """None or NaN: how a run row (a pandas frame row) says a number was never measured."""
    return value is None or value != value
