"""Plan: one model-wide compression recipe, its JSON round trip, per-layer resolution and the dry run."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from fnmatch import fnmatchcase
from typing import Any

from saten_core.deploy.dtype import DEFAULT_DTYPE, LEGACY_DTYPE, check_dtype
from saten_core.spec import GROUPS, METHODS, QBASES, STRUCTURES, LayerSpec, is_quantized, needs_stats, storage_method

# Calibration tokens by default: more than the widest smollm2 input (1536), so its second moment is full rank
# before damping; 2048 tokens took 14 s on 2 idle CPU cores for all 210 layers, so 4096 take ~30 s
# (docs/benchmarks/activation.md).
CALIB_TOKENS = 4096
# Share of a layer's kept bytes given to the TT part when target_ratio picks rank and density. Measured on 8
# smollm2-135m layers (docs/benchmarks/activation.md): held-out output error falls monotonically as the share
# shrinks from 0.5 to 0.05, for saten-aw and data-free saten, at 80% and 50% bytes (saten-aw median 0.213 ->
# 0.074 at 80%); 0.05 is the smallest share measured and still leaves ranks ~12-22 for healing to train.
LOWRANK_SHARE = 0.05
# The same share for saten-aw with joint fitting (fit_rounds > 0) at budgets up to JOINT_SHARE_MAX_RATIO:
# refitting the TT part to W - S lets a larger TT part pay when the budget is tight (see lowrank_share()).
JOINT_SHARE = 0.2
JOINT_SHARE_MAX_RATIO = 0.65
MASK_GROUPS = ("auto", *GROUPS)  # Plan.mask_group values; "auto" resolves per method in mask_group()
# Joint TT + sparse rounds for saten-aw when the plan leaves fit_rounds unset. 0 (one shot): at 50% of the bytes
# 8 joint rounds beat Wanda before healing (17.19 vs 21.27) but healed worse (14.18 vs 11.45, docs/BENCHMARKS.md).
# With the TT cores frozen during healing (heal_core_lr_scale 0) they heal to 11.51, level with Wanda on 1024
# tokens and behind on 4096 (15.41 vs 14.94), at about 40x the CPU compression time; at 80% they are behind. So
# joint fitting stays opt-in (--fit-rounds N).
FIT_ROUNDS = 0
# saten-q without --bits: the most bits whose quantized weight leaves at least this share of the layer's budget
# to the TT + sparse repair. Measured on minilm-l6 (bench/bench_quant.py, docs/BENCHMARKS.md "Quantization"):
# at 31% of the bytes, shares 0.05 / 0.15 / 0.3 gave embedding similarity 0.963 / 0.855 / 0.855 (a larger share
# drops int4 for int3); at 50%, 25% and 19% 0.05 and 0.15 tied and 0.3 was worse or infeasible.
REPAIR_SHARE = 0.05
QUANT_GROUP = 64  # inputs per quantization group by default: divides every SmolLM2 and MiniLM width
PART_BIT_METHODS = ("saten", "saten-aw", "saten-q")  # methods whose kept values / TT cores may be quantized


@dataclass
class Override:
    """Per-layer exception to the plan, matched by an fnmatch pattern on the layer name.

    Fields left None fall back to the plan. Setting `rank` or `eps` replaces both of the plan's
    (they are two ways of choosing the same low-rank part). `skip=True` keeps the layer dense.
    """

    pattern: str
    rank: int | None = None
    eps: float | None = None
    density: float | None = None
    skip: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the bad value; reuse LayerSpec's checks for the numbers."""
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"override pattern must be a non-empty string, got {self.pattern!r}")
        LayerSpec(rank=self.rank, eps=self.eps, density=0.0 if self.density is None else self.density).validate()


@dataclass
class Plan:
    """A model-wide recipe: which layers to compress and how (resolved per layer by `layer_spec`).

    Example:
        plan = Plan(method="saten", target_ratio=0.8)      # keep 80% of every block linear's bytes
        Plan.from_json(plan.to_json()) == plan               # True
        layer_spec(plan, "model.layers.0.mlp.up_proj", 576, 1536, torch.float32)
    """

    method: str = "saten"  # saten | tt | svd | prune | saten-aw | svd-w | wanda
    dtype: str = DEFAULT_DTYPE  # deploy dtype: the original, the compressed parts and every byte count use it
    materialize: bool = False  # opt-in: evaluate with the dense residual cached (faster here, more memory)
    structure: str = "unstructured"  # or "2:4" (residual / pruning mask along the input dimension)
    rank: int | None = None  # cap on every TT bond (svd: the matrix rank)
    eps: float | None = None  # TT-SVD relative error bound (alternative to rank)
    density: float = 0.0  # fraction of residual (saten) or weight (prune) entries kept
    target_ratio: float | None = None  # fraction of each layer's dense bytes to keep; picks rank/density
    lowrank_share: float | None = None  # saten(-aw) + target_ratio: TT share of kept bytes; None: lowrank_share()
    order: int = 2  # modes per side of the tensorisation (svd always uses 1)
    mask_group: str = "auto"  # unstructured top-k per "layer" or per output "row"; auto: see mask_group()
    fit_rounds: int | None = None  # saten(-aw): joint TT + sparse rounds after the one-shot split; None: fit_rounds()
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    overrides: list[Override] = field(default_factory=list)
    # calibration (activation-aware methods, healing): None -> the bundled calibration split when needed
    calib: str | None = None  # None | "default" | path of a UTF-8 text file
    calib_tokens: int = CALIB_TOKENS  # tokens streamed through the model to collect input statistics
    calib_seq_len: int = 512
    # block-sequential calibration: each block's input statistics come from the already-compressed blocks before
    # it, one block's statistics held at a time (blocks/walk.py); False: all at once, on the original model
    sequential: bool = False
    # healing (distillation fine-tune of TT cores and kept values after compression; 0 steps = off)
    heal_steps: int = 0
    heal_lr: float = 1e-4
    heal_seq_len: int = 256
    heal_batch_size: int = 4
    heal_tokens: int = 16384  # training tokens drawn from the calibration text
    heal_eval_tokens: int = 2048  # held-out calibration tokens that pick the best checkpoint
    heal_eval_every: int = 10
    heal_lm_weight: float = 0.0  # weight of next-token cross-entropy added to the KL loss
    heal_core_lr_scale: float = 1.0  # TT cores heal at heal_lr x this; 0 freezes them (kept values only)
    # quantization (rtn, gptq, saten-q): bits per weight (None: picked by target_ratio), inputs per group
    bits: int | None = None
    quant_group: int = QUANT_GROUP  # 0: one group per output row
    symmetric: bool = False  # symmetric grid, or a 16-bit minimum per group (GGUF Q4_1's layout)
    quant_base: str = "rtn"  # saten-q: the quantizer whose error the repair fits (rtn or gptq)
    repair_share: float | None = None  # saten-q, bits picked: least share of the budget left to the repair
    # quantized Saten parts (saten, saten-aw, saten-q's repair): 16 = at the deploy dtype
    value_bits: int = 16  # kept sparse values: 16, 8 or 4 bits (+ a 16-bit scale per 64 values)
    core_bits: int = 16  # TT cores: 16 or 8 bits (+ a 16-bit scale per 64 numbers)

    def torch_dtype(self) -> Any:
        """The deploy dtype as a torch.dtype (what byte budgets and the saved model use)."""
        from saten_core.deploy.dtype import torch_dtype

        return torch_dtype(self.dtype)

    def needs_calibration(self) -> bool:
        """True when compressing needs a calibration text: an activation-aware method or healing."""
        return needs_stats(self.method) or self.heal_steps > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, s: str) -> Plan:
        """Parse and validate; unknown keys are an error so a typo never silently does nothing."""
        d = json.loads(s)
        if not isinstance(d, dict):
            raise ValueError(f"plan JSON must be an object, got {type(d).__name__}")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        _reject_unknown(d, cls, "plan")
        d = dict(d)
        d.setdefault("fit_rounds", 0)  # plans saved before joint fitting existed were one-shot; they stay so
        d.setdefault("dtype", LEGACY_DTYPE)  # plans saved before the deploy dtype were counted at fp32
        overrides = d.pop("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
            raise ValueError(f"plan overrides must be a list of objects, got {overrides!r}")
        for o in overrides:
            _reject_unknown(o, Override, "override")
        plan = cls(**d, overrides=[Override(**o) for o in overrides])
        plan.validate()
        return plan

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (shape-free checks only)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}; expected one of {', '.join(STRUCTURES)}")
        check_dtype(self.dtype)
        if not isinstance(self.materialize, bool):
            raise ValueError(f"materialize must be true or false, got {self.materialize!r}")
        LayerSpec(rank=self.rank, eps=self.eps, density=self.density, order=self.order).validate()
        if self.target_ratio is not None:
            if isinstance(self.target_ratio, bool) or not (0.0 < self.target_ratio <= 1.0):
                raise ValueError(f"target_ratio must be in (0, 1], got {self.target_ratio!r}")
            if self.rank is not None or self.eps is not None:
                raise ValueError("target_ratio picks the rank itself; drop rank/eps from the plan (use overrides)")
            if self.density:
                raise ValueError(f"target_ratio picks the density itself; drop density {self.density} from the "
                                 "plan (an override with pattern '*' fixes it)")
        if self.mask_group not in MASK_GROUPS:
            raise ValueError(f"unknown mask_group {self.mask_group!r}; expected one of {', '.join(MASK_GROUPS)}")
        if self.lowrank_share is not None and (isinstance(self.lowrank_share, bool)
                                               or not isinstance(self.lowrank_share, int | float)
                                               or not 0.0 < self.lowrank_share <= 1.0):
            raise ValueError(f"lowrank_share must be in (0, 1], got {self.lowrank_share!r}")
        self._validate_quantization()
        if self.fit_rounds is not None:
            _check_int("fit_rounds", self.fit_rounds, 0)
            if self.fit_rounds and storage_method(self.method) != "saten":
                raise ValueError(f"fit_rounds {self.fit_rounds} needs a TT part and a sparse part (saten, saten-aw); "
                                 f"method {self.method!r} has not both")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"{name} must be a list of patterns, got {patterns!r}")
        for o in self.overrides:
            if not isinstance(o, Override):
                raise ValueError(f"override must be an Override, got {o!r}")
            o.validate()
        self._validate_calibration()

    def _validate_quantization(self) -> None:
        """Grid fields are checked for every plan; bits belong to the quantizing methods only."""
        from saten_core.quant.grid import Grid

        if self.quant_base not in QBASES:
            raise ValueError(f"unknown quant_base {self.quant_base!r}; expected one of {', '.join(QBASES)}")
        if self.repair_share is not None and (isinstance(self.repair_share, bool)
                                              or not isinstance(self.repair_share, int | float)
                                              or not 0.0 < self.repair_share < 1.0):
            raise ValueError(f"repair_share must be in (0, 1), got {self.repair_share!r}")
        Grid(8 if self.bits is None else self.bits, self.quant_group, self.symmetric).validate()
        if self.bits is not None and not is_quantized(self.method):
            raise ValueError(f"bits {self.bits} apply to the quantizing methods (rtn, gptq, saten-q), "
                             f"not to {self.method!r}")
        LayerSpec(value_bits=self.value_bits, core_bits=self.core_bits).validate()
        if (self.value_bits, self.core_bits) != (16, 16) and self.method not in PART_BIT_METHODS:
            raise ValueError(f"value_bits {self.value_bits} / core_bits {self.core_bits} quantize Saten's kept values "
                             f"and TT cores ({', '.join(PART_BIT_METHODS)}), not method {self.method!r}")
        if self.method in ("rtn", "gptq") and self.bits is None and self.target_ratio is None:
            raise ValueError(f"method {self.method} needs bits (2, 3, 4 or 8) or a target_ratio that picks them")

    def _validate_calibration(self) -> None:
        """Shape-free checks of the calibration / healing fields (HealConfig gets the same numbers)."""
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be true or false, got {self.sequential!r}")
        if self.calib is not None and (not isinstance(self.calib, str) or not self.calib.strip()):
            raise ValueError(f"calib must be 'default' or a text file path, got {self.calib!r}")
        for name in ("calib_tokens", "calib_seq_len", "heal_seq_len", "heal_batch_size", "heal_tokens",
                     "heal_eval_tokens", "heal_eval_every"):
            _check_int(name, getattr(self, name), 1)
        _check_int("heal_steps", self.heal_steps, 0)
        _check_number("heal_lr", self.heal_lr, positive=True)
        _check_number("heal_lm_weight", self.heal_lm_weight, positive=False)
        _check_number("heal_core_lr_scale", self.heal_core_lr_scale, positive=False)
        if self.heal_steps and self.heal_core_lr_scale == 0 and storage_method(self.method) in ("tt", "svd"):
            raise ValueError(f"heal_core_lr_scale 0 freezes the TT cores, and {self.method} keeps nothing else: "
                             "nothing would heal (use a scale > 0 or heal_steps 0)")


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    """A real number (not a bool) that is > 0 (`positive`) or >= 0; NaN fails both."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be {'>' if positive else '>='} 0, got {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _reject_unknown(d: dict, cls: type, what: str) -> None:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} key(s): {', '.join(sorted(unknown))}")


def selected(plan: Plan, name: str) -> bool:
    """True when `name` matches an include pattern and no exclude pattern."""
    return any(fnmatchcase(name, p) for p in plan.include) and not any(fnmatchcase(name, p) for p in plan.exclude)


def matching_override(plan: Plan, name: str) -> Override | None:
    """The last override whose pattern matches `name` (later entries win)."""
    hits = [o for o in plan.overrides if fnmatchcase(name, o.pattern)]
    return hits[-1] if hits else None


def layer_spec(plan: Plan, name: str, in_features: int, out_features: int, dtype: Any = None) -> LayerSpec | None:
    """Resolve the plan for one layer; None means the layer stays a dense nn.Linear.

    Byte budgets are taken at `dtype`, by default the plan's deploy dtype (what the model is served in).

    Raises ValueError (naming the layer) when the resolved settings do not fit its shape or budget.
    """
    if not selected(plan, name):
        return None
    override = matching_override(plan, name)
    if override is not None and override.skip:
        return None
    base = _base_spec(plan, override)
    dtype = plan.torch_dtype() if dtype is None else dtype
    try:
        spec = base
        if plan.target_ratio is not None:
            spec = _fit_budget(plan, base, override, in_features, out_features, dtype)
        spec.validate(in_features, out_features)
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from None
    return spec


def _base_spec(plan: Plan, override: Override | None) -> LayerSpec:
    """Plan values with the override's non-None fields applied, method semantics normalised."""
    rank, eps, density = plan.rank, plan.eps, plan.density
    if override is not None:
        if override.rank is not None or override.eps is not None:
            rank, eps = override.rank, override.eps
        if override.density is not None:
            density = override.density
    kind = storage_method(plan.method)  # activation-aware methods store what their data-free twin stores
    order = 1 if kind == "svd" else plan.order
    if kind in ("tt", "svd"):
        density = 0.0
    if kind == "prune":
        rank, eps = None, None
    if kind == "rtn":
        rank, eps, density = None, None, 0.0
    if plan.structure == "2:4" and kind in ("saten", "prune", "saten-q"):
        density = 0.5
    return LayerSpec(method=plan.method, rank=rank, eps=eps, density=density, structure=plan.structure, order=order,
                     group=mask_group(plan), fit_rounds=fit_rounds(plan), bits=plan.bits,
                     qgroup=plan.quant_group, symmetric=plan.symmetric, qbase=plan.quant_base,
                     value_bits=plan.value_bits, core_bits=plan.core_bits)


def lowrank_share(plan: Plan) -> float:
    """The TT part's share of a layer's kept bytes: the plan's, else a measured default.

    Why two defaults: one-shot splits measured best at the smallest share (LOWRANK_SHARE) at 80% and 50% of the
    bytes. Jointly fitted saten-aw measured best at 0.2 at 50% of the bytes. There its held-out output error was
    below Wanda's on 6 of 9 layers after 5 rounds (every down_proj behind) and on 4 of 5 after 19 rounds (v_proj
    behind). At 80% it was best at 0.05 (bench_joint_fit.py, docs/BENCHMARKS.md). Only those two budgets were
    measured, so the switch sits at their midpoint (JOINT_SHARE_MAX_RATIO).
    """
    if plan.lowrank_share is not None:
        return plan.lowrank_share
    joint = plan.method == "saten-aw" and fit_rounds(plan) > 0
    tight = plan.target_ratio is not None and plan.target_ratio <= JOINT_SHARE_MAX_RATIO
    return JOINT_SHARE if joint and tight else LOWRANK_SHARE


def fit_rounds(plan: Plan) -> int:
    """Joint TT + sparse rounds a plan's layers get: its fit_rounds, else FIT_ROUNDS for saten-aw and 0 otherwise.

    Why 0 for data-free saten: its one-shot split is the Saten paper's rule, and the plan preview and allocator
    predict one-shot errors (issue 3's accuracy was measured that way).
    """
    if plan.fit_rounds is not None:
        return plan.fit_rounds
    return FIT_ROUNDS if plan.method == "saten-aw" else 0


def mask_group(plan: Plan) -> str:
    """The top-k group a plan's layers use: its mask_group, where "auto" is per row for activation-scored masks.

    Why per row for wanda / saten-aw: that is the Wanda paper's comparison group, and on smollm2-135m at 50% of
    the bytes it took Wanda from 27.8 to 21.3 held-out perplexity and allocated saten-aw from 29.4 to 23.2
    (docs/BENCHMARKS.md). Data-free masks keep the per-layer top-k the Saten paper uses. 2:4 has its own groups.
    """
    if plan.structure == "2:4":
        return "layer"
    if plan.mask_group != "auto":
        return plan.mask_group
    return "row" if plan.method in ("wanda", "saten-aw", "sparsegpt", "saten-q") else "layer"


def reference_plan(dtype: str | None = None) -> Plan:
    """A plan that changes no layer: its job measures the original model (at `dtype`, default the deploy
    default) with the same code and token count."""
    return Plan(exclude=["*"], dtype=dtype or DEFAULT_DTYPE)


def baseline_plan(plan: Plan, method: str, ratio: float | None = None) -> Plan:
    """The same byte budget, layers, calibration text and healing with another method: a fair comparison run.

    The budget is `ratio` (budget_ratio of the plan on its model) or else the plan's target_ratio. Per-layer
    rank / eps / density overrides belong to the plan's own method (a per-layer allocation, most often) and are
    dropped, so the baseline spends that budget uniformly; skips stay. The TT share and joint rounds carry over
    only to a method with the same storage (saten <-> saten-aw); the top-k group goes back to `auto`, each
    method's measured default. Raises ValueError when there is no budget to match or the result is not a valid
    plan (e.g. healing with frozen cores on a cores-only method).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    ratio = plan.target_ratio if ratio is None else ratio
    if ratio is None:
        raise ValueError("a comparison at the same bytes needs the plan's byte budget: give its kept ratio "
                         f"(budget_ratio) or a target_ratio; this plan fixes rank {plan.rank}, eps {plan.eps}")
    same_storage = storage_method(method) == storage_method(plan.method)
    sparse = storage_method(method) in ("saten", "prune", "saten-q")
    out = replace(plan, method=method, structure=plan.structure if sparse else "unstructured", target_ratio=ratio,
                  bits=None, value_bits=plan.value_bits if method in PART_BIT_METHODS else 16,
                  core_bits=plan.core_bits if method in PART_BIT_METHODS else 16,
                  rank=None, eps=None, density=0.0, overrides=[o for o in plan.overrides if o.skip],
                  mask_group="auto", lowrank_share=plan.lowrank_share if same_storage else None,
                  fit_rounds=plan.fit_rounds if same_storage else None)
    out = replace(out, calib=plan.calib if out.needs_calibration() else None)
    out.validate()
    return out


def budget_ratio(model: Any, plan: Plan) -> float:
    """Fraction of the changed layers' bytes the plan keeps: the target_ratio at which a baseline spends the same.

    An allocated plan has no target_ratio (its overrides fix every layer) and a fixed rank/density plan never
    had one, so it is measured by a dry run. An error-bound (eps) plan has no bytes before compressing.
    """
    if plan.target_ratio is not None:
        return plan.target_ratio
    rows = [r for r in dry_run(model, plan) if r["changed"]]
    if not rows:
        raise ValueError("the plan changes no layer: there is no budget to compare at")
    if any(r["predicted_bytes"] is None for r in rows):
        raise ValueError("an error-bound (eps) plan has no predicted bytes: compare at a byte target instead")
    return sum(r["predicted_bytes"] for r in rows) / sum(r["bytes_before"] for r in rows)


def model_byte_bounds(model: Any, dtype: Any = None) -> tuple[int, int]:
    """(bytes outside the block linears' weights, dense model bytes): the open range a whole-model target needs.

    Counted at `dtype` (the deploy dtype) when given, else as the model's tensors are stored.
    """
    from saten_core.models import block_linears, parameter_bytes

    total = parameter_bytes(model, dtype)
    linear = sum(dense_weight_bytes(lin.in_features, lin.out_features, dtype or lin.weight.dtype)
                 for _, lin in block_linears(model))
    return total - linear, total


def ratio_for_model_bytes(model: Any, target_bytes: int, dtype: Any = None) -> float:
    """The target_ratio that makes the whole model `target_bytes` (all parameters, tied ones once).

    Why: a deployment budget is a file or memory size, not a fraction of some layers. Embeddings, norms and
    biases stay as they are, so the block linears' weights get target_bytes minus those; allocation then meets
    the result within one layer's granularity and never above it (a uniform plan rounds each layer down).
    Raises ValueError naming target_bytes when it is not above the bytes outside the block linears, or not
    below the dense model's.
    Example:
        >>> ratio_for_model_bytes(load_model("smollm2-135m").model, 400 * 2**20)
    """
    if isinstance(target_bytes, bool) or int(target_bytes) != target_bytes:
        raise ValueError(f"target bytes must be a whole number of bytes, got {target_bytes!r}")
    fixed, total = model_byte_bounds(model, dtype)
    if not fixed < target_bytes < total:
        raise ValueError(f"target bytes {target_bytes:,} must lie between the {fixed:,} B outside the block "
                         f"linears and the dense model's {total:,} B")
    return (target_bytes - fixed) / (total - fixed)


def predicted_model_bytes(model: Any, totals: dict, dtype: Any = None) -> int | None:
    """Whole-model bytes after a plan, from its dry-run totals (None when eps decides the ranks); at `dtype`."""
    from saten_core.models import parameter_bytes, whole_model_bytes

    if totals["predicted_bytes"] is None:
        return None
    return whole_model_bytes(parameter_bytes(model, dtype), totals["bytes_before"], totals["predicted_bytes"])


def dense_weight_bytes(in_features: int, out_features: int, dtype: Any) -> int:
    """Bytes of the dense weight at `dtype` (bias excluded: it is identical before and after)."""
    return in_features * out_features * dtype.itemsize


def _fit_budget(plan: Plan, base: LayerSpec, override: Override | None, n_in: int, n_out: int, dtype) -> LayerSpec:
    """Pick the free rank / density so predict_bytes fits target_ratio * dense bytes (largest that fits)."""
    rank_fixed = override is not None and (override.rank is not None or override.eps is not None)
    density_fixed = (override is not None and override.density is not None) or plan.structure == "2:4"
    if is_quantized(base.method):
        share = REPAIR_SHARE if plan.repair_share is None else plan.repair_share
        return _fit_quant(base, plan.target_ratio, lowrank_share(plan), share, rank_fixed, density_fixed, n_in,
                          n_out, dtype)
    return _fit_cached(base, plan.target_ratio, lowrank_share(plan), rank_fixed, density_fixed, n_in, n_out, dtype)


@functools.lru_cache(maxsize=4096)
def _fit_quant(base: LayerSpec, ratio: float, share: float, repair_share: float, rank_fixed: bool,
               density_fixed: bool, n_in: int, n_out: int, dtype) -> LayerSpec:
    """rtn / gptq: the most bits that fit (or the given bits, checked). saten-q: bits leaving `repair_share` of
    the budget (or the given bits), then the repair's TT rank on `share` of what is left, density on the rest."""
    from saten_core.quant.grid import BITS, Grid, quant_bytes

    budget = int(ratio * dense_weight_bytes(n_in, n_out, dtype))
    if base.bits is None:
        room = budget if base.method != "saten-q" else int((1 - repair_share) * budget)
        fits = [b for b in BITS if quant_bytes(n_in, n_out, Grid(b, base.qgroup, base.symmetric), dtype.itemsize)
                <= room]
        if not fits:
            raise ValueError(f"target_ratio {ratio} is too small for {base.method}: even 2-bit codes with their "
                             f"scales exceed {room} bytes")
        base = replace(base, bits=max(fits))
    if base.method != "saten-q" or (rank_fixed and density_fixed):
        return _check_fits(base, budget, n_in, n_out, dtype, ratio)
    if rank_fixed:
        return _largest_density(base, budget, n_in, n_out, dtype, ratio)
    if density_fixed:
        return _largest_rank(base, budget, n_in, n_out, dtype, ratio)
    left = budget - quant_bytes(n_in, n_out, base.grid(), dtype.itemsize)
    tt_budget = budget - left + int(share * left)
    try:
        tt = _largest_rank(replace(base, density=0.0), tt_budget, n_in, n_out, dtype, ratio)
    except ValueError:  # a small layer: its share cannot buy rank 1; rank 1 if the whole budget can
        tt = _largest_rank(replace(base, density=0.0), budget, n_in, n_out, dtype, ratio)
        tt = replace(tt, rank=1)
    return _largest_density(replace(base, rank=tt.rank), budget, n_in, n_out, dtype, ratio)


@functools.lru_cache(maxsize=4096)
def _fit_cached(base: LayerSpec, ratio: float, share: float, rank_fixed: bool, density_fixed: bool,
                n_in: int, n_out: int, dtype) -> LayerSpec:
    """Memoised by value: a model repeats a handful of shapes, so 210 layers cost ~7 searches."""
    budget = int(ratio * dense_weight_bytes(n_in, n_out, dtype))
    kind = storage_method(base.method)
    if kind in ("svd", "tt"):
        return base if rank_fixed else _largest_rank(base, budget, n_in, n_out, dtype, ratio)
    if kind == "prune":
        if density_fixed:
            return _check_fits(base, budget, n_in, n_out, dtype, ratio)
        return _largest_density(base, budget, n_in, n_out, dtype, ratio)
    if rank_fixed and density_fixed:
        return _check_fits(base, budget, n_in, n_out, dtype, ratio)
    if rank_fixed:
        return _largest_density(base, budget, n_in, n_out, dtype, ratio)
    if density_fixed:
        return _largest_rank(base, budget, n_in, n_out, dtype, ratio)
    # saten, both free: the TT part gets `share` of the budget, the residual fills the rest
    tt = _largest_rank(replace(base, method="tt", density=0.0), int(share * budget), n_in, n_out, dtype, ratio)
    return _largest_density(replace(base, rank=tt.rank), budget, n_in, n_out, dtype, ratio)


def _predict(spec: LayerSpec, n_in: int, n_out: int, dtype) -> int:
    from saten_core.layer import predict_bytes

    got = predict_bytes(n_in, n_out, spec, dtype)
    if got is None:
        raise ValueError(f"eps {spec.eps!r} decides the rank, so bytes cannot be predicted for target_ratio")
    return got


def _largest_feasible(lo: int, hi: int, fits) -> int | None:
    """Largest k in [lo, hi] with fits(k) true, assuming fits is monotone (true then false); None if none."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _max_useful_rank(spec: LayerSpec, n_in: int, n_out: int) -> int:
    """Largest rank cap that still changes something: the biggest exact bond of the tensorisation."""
    from saten_core.tensorize import tensorized_shape
    from saten_core.tt import capped_ranks

    in_modes, out_modes = tensorized_shape(n_in, n_out, spec.order)
    return max(1, max(capped_ranks(in_modes + out_modes, None)))


def _largest_rank(spec: LayerSpec, budget: int, n_in: int, n_out: int, dtype, ratio: float) -> LayerSpec:
    hi = min(_max_useful_rank(spec, n_in, n_out), n_in, n_out)
    rank = _largest_feasible(1, hi, lambda r: _predict(replace(spec, rank=r), n_in, n_out, dtype) <= budget)
    if rank is None:
        raise ValueError(f"target_ratio {ratio} is too small: even rank 1 ({spec.method}, density "
                         f"{spec.density}, {spec.structure}) exceeds {budget} bytes{_hint_2_4(spec)}")
    return replace(spec, rank=rank, eps=None)


def _largest_density(spec: LayerSpec, budget: int, n_in: int, n_out: int, dtype, ratio: float) -> LayerSpec:
    numel = n_in * n_out
    nnz = _largest_feasible(0, numel, lambda k: _predict(replace(spec, density=k / numel), n_in, n_out, dtype)
                            <= budget)
    if nnz is None:
        raise ValueError(f"target_ratio {ratio} is too small for {spec.method} at rank {spec.rank}: "
                         f"the low-rank part alone exceeds {budget} bytes")
    return replace(spec, density=nnz / numel)


def _check_fits(spec: LayerSpec, budget: int, n_in: int, n_out: int, dtype, ratio: float) -> LayerSpec:
    got = _predict(spec, n_in, n_out, dtype)
    if got > budget:
        raise ValueError(f"target_ratio {ratio} cannot be met with {spec.structure} {spec.method}: "
                         f"needs {got} bytes > budget {budget}{_hint_2_4(spec)}")
    return spec


def _hint_2_4(spec: LayerSpec) -> str:
    """2:4 keeps half the entries plus metadata, so no target below ~50% of a layer can be met."""
    return " (2:4 can never go below ~50% of a layer)" if spec.structure == "2:4" else ""


def dry_run(model: Any, plan: Plan) -> list[dict]:
    """One row per block linear: what the plan would do, with exact predicted bytes; the model is untouched."""
    from torch import nn

    from saten_core.models import block_linears

    plan.validate()  # layers already compressed are not rows: a plan applies to dense layers only
    return [_dry_row(plan, name, lin) for name, lin in block_linears(model) if isinstance(lin, nn.Linear)]


def _dry_row(plan: Plan, name: str, lin: Any) -> dict:
    dtype = plan.torch_dtype()  # bytes as served, whatever dtype the model was loaded in
    spec = layer_spec(plan, name, lin.in_features, lin.out_features, dtype)
    bias = lin.bias.numel() * dtype.itemsize if lin.bias is not None else 0
    before = dense_weight_bytes(lin.in_features, lin.out_features, dtype) + bias
    predicted = before
    if spec is not None:
        weight = _predict_or_none(spec, lin.in_features, lin.out_features, dtype)
        predicted = None if weight is None else weight + bias
    return {"name": name, "shape": [lin.out_features, lin.in_features], "changed": spec is not None,
            "spec": None if spec is None else spec.to_dict(), "bytes_before": before, "predicted_bytes": predicted}


def _predict_or_none(spec: LayerSpec, n_in: int, n_out: int, dtype) -> int | None:
    from saten_core.layer import predict_bytes

    return predict_bytes(n_in, n_out, spec, dtype)


def dry_run_totals(rows: list[dict]) -> dict:
    """Sum a dry run: layers changed, bytes before, predicted bytes (None if any layer is eps-driven)."""
    predicted = [r["predicted_bytes"] for r in rows]
    return {"layers": len(rows), "layers_changed": sum(r["changed"] for r in rows),
            "bytes_before": sum(r["bytes_before"] for r in rows),
            "predicted_bytes": None if any(p is None for p in predicted) else sum(predicted)}
