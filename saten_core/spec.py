"""LayerSpec: the fully resolved compression settings of one linear layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

METHODS = ("saten", "tt", "svd", "prune", "saten-aw", "svd-w", "wanda", "rtn", "gptq", "sparsegpt", "saten-q")
QUANT_METHODS = ("rtn", "gptq", "saten-q")  # a quantized weight (QuantLinear); saten-q adds a TT + sparse repair
QBASES = ("rtn", "gptq")  # how saten-q quantizes before repairing
STRUCTURES = ("unstructured", "2:4")
GROUPS = ("layer", "row")  # where an unstructured top-k compares scores: the whole layer, or each output row
# Activation-aware methods store exactly what their data-free counterpart stores (same tensors, same bytes);
# only *which* values are chosen depends on the calibration inputs (whitened low-rank part, input-norm-scored mask).
ACTIVATION_AWARE = {"saten-aw": "saten", "svd-w": "svd", "wanda": "prune", "gptq": "rtn", "sparsegpt": "prune"}


def storage_method(method: str) -> str:
    """The data-free method with the same stored layout: saten-aw -> saten, svd-w -> svd, wanda -> prune."""
    return ACTIVATION_AWARE.get(method, method)


def needs_stats(method: str) -> bool:
    """True when compressing with `method` needs calibration input statistics of the layer (saten-q: its repair
    is a whitened TT and an input-norm-scored residual, as in saten-aw)."""
    return method in ACTIVATION_AWARE or method == "saten-q"


def is_quantized(method: str) -> bool:
    """True when the method stores a quantized weight (QuantLinear) rather than a SatenLinear."""
    return method in QUANT_METHODS


@dataclass(frozen=True)
class LayerSpec:
    """What `SatenLinear.from_linear` needs to compress one layer.

    method: saten = TT(W^T) + sparse residual; tt = TT only; svd = truncated SVD (TT of order 1);
    prune = keep `density` of the weights, no low-rank part. Activation-aware variants (need input statistics):
    saten-aw = whitened TT + residual masked by |E| x input norm; svd-w = whitened truncated SVD;
    wanda = keep weights by |W| x input norm.
    """

    method: str = "saten"
    rank: int | None = None  # cap on every TT bond; None -> eps decides (or exact when eps is None)
    eps: float | None = None  # TT-SVD relative error bound
    density: float = 0.0  # fraction of residual (saten) / weight (prune) entries kept
    structure: str = "unstructured"  # or "2:4" along the input dimension
    order: int = 2  # modes per side of the tensorisation
    group: str = "layer"  # unstructured top-k over the whole layer, or the same count in every output row
    fit_rounds: int = 0  # joint fitting after the one-shot split: TT refit on W - S, mask re-chosen on W - TT
    bits: int | None = None  # rtn / gptq / saten-q: bits per quantized weight
    qgroup: int = 64  # inputs per quantization group (0: one group per output row)
    symmetric: bool = False  # symmetric grid (no minimum) or scale + minimum per group
    qbase: str = "rtn"  # saten-q: the quantizer whose error the repair fits (rtn or gptq)
    value_bits: int = 16  # kept sparse values: 16 = at the deploy dtype, or 8 / 4 bits + a scale per 64
    core_bits: int = 16  # TT cores: 16 = at the deploy dtype, or 8 bits + a scale per 64

    def validate(self, in_features: int | None = None, out_features: int | None = None) -> None:
        """Raise ValueError naming the first bad value."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}; expected one of {', '.join(STRUCTURES)}")
        if self.rank is not None and (isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1):
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.eps is not None and not (0.0 <= self.eps < 1.0):
            raise ValueError(f"eps must be in [0, 1), got {self.eps!r}")
        if not (0.0 <= self.density <= 1.0):
            raise ValueError(f"density must be in [0, 1], got {self.density!r}")
        if self.group not in GROUPS:
            raise ValueError(f"unknown group {self.group!r}; expected one of {', '.join(GROUPS)}")
        if self.order < 1:
            raise ValueError(f"order must be >= 1, got {self.order!r}")
        if isinstance(self.fit_rounds, bool) or not isinstance(self.fit_rounds, int) or self.fit_rounds < 0:
            raise ValueError(f"fit_rounds must be an integer >= 0, got {self.fit_rounds!r}")
        if self.qbase not in QBASES:
            raise ValueError(f"unknown qbase {self.qbase!r}; expected one of {', '.join(QBASES)}")
        if is_quantized(self.method):
            self.grid().validate(in_features)
        self._validate_part_bits()
        if in_features is not None and out_features is not None:
            self._validate_shape(in_features, out_features)

    def _validate_part_bits(self) -> None:
        from saten_core.quant.parts import CORE_BITS, VALUE_BITS

        for name, allowed in (("value_bits", VALUE_BITS), ("core_bits", CORE_BITS)):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        if (self.value_bits, self.core_bits) != (16, 16) and self.method in ("rtn", "gptq"):
            raise ValueError(f"value_bits / core_bits quantize Saten's parts; method {self.method!r} has none")

    def grid(self):
        """The quantization grid of a quantizing method (ValueError when bits are missing)."""
        from saten_core.quant.grid import Grid

        if self.bits is None:
            raise ValueError(f"method {self.method} needs bits (2, 3, 4 or 8)")
        return Grid(self.bits, self.qgroup, self.symmetric)

    def _validate_shape(self, in_features: int, out_features: int) -> None:
        max_rank = min(in_features, out_features)
        if self.rank is not None and self.rank > max_rank:
            raise ValueError(
                f"rank {self.rank} exceeds the maximum {max_rank} for a {out_features}x{in_features} layer"
            )
        if self.structure == "2:4" and in_features % 4:
            raise ValueError(f"2:4 structure needs an input width divisible by 4, got {in_features}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LayerSpec field(s): {', '.join(sorted(unknown))}")
        spec = cls(**d)
        spec.validate()
        return spec
