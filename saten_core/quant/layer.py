"""QuantLinear: a weight quantized on a grid (rtn, gptq), optionally repaired by a TT + sparse part (saten-q).

Resident form is compact: the packed codes, 16-bit scales (and minimums), the repair's own compact parts and
the bias. A call dequantizes the weight for that call only (fused kernels may come later), so memory between
calls is what is stored, and the speed a user sees is what this path costs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from saten_core.deploy.dtype import bytes_at, compute_dtype, dtype_name
from saten_core.quant.grid import Grid, dequantize, pack, quant_bytes, round_to_nearest, unpack
from saten_core.spec import LayerSpec, is_quantized


def repair_spec(spec: LayerSpec) -> LayerSpec | None:
    """The saten-aw spec of saten-q's repair (None for rtn / gptq, or when the budget leaves it empty)."""
    if spec.method != "saten-q" or (spec.rank is None and spec.eps is None and spec.density == 0):
        return None
    return replace(spec, method="saten-aw", bits=None)


def predict_quant_bytes(in_features: int, out_features: int, spec: LayerSpec, dtype: torch.dtype) -> int | None:
    """Exact stored bytes of QuantLinear.from_linear (bias excluded); None when eps decides the repair's rank."""
    from saten_core.layer import predict_bytes

    total = quant_bytes(in_features, out_features, spec.grid(), torch.empty((), dtype=dtype).element_size())
    repair = repair_spec(spec)
    if repair is None:
        return total
    extra = predict_bytes(in_features, out_features, repair, dtype)
    return None if extra is None else total + extra


class QuantLinear(nn.Module):
    """y = x (Q + TT + S)^T + b: Q dequantized from packed codes; TT + S the optional repair (a SatenLinear).

    Buffers: `codes` (uint8 stream, `bits` per weight). Parameters: `scales`, `mins` (16-bit per group; `mins`
    empty for a symmetric grid; trainable: healing may tune them with the codes fixed), `bias`.
    """

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, *, bias: bool,
                 repair_layout: dict | None = None, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if not is_quantized(spec.method):
            raise ValueError(f"QuantLinear stores rtn, gptq or saten-q layers, got method {spec.method!r}")
        spec.validate(in_features, out_features)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.grid: Grid = spec.grid()
        groups = (out_features, in_features // self.grid.group_size(in_features))
        kw = {"dtype": dtype, "device": device}
        numel = in_features * out_features
        self.register_buffer("codes", torch.empty(-(-numel // 8) * self.grid.bits, dtype=torch.uint8, device=device))
        self.scales = nn.Parameter(torch.empty(groups, **kw))
        self.mins = nn.Parameter(torch.empty(groups if not self.grid.symmetric else (0,), **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.repair = None
        if repair_layout is not None:
            from saten_core.layer import SatenLinear

            self.repair = SatenLinear.from_layout(repair_layout, device=device)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LayerSpec, *, stats=None,
                    dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantize `linear` by spec.method: rtn (no data), gptq (needs `stats`), saten-q (needs `stats`).

        `dtype` is the deploy dtype the scales are rounded to (16-bit; fp32 deploys keep bf16 scales too, as
        torchao does) and the repair's parts are fitted for.
        Example:
            >>> layer = QuantLinear.from_linear(nn.Linear(64, 32), LayerSpec(method="rtn", bits=4, qgroup=32))
            >>> layer(torch.randn(2, 64)).shape
            torch.Size([2, 32])
        """
        in_f, out_f = linear.in_features, linear.out_features
        spec.validate(in_f, out_f)
        w = linear.weight.detach()
        scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        codes, scales, mins = _quantize(w.float(), spec, stats, scale_dtype)
        repair = _fit_repair(w.float() - dequantize(codes, spec.grid(), scales, mins), spec, stats, dtype or w.dtype)
        layer = cls(in_f, out_f, spec, bias=linear.bias is not None,
                    repair_layout=None if repair is None else repair.layout(), dtype=w.dtype, device=w.device)
        with torch.no_grad():
            layer.codes.copy_(pack(codes, spec.bits))
            layer.scales.copy_(scales)
            if mins is not None:
                layer.mins.copy_(mins)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        if repair is not None:
            layer.repair = repair.to(w.dtype)
        return layer

    # ---- layout / accounting ------------------------------------------------------------------------
    def layout(self) -> dict:
        """JSON-able skeleton description (`from_layout` rebuilds it for load_state_dict); `ranks` / `nnz` are the
        repair's (None without one), so reports read every layer kind alike."""
        repair = None if self.repair is None else self.repair.layout()
        return {"kind": "quant", "in_features": self.in_features, "out_features": self.out_features,
                "spec": self.spec.to_dict(), "bias": self.bias is not None, "dtype": dtype_name(self.scales.dtype),
                "repair": repair, "ranks": repair and repair["ranks"], "nnz": repair and repair["nnz"]}

    @classmethod
    def from_layout(cls, layout: dict, *, device=None) -> QuantLinear:
        dtype = getattr(torch, layout["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {layout['dtype']!r} in layout")
        return cls(layout["in_features"], layout["out_features"], LayerSpec.from_dict(layout["spec"]),
                   bias=layout["bias"], repair_layout=layout.get("repair"), dtype=dtype, device=device)

    def stored_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Packed codes + scales + minimums (+ the repair's cores, values and mask); bias excluded."""
        return sum(bytes_at(t, dtype) for name, t in self.state_dict().items() if name != "bias")

    def param_count(self) -> int:
        """Numbers stored for the weight: one code per weight, scales, minimums, the repair's numbers."""
        extra = self.repair.param_count() if self.repair is not None else 0
        return self.in_features * self.out_features + self.scales.numel() + self.mins.numel() + extra

    def macs_per_token(self) -> int:
        extra = self.repair.macs_per_token() if self.repair is not None else 0
        return self.in_features * self.out_features + extra

    def rank(self) -> int:
        return self.repair.rank() if self.repair is not None else 0

    def extra_repr(self) -> str:
        g = self.grid
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.spec.method}, "
                f"bits={g.bits}, group={g.group}, symmetric={g.symmetric}")

    # ---- dense views / forward ----------------------------------------------------------------------
    def quantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Q (out, in) at `dtype` (default the scales' dtype), unpacked for this call only."""
        codes = unpack(self.codes, self.grid.bits, self.in_features * self.out_features)
        codes = codes.reshape(self.out_features, self.in_features)
        mins = self.mins if self.mins.numel() else None
        return dequantize(codes, self.grid, self.scales, mins, dtype or self.scales.dtype)

    def to_dense(self) -> Tensor:
        """The equivalent dense weight (out, in), like nn.Linear.weight."""
        w = self.quantized_weight()
        return w if self.repair is None else w + self.repair.to_dense().to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Dequantize Q for this call (in the compute dtype), add the repair's compact path and the bias."""
        cdt = compute_dtype(self.scales.dtype, x.device) if not torch.is_grad_enabled() else self.scales.dtype
        y = F.linear(x.to(cdt), self.quantized_weight(cdt)).to(x.dtype)
        if self.repair is not None:
            y = y + self.repair(x)
        return y if self.bias is None else y + self.bias


def _quantize(w: Tensor, spec: LayerSpec, stats, scale_dtype: torch.dtype) -> tuple:
    """(codes (out, in) uint8, scales, mins): RTN, or GPTQ for gptq and saten-q on a gptq base."""
    grid = spec.grid()
    if spec.method == "gptq" or (spec.method == "saten-q" and spec.qbase == "gptq"):
        if stats is None:
            raise ValueError(f"method {spec.method!r} (qbase {spec.qbase}) needs calibration input statistics")
        from saten_core.quant.obs import gptq

        return gptq(w, stats.xtx, grid, scale_dtype)
    return round_to_nearest(w, grid, scale_dtype)


def _fit_repair(error: Tensor, spec: LayerSpec, stats, dtype: torch.dtype):
    """saten-q's repair: a saten-aw SatenLinear fitted to the quantization error E (out, in), or None."""
    rspec = repair_spec(spec)
    if rspec is None:
        return None
    if stats is None:
        raise ValueError("method 'saten-q' needs calibration input statistics for its repair, got none")
    from saten_core.layer import SatenLinear

    fake = nn.utils.skip_init(nn.Linear, error.shape[1], error.shape[0], bias=False, device=error.device)
    fake.weight = nn.Parameter(error, requires_grad=False)  # E itself: no random init, no copy
    return SatenLinear.from_linear(fake, rspec, stats=stats, dtype=dtype)
