"""Serving-cost model: a run's measured size, speed and quality -> replicas, cost and payback, short and mid term.

Short term is what was measured here (resident memory, side-by-side speed); mid term projects the chosen GPU with
kernels that read only the compressed bytes (decode bound by memory bandwidth, prefill by peak throughput).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from saten_core.deploy.dtype import ITEMSIZE

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12
GIB = 1024**3
SHORT_TERM = "Short term (measured today)"
MID_TERM = "Mid term (projected, kernels that read only the compressed bytes)"
NO_DIFFERENCE = "no measurable difference"

# Memory of common serving GPUs (GiB), a typical on-demand cloud price ($/hour), memory bandwidth (GB/s) and
# dense fp16/bf16 tensor-core peak (TFLOP/s, no sparsity). Approximate datasheet figures: the price and both
# speeds are only the defaults of input boxes, the user types their own.
GPU_CATALOG: dict[str, dict[str, float]] = {
    "NVIDIA T4 (16 GB)": {"memory_gib": 16.0, "price_per_hour": 0.53, "bandwidth_gbs": 320.0, "peak_tflops": 65.0},
    "NVIDIA L4 (24 GB)": {"memory_gib": 24.0, "price_per_hour": 0.80, "bandwidth_gbs": 300.0, "peak_tflops": 121.0},
    "NVIDIA A10G (24 GB)": {"memory_gib": 24.0, "price_per_hour": 1.01, "bandwidth_gbs": 600.0, "peak_tflops": 70.0},
    "NVIDIA A100 (40 GB)": {"memory_gib": 40.0, "price_per_hour": 3.67, "bandwidth_gbs": 1555.0,
                            "peak_tflops": 312.0},
    "NVIDIA A100 (80 GB)": {"memory_gib": 80.0, "price_per_hour": 4.10, "bandwidth_gbs": 2039.0,
                            "peak_tflops": 312.0},
    "NVIDIA H100 SXM (80 GB)": {"memory_gib": 80.0, "price_per_hour": 6.98, "bandwidth_gbs": 3350.0,
                                "peak_tflops": 989.0},
    "NVIDIA H200 (141 GB)": {"memory_gib": 141.0, "price_per_hour": 8.00, "bandwidth_gbs": 4800.0,
                             "peak_tflops": 989.0},
}


@dataclass
class RoiInputs:
    """What the business side knows; every field has a unit in its name or comment."""

    gpu: str = "NVIDIA L4 (24 GB)"
    gpu_memory_gib: float = 24.0
    gpu_price_per_hour: float = 0.80  # $/GPU-hour
    gpu_bandwidth_gbs: float = 300.0  # GB/s of GPU memory bandwidth: bounds mid-term decode
    gpu_peak_tflops: float = 121.0  # dense 16-bit TFLOP/s: bounds mid-term prefill
    requests_per_day: float = 100_000.0
    tokens_per_request: float = 500.0  # prompt + generated tokens
    prompt_share: float = 0.5  # share of tokens_per_request that is prompt (prefilled), the rest is generated
    current_replicas: int = 2  # replicas serving the original model today, sized for the load
    overhead_gib: float = 2.0  # per replica: runtime, activations, KV cache
    engineering_days: float = 10.0  # PoC + rollout effort
    day_rate: float = 800.0  # $/engineer-day
    max_ppl_ratio: float = 1.05  # go/no-go: highest acceptable compressed / original perplexity
    max_payback_months: float = 12.0  # go/no-go: the work must pay for itself within this many months

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value."""
        positive = ("gpu_memory_gib", "gpu_price_per_hour", "gpu_bandwidth_gbs", "gpu_peak_tflops",
                    "requests_per_day", "tokens_per_request")
        _require_positive(self, positive)
        if int(self.current_replicas) != self.current_replicas or self.current_replicas < 1:
            raise ValueError(f"current_replicas must be an integer >= 1, got {self.current_replicas!r}")
        for name in ("overhead_gib", "engineering_days", "day_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.prompt_share <= 1:
            raise ValueError(f"prompt_share must be in [0, 1], got {self.prompt_share!r}")
        if not self.max_ppl_ratio >= 1:
            raise ValueError(f"max_ppl_ratio must be >= 1 (1 = no quality loss), got {self.max_ppl_ratio!r}")
        if not self.max_payback_months > 0:
            raise ValueError(f"max_payback_months must be > 0, got {self.max_payback_months!r}")


_OPTIONAL_POSITIVE = ("decode_s_original", "decode_s_compressed", "resident_bytes_original",
                      "resident_bytes_compressed", "peak_bytes_original", "peak_bytes_compressed", "decode_ratio",
                      "decode_ratio_min", "decode_ratio_max", "ratio_rounds", "changed_bytes_original",
                      "macs_original", "macs_compressed")


@dataclass
class Measured:
    """Numbers measured on one run and its original model; every field after `device` may be unmeasured (None).

    Bytes are whole-model unless named otherwise; a ratio is compressed time / original time (<1 = faster).
    """

    bytes_original: int  # whole model as stored, at the deploy dtype
    bytes_compressed: int
    decode_s_original: float | None = None  # seconds per generated token, original model (reference job)
    decode_s_compressed: float | None = None
    ppl_original: float | None = None
    ppl_compressed: float | None = None
    device: str = "cpu"  # where the latency was measured
    dtype: str | None = None  # deploy dtype; None for runs stored before dtypes existed (float32)
    resident_bytes_original: int | None = None  # every tensor the model holds after a forward
    resident_bytes_compressed: int | None = None
    peak_bytes_original: int | None = None  # measured peak process memory
    peak_bytes_compressed: int | None = None
    decode_ratio: float | None = None  # side by side, median over interleaved rounds in one process
    decode_ratio_min: float | None = None
    decode_ratio_max: float | None = None
    ratio_reference: str | None = None  # dtype of the original the ratio is against
    ratio_rounds: int | None = None
    changed_bytes_original: int | None = None  # the changed block linears, dense, at the deploy dtype
    macs_original: float | None = None  # multiply-adds per token of the changed layers, dense
    macs_compressed: float | None = None  # the same layers compressed: r*(in+out) + nnz

    def validate(self) -> None:
        """Raise ValueError naming the first impossible measurement."""
        _require_positive(self, ("bytes_original", "bytes_compressed"))
        _require_positive(self, _OPTIONAL_POSITIVE, optional=True)
        if self.decode_ratio is None and None in (self.decode_s_original, self.decode_s_compressed):
            raise ValueError("no decode speed measured: need decode_ratio, or decode_s_original and "
                             f"decode_s_compressed (got {self.decode_s_original!r}, {self.decode_s_compressed!r})")
        lo, mid, hi = self.decode_ratio_min, self.decode_ratio, self.decode_ratio_max
        if mid is not None and lo is not None and lo > mid:
            raise ValueError(f"decode_ratio_min {lo!r} is above decode_ratio {mid!r}")
        if mid is not None and hi is not None and hi < mid:
            raise ValueError(f"decode_ratio_max {hi!r} is below decode_ratio {mid!r}")
        if self.dtype is not None and self.dtype not in ITEMSIZE:
            raise ValueError(f"dtype must be one of {', '.join(ITEMSIZE)}, got {self.dtype!r}")
        if self.changed_bytes_original is not None and self.changed_bytes_original > self.bytes_original:
            raise ValueError(f"changed_bytes_original {self.changed_bytes_original} exceeds the whole model's "
                             f"bytes_original {self.bytes_original}")

    @property
    def bytes_per_element(self) -> int:
        """Bytes of one weight at the deploy dtype; runs without a dtype were stored in float32."""
        return ITEMSIZE[self.dtype or "float32"]

    @property
    def ppl_ratio(self) -> float | None:
        if self.ppl_original and self.ppl_compressed:
            return self.ppl_compressed / self.ppl_original
        return None


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
    """Original vs compressed deployment, the saving, the payback and the assumptions behind them (one term)."""

    original: Deployment
    compressed: Deployment
    monthly_saving: float  # $, negative when the compressed model costs more
    engineering_cost: float  # $
    payback_months: float | None  # None when there is no saving to pay the work back
    speedup: float  # >1 faster, <1 slower than the original (1.0 when the measured spread spans 1)
    size_ratio: float  # compressed bytes / original bytes, whole model as stored
    ppl_ratio: float | None
    assumptions: list[str] = field(default_factory=list)
    go: bool = False  # every go/no-go criterion of the inputs holds
    criteria: list[str] = field(default_factory=list)  # one line per criterion: what was asked, what was measured
    speed: str = ""  # the speed in words: "1.25× faster", "no measurable difference", "1.40× SLOWER"
    formulas: list[str] = field(default_factory=list)  # how memory, speed and replicas were computed, with numbers
    term: str = ""  # SHORT_TERM or MID_TERM

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RoiTerms:
    """Both horizons of one run: what runs today (short) and what the method earns with fitting kernels (mid)."""

    short: RoiResult
    mid: RoiResult
    assumptions: list[str] = field(default_factory=list)  # hold for both terms
    notes: list[str] = field(default_factory=list)  # facts a reader must weigh, e.g. the free 16-bit cast

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Estimate:
    """What one term feeds the cost model: bytes per replica on each side and the speed-up, with their reasons."""

    bytes_original: float
    bytes_compressed: float
    speedup: float
    speed: str
    formulas: list[str]
    assumptions: list[str]


def speed_verdict(ratio: float | None, lo: float | None = None, hi: float | None = None) -> str:
    """A time ratio (compressed / original) in words; a min–max spread [lo, hi] that spans 1.0 is no difference.

    Timings on a shared machine move by tens of percent, so a median below 1 whose spread reaches above 1 is
    not a speed-up; saying so keeps noise out of the decision.

    Example:
        >>> speed_verdict(0.8), speed_verdict(0.9, 0.85, 1.05), speed_verdict(1.5, 1.2, 1.7)
        ('1.25× faster', 'no measurable difference', '1.50× SLOWER')
    """
    if is_missing(ratio):
        return "not measured"
    if not ratio > 0:
        raise ValueError(f"a time ratio must be > 0, got {ratio!r}")
    if (not is_missing(lo) and not is_missing(hi) and lo <= 1.0 <= hi) or ratio == 1.0:
        return NO_DIFFERENCE
    return f"{1.0 / ratio:.2f}× faster" if ratio < 1 else f"{ratio:.2f}× SLOWER"


def monthly_tokens(inputs: RoiInputs) -> float:
    """Tokens served per month at the stated traffic."""
    return inputs.requests_per_day * inputs.tokens_per_request * HOURS_PER_MONTH / 24.0


def deployment(model_bytes: float, replicas: int, inputs: RoiInputs) -> Deployment:
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


def common_assumptions(inputs: RoiInputs) -> list[str]:
    """The simplifications both terms share, spelled out so a reader can challenge them."""
    return [
        f"Today's {inputs.current_replicas} replica(s) are exactly sized for {inputs.requests_per_day:,.0f} "
        f"requests/day x {inputs.tokens_per_request:,.0f} tokens; throughput per replica scales with the speed-up.",
        f"Each replica needs {inputs.overhead_gib:g} GiB on top of the model for runtime, activations and KV "
        "cache; a replica that does not fit one GPU takes several whole GPUs.",
        f"GPUs are billed {HOURS_PER_MONTH:g} hours/month at ${inputs.gpu_price_per_hour:,.2f}/hour, "
        "with no autoscaling, reserved discounts or idle time.",
        f"Engineering cost = {inputs.engineering_days:g} days x ${inputs.day_rate:,.0f}/day, paid once.",
        "Quality is held-out perplexity on the bundled text; check it on your own traffic before rollout.",
    ]


def _gib(n: float) -> str:
    return f"{n / GIB:,.3f} GiB"


def _memory_sum(bytes_original: float, bytes_compressed: float, overhead_gib: float) -> str:
    """'original 0.977 + 2 = 2.977 GiB, compressed ...': the sum behind a memory-per-replica figure."""
    return ", ".join(f"{side} {n / GIB:,.3f} + {overhead_gib:g} = {n / GIB + overhead_gib:,.3f} GiB"
                     for side, n in (("original", bytes_original), ("compressed", bytes_compressed)))


def short_estimate(inputs: RoiInputs, m: Measured) -> _Estimate:
    """Short term: the resident memory and side-by-side speed measured here; older runs fall back and say so."""
    bytes_o, bytes_c, memory_lines, memory_notes = _resident_memory(inputs, m)
    speedup, speed, speed_lines, speed_notes = _measured_speed(inputs, m)
    return _Estimate(bytes_o, bytes_c, speedup, speed, memory_lines + speed_lines, memory_notes + speed_notes)


def _resident_memory(inputs: RoiInputs, m: Measured) -> tuple[int, int, list[str], list[str]]:
    if m.resident_bytes_original and m.resident_bytes_compressed:
        o, c = m.resident_bytes_original, m.resident_bytes_compressed
        line = ("memory per replica = resident bytes after a forward (every tensor the model holds) + overhead: "
                + _memory_sum(o, c, inputs.overhead_gib))
        notes = []
        if m.peak_bytes_original and m.peak_bytes_compressed:
            notes.append(f"Peak process memory while evaluating on {m.device}: original {_gib(m.peak_bytes_original)}, "
                         f"compressed {_gib(m.peak_bytes_compressed)} (it includes the runtime the overhead covers).")
        return o, c, [line], notes
    line = "memory per replica = model bytes as stored + overhead: " + _memory_sum(
        m.bytes_original, m.bytes_compressed, inputs.overhead_gib)
    note = ("This run has no resident-memory measurement (recorded before it existed): memory per replica counts "
            "the stored bytes, which undercounts a model that keeps dense copies of its weights at inference.")
    return m.bytes_original, m.bytes_compressed, [line], [note]


def _measured_speed(inputs: RoiInputs, m: Measured) -> tuple[float, str, list[str], list[str]]:
    if m.decode_ratio is None:
        speedup = m.decode_s_original / m.decode_s_compressed
        line = (f"speedup = original / compressed decode time per token = {m.decode_s_original * 1e3:.2f} ms / "
                f"{m.decode_s_compressed * 1e3:.2f} ms = {speedup:.2f}")
        notes = ["This run has no side-by-side speed ratio: its speed divides the decode times of two jobs run at "
                 "different moments (this run and the reference job), which move by tens of percent on a shared "
                 "machine.",
                 f"Decode time was measured on {m.device} at batch 1; on a {inputs.gpu} the ratio between the two "
                 "models, not the absolute speed, is what this carries over."]
        return speedup, speed_verdict(1.0 / speedup), [line], notes
    r, lo, hi = m.decode_ratio, m.decode_ratio_min, m.decode_ratio_max
    verdict = speed_verdict(r, lo, hi)
    spread = "" if lo is None or hi is None else f", min–max {lo:.3f}–{hi:.3f}"
    rounds = f" over {m.ratio_rounds} interleaved rounds" if m.ratio_rounds else " over interleaved rounds"
    if verdict == NO_DIFFERENCE:
        speedup, line = 1.0, f"speedup = 1.00: decode_ratio {r:.3f}{spread} spans 1.0 ({NO_DIFFERENCE})"
    else:
        speedup = 1.0 / r
        line = f"speedup = 1 / decode_ratio = 1 / {r:.3f} = {speedup:.2f} (median{rounds}{spread})"
    against = f" against the original in {m.ratio_reference}" if m.ratio_reference else ""
    note = (f"Decode speed was measured side by side in one process on {m.device} at batch 1 (compressed / "
            f"original time per generated token{against}); on a {inputs.gpu} the ratio, not the absolute speed, "
            "is what this carries over.")
    return speedup, verdict, [line], [note]


def mid_estimate(inputs: RoiInputs, m: Measured) -> _Estimate:
    """Mid term: the chosen GPU's roofline with kernels that read only the compressed bytes.

    Decode at batch 1 reads every weight once per token (time = stored bytes / bandwidth); prefill is compute
    bound (time = 2 x multiply-adds / peak). Their mix per token follows the prompt share of the traffic.
    """
    bandwidth, peak, p = inputs.gpu_bandwidth_gbs * 1e9, inputs.gpu_peak_tflops * 1e12, inputs.prompt_share
    macs_o, macs_c, mac_lines, notes = _whole_model_macs(m)
    decode = (m.bytes_original / bandwidth, m.bytes_compressed / bandwidth)  # s per generated token
    prefill = (2 * macs_o / peak, 2 * macs_c / peak)  # s per prompt token
    per_token = [p * pre + (1 - p) * dec for pre, dec in zip(prefill, decode, strict=True)]
    speedup = per_token[0] / per_token[1]
    lines = [
        "memory per replica = model bytes as stored + overhead: "
        + _memory_sum(m.bytes_original, m.bytes_compressed, inputs.overhead_gib),
        f"decode time per generated token = weight bytes read / memory bandwidth ({inputs.gpu_bandwidth_gbs:g} GB/s):"
        f" original {decode[0] * 1e3:.3f} ms, compressed {decode[1] * 1e3:.3f} ms",
        f"prefill time per prompt token = 2 × multiply-adds / peak throughput ({inputs.gpu_peak_tflops:g} TFLOP/s):"
        f" original {prefill[0] * 1e6:.3f} µs, compressed {prefill[1] * 1e6:.3f} µs",
        *mac_lines,
        f"time per token = {p:.2f} × prefill + {1 - p:.2f} × decode (prompt share of the tokens): original "
        f"{per_token[0] * 1e3:.4f} ms, compressed {per_token[1] * 1e3:.4f} ms → speedup {speedup:.2f}",
    ]
    notes = [f"Projected for a {inputs.gpu} with kernels that read only the compressed bytes, which this studio "
             "does not have yet; the short-term column is what runs today.",
             "Batch 1 roofline: decode bound by memory bandwidth, prefill by the dense 16-bit peak; attention over "
             "the context, kernel launches and sparse-index overhead are left out, so this is a ceiling on the gain.",
             *notes]
    return _Estimate(m.bytes_original, m.bytes_compressed, speedup, f"{speed_verdict(1.0 / speedup)} (projected)",
                     lines, notes)


def _whole_model_macs(m: Measured) -> tuple[float, float, list[str], list[str]]:
    """Multiply-adds per token of the whole model (original, compressed), the formula line and any fallback note.

    The changed layers' counts are measured; every other parameter counts as one multiply-add per token, exact
    for linear layers and a tied LM head, an overcount by the embedding table when the head is untied.
    """
    elem, notes = m.bytes_per_element, []
    if m.dtype is None:
        notes.append("This run does not record its deploy dtype: its bytes are read as float32 (4 bytes per "
                     "element), how runs were stored before dtypes existed.")
    if None in (m.macs_original, m.macs_compressed, m.changed_bytes_original):
        line = f"multiply-adds per token ≈ stored bytes / {elem} B per weight (this run recorded no multiply-adds)"
        notes.append("This run recorded no multiply-adds per token: prefill is projected from its bytes.")
        return m.bytes_original / elem, m.bytes_compressed / elem, [line], notes
    rest = (m.bytes_original - m.changed_bytes_original) / elem
    line = (f"multiply-adds per token = changed layers (dense {m.macs_original / 1e6:,.2f} M, compressed "
            f"{m.macs_compressed / 1e6:,.2f} M = r·(in+out) + nnz) + one per other parameter ((model bytes − "
            f"changed bytes) / {elem} B = {rest / 1e6:,.2f} M)")
    return m.macs_original + rest, m.macs_compressed + rest, [line], notes


def price(inputs: RoiInputs, m: Measured, term: str, est: _Estimate) -> RoiResult:
    """Deployments, saving, payback and go/no-go of one term's estimate."""
    current = int(inputs.current_replicas)
    original = deployment(est.bytes_original, current, inputs)
    compressed = deployment(est.bytes_compressed, replicas_needed(current, est.speedup), inputs)
    saving = original.monthly_cost - compressed.monthly_cost
    engineering = inputs.engineering_days * inputs.day_rate
    payback = engineering / saving if saving > 0 else None
    go, criteria = decision(inputs, m.ppl_ratio, payback)
    replicas = f"replicas = ceil({current} today / speedup {est.speedup:.2f}) = {compressed.replicas}"
    return RoiResult(original, compressed, saving, engineering, payback, est.speedup,
                     m.bytes_compressed / m.bytes_original, m.ppl_ratio, est.assumptions, go, criteria, est.speed,
                     [*est.formulas, replicas], term)


def cast_notes(m: Measured) -> list[str]:
    """A float32 run's original halves its bytes by a plain 16-bit cast: the saving compression must beat."""
    if m.dtype != "float32":
        return []
    return [f"This run is stored in float32: a plain cast to bfloat16 already halves the original's bytes for free "
            f"({_gib(m.bytes_original)} → {_gib(m.bytes_original / 2)} as stored), with no retraining; credit the "
            "compression only with what it saves beyond that."]


def compute_roi_terms(inputs: RoiInputs, measured: Measured) -> RoiTerms:
    """Short term (measured here) and mid term (projected on the chosen GPU) of serving the compressed model.

    Example:
        >>> t = compute_roi_terms(RoiInputs(), Measured(4 * GIB, 2 * GIB, decode_ratio=1.1, decode_ratio_min=0.9,
        ...                                             decode_ratio_max=1.3, dtype="bfloat16"))
        >>> t.short.speed, round(t.mid.speedup, 2)
        ('no measurable difference', 2.0)
    """
    inputs.validate()
    measured.validate()
    return RoiTerms(short=price(inputs, measured, SHORT_TERM, short_estimate(inputs, measured)),
                    mid=price(inputs, measured, MID_TERM, mid_estimate(inputs, measured)),
                    assumptions=common_assumptions(inputs), notes=cast_notes(measured))


def compute_roi(inputs: RoiInputs, measured: Measured) -> RoiResult:
    """The short-term comparison alone, with the shared assumptions folded in (what callers got before terms).

    Example:
        >>> r = compute_roi(RoiInputs(), Measured(4 * GIB, 2 * GIB, 0.02, 0.02))
        >>> r.compressed.memory_per_replica_gib
        4.0
    """
    terms = compute_roi_terms(inputs, measured)
    return replace(terms.short, assumptions=[*terms.short.assumptions, *terms.assumptions])


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
    """Measured numbers of one compressed run (a row of charts.runs_frame) and its original, validated.

    Sizes are whole-model: the run's `model_bytes_before` (recorded by jobs since it existed) or, for older
    runs, `model_bytes` (the original's parameter bytes). Everything the plan left alone (embeddings, norms,
    head, unchanged layers) counts on both sides, since a replica holds it all. Resident memory, side-by-side
    ratios, dtype and multiply-adds come along when the run recorded them.
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
    after = _int(run.get("model_bytes_after")) or int(run["bytes_after"]) + other_bytes
    m = Measured(bytes_original=int(whole), bytes_compressed=after,
                 decode_s_original=_seconds(run, "decode_ms_original"), decode_s_compressed=_seconds(run, "decode_ms"),
                 ppl_original=_number(run.get("ppl_original")), ppl_compressed=_number(run.get("ppl")),
                 device=str(run.get("device") or "cpu"), **_deploy_measurements(run))
    m.validate()
    return m


def _deploy_measurements(run: dict) -> dict:
    """The optional Measured fields from a run row (their names in runs_frame differ where the row's are older)."""
    ints = {"resident_bytes_original": "resident_bytes_original", "resident_bytes_compressed": "resident_bytes",
            "peak_bytes_original": "peak_memory_bytes_original", "peak_bytes_compressed": "peak_memory_bytes",
            "ratio_rounds": "ratio_rounds", "changed_bytes_original": "bytes_before"}
    floats = {"decode_ratio": "decode_ratio", "decode_ratio_min": "decode_ratio_min",
              "decode_ratio_max": "decode_ratio_max", "macs_original": "macs_per_token_before",
              "macs_compressed": "macs_per_token_after"}
    out: dict = {field_: _int(run.get(column)) for field_, column in ints.items()}
    out |= {field_: _number(run.get(column)) for field_, column in floats.items()}
    out |= {name: None if is_missing(run.get(name)) else str(run[name]) for name in ("dtype", "ratio_reference")}
    return out


def missing_measurement(run: dict) -> str | None:
    """Why the ROI cannot be computed from this run (the first measured number it lacks), or None if it can.

    Sizes come with every finished compression; the speed with an evaluated run, either as a side-by-side
    ratio or (older runs) as decode times of this run and a reference job on the same device.
    """
    for key in ("bytes_before", "bytes_after"):
        if is_missing(run.get(key)):
            return f"run {run.get('id')} has no measured {key}"
    if not is_missing(run.get("decode_ratio")):
        return None
    for key in ("decode_ms", "decode_ms_original"):
        if is_missing(run.get(key)):
            hint = " (run the reference job that times the original model)" if key == "decode_ms_original" else ""
            return f"run {run.get('id')} has no measured {key}{hint}"
    return None


def default_run(runs: list[dict]) -> int:
    """Position of the first run (newest first, as the job store lists them) the ROI can be computed from.

    The page opens on it rather than on the newest run, which may not have been evaluated; 0 when none can.
    """
    return next((i for i, run in enumerate(runs) if missing_measurement(run) is None), 0)


def _require_positive(obj: object, names: tuple[str, ...], optional: bool = False) -> None:
    """ValueError naming the first of `names` that is not > 0 (None is allowed when `optional`)."""
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if value is None or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _seconds(run: dict, key: str) -> float | None:
    return None if is_missing(run.get(key)) else float(run[key]) / 1000.0


def _int(value: object) -> int | None:
    return None if is_missing(value) else int(value)


def _number(value: object) -> float | None:
    return None if is_missing(value) else float(value)


def is_missing(value: object) -> bool:
    """None or NaN: how a run row (a pandas frame row) says a number was never measured."""
    return value is None or value != value
