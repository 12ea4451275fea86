"""SatenLinear: one nn.Module for Saten, TT, truncated SVD and pruning (low-rank TT part + fixed-mask sparse part)."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from saten_core.deploy.dtype import bytes_at, compute_dtype, dtype_name
from saten_core.kernels import dispatch
from saten_core.kernels.format import SparseRows, as_bitmask, sparse_rows, tile_offsets
from saten_core.quant.grid import packed_bytes
from saten_core.quant.parts import dequantize_part, fake_quantize, part_bytes, part_groups, quantize_part
from saten_core.sparse import (
    mask_bytes,
    nm_mask,
    pack_mask,
    packed_dtype,
    packed_numel,
    scatter_values,
    topk_mask,
    unpack_mask,
)
from saten_core.spec import LayerSpec, is_quantized, needs_stats, storage_method
from saten_core.tensorize import tensorize, tensorized_shape
from saten_core.tt import capped_ranks, tt_factor_pair, tt_param_count, tt_svd
from saten_core.whiten import Whitening, output_error, whitened_tt

SPARSE_PATHS = ("auto", "dense", "csr", "gather")
# Sparse-term rule measured by bench/bench_layer.py on CPU, fp32 (docs/benchmarks/maths.md): at 512 tokens torch
# CSR took 0.18-0.75x of the dense layer's time at density <= 0.05 on both 576x1536 and 1536x576, but 0.63x / 1.89x
# at 0.1 and 2-12x above; a matmul with a cached dense residual costs ~1x dense at any density. The index gather
# lost everywhere (1.7-66x), so auto never picks it. Off CPU (and for fp16/bf16) the dense residual is used.
CSR_MAX_DENSITY = 0.05
GATHER_MAX_WORK = 0  # tokens * nnz at or below which auto uses the index gather (0: never, it lost every case)


def _has_lowrank(method: str) -> bool:
    return storage_method(method) != "prune"


def _has_sparse(spec: LayerSpec) -> bool:
    """Whether the method keeps a sparse part: prune/wanda always, saten(-aw) when density > 0 or 2:4."""
    method = storage_method(spec.method)
    if method == "prune":
        return True
    return method == "saten" and (spec.structure == "2:4" or spec.density > 0)


def _modes(in_features: int, out_features: int, spec: LayerSpec) -> tuple[list[int], list[int]]:
    order = 1 if storage_method(spec.method) == "svd" else spec.order
    return tensorized_shape(in_features, out_features, order)


def kept_entries(in_features: int, out_features: int, spec: LayerSpec) -> int:
    """Sparse entries `from_linear` keeps: half for 2:4, else density of the layer or of every output row."""
    if not _has_sparse(spec):
        return 0
    numel = in_features * out_features
    if spec.structure == "2:4":
        return numel // 2
    if spec.group == "row":
        return out_features * round(spec.density * in_features)
    return round(spec.density * numel)


def predict_bytes(in_features: int, out_features: int, spec: LayerSpec, dtype: torch.dtype) -> int | None:
    """Exact bytes `SatenLinear.from_linear` will store (cores + kept values + mask; bias excluded).

    Returns None when eps decides the TT ranks (they depend on the weights).
    Example:
        >>> predict_bytes(576, 1536, LayerSpec(method="svd", rank=8), torch.float16)
        33792
    """
    spec.validate(in_features, out_features)
    if is_quantized(spec.method):
        from saten_core.quant.layer import predict_quant_bytes

        return predict_quant_bytes(in_features, out_features, spec, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    if _has_lowrank(spec.method):
        if spec.eps is not None:
            return None
        in_modes, out_modes = _modes(in_features, out_features, spec)
        modes = in_modes + out_modes
        total += _core_bytes(modes, capped_ranks(modes, spec.rank), spec.core_bits, elem)
    if _has_sparse(spec):
        nnz = kept_entries(in_features, out_features, spec)
        total += part_bytes(nnz, spec.value_bits, elem) + mask_bytes(in_features * out_features, nnz, spec.structure)
    return total


def _core_bytes(modes: list[int], ranks: list[int], bits: int, elem: int) -> int:
    """Bytes of the TT cores: each core is its own quantized part (codes + a scale per 64 numbers) below 16 bits."""
    if bits == 16:
        return tt_param_count(modes, ranks) * elem
    return sum(part_bytes(ranks[k] * n * ranks[k + 1], bits, elem) for k, n in enumerate(modes))


class SatenLinear(nn.Module):
    """y = x (A B + R)^T + b with A B the pre-contracted TT part and R the fixed-mask sparse residual.

    Parameters: `cores` (TT cores, trainable), `values` (kept residual values in row-major order of the
    (in, out) mask, trainable). Buffer `mask`: the fixed mask, packed (int32 indices, bitmask or 2-bit 2:4
    positions).

    Inference is compact by default (`resident = "compact"`): between calls the layer holds its cores, values,
    packed mask, the factor pair A (in, r), B (r, out) contracted from the cores (cached while the cores are
    unchanged: r (in + out) numbers) and the per-row value offsets (8 bytes per input row). A call runs the
    kernel kernels/dispatch.py picks (`kernel_path`): the compiled CPU or Triton kernels read the bitmask and
    values in place with fp32 accumulation; the "reference" path builds the dense residual for one call.

    `materialize()` switches to the dense-cache path (labelled opt-in, CLI `--materialize`): the dense residual
    (or a CSR copy at density <= CSR_MAX_DENSITY on CPU fp32, or the 2:4 semi-structured operand on CUDA) is
    cached next to the factor pair: faster on this CPU, but it holds more memory than the original layer.
    Training (gradients enabled) always rebuilds R from the values, differentiably.

    Quantized parts (spec.value_bits / core_bits < 16, quant/parts.py): the values are stored as the buffer
    `value_codes` + Parameter `value_scales` and dequantized for each call (resident stays compact); the cores as
    buffers `core_codes_k` + Parameters `core_scales.k`, dequantized when the factor pair is built. Healing then
    tunes the scales with the codes fixed.
    """

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, *, ranks: list[int], nnz: int,
                 mask_format: str | None, bias: bool, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        spec.validate(in_features, out_features)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        in_modes, out_modes = _modes(in_features, out_features, spec) if _has_lowrank(spec.method) else ([], [])
        self.modes, self.n_in_modes, self.ranks = in_modes + out_modes, len(in_modes), list(ranks)
        kw = {"dtype": dtype, "device": device}
        self.nnz, self.value_bits, self.core_bits = int(nnz), spec.value_bits, spec.core_bits
        self._init_cores(kw)
        self._init_values(kw)
        self.mask_format = mask_format
        numel = in_features * out_features
        packed = packed_numel(mask_format, numel, nnz) if mask_format else 0
        self.register_buffer("mask", torch.empty(packed, dtype=packed_dtype(mask_format or "bitmask"), device=device))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.sparse_path = "auto"
        self.resident = "compact"  # or "materialized" (dense residual cached; see materialize())
        self._semi_structured = False
        self.kernel_path = "auto"  # compact inference kernel (kernels/dispatch.py); "reference" forces plain torch
        self._cache: dict = {}

    def _core_shapes(self) -> list[tuple[int, int, int]]:
        return [(self.ranks[k], n, self.ranks[k + 1]) for k, n in enumerate(self.modes)] if self.ranks else []

    def _init_cores(self, kw: dict) -> None:
        shapes = self._core_shapes()
        if self.core_bits == 16:
            self.cores = nn.ParameterList([nn.Parameter(torch.empty(shape, **kw)) for shape in shapes])
            return
        self.cores = nn.ParameterList()
        self.core_scales = nn.ParameterList([nn.Parameter(torch.empty(part_groups(math.prod(shape)), **kw))
                                             for shape in shapes])
        for k, shape in enumerate(shapes):
            codes = torch.empty(packed_bytes(math.prod(shape), self.core_bits), dtype=torch.uint8, device=kw["device"])
            self.register_buffer(f"core_codes_{k}", codes)

    def _init_values(self, kw: dict) -> None:
        if self.value_bits == 16:
            self.values = nn.Parameter(torch.empty(self.nnz, **kw))
            return
        codes = torch.empty(packed_bytes(self.nnz, self.value_bits), dtype=torch.uint8, device=kw["device"])
        self.register_buffer("value_codes", codes)
        self.value_scales = nn.Parameter(torch.empty(part_groups(self.nnz), **kw))

    # ---- stored parts -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The stored floating-point dtype (values, or their scales when quantized)."""
        return self._float_ref().dtype

    def _float_ref(self) -> Tensor:
        return self.values if self.value_bits == 16 else self.value_scales

    def _core_codes(self) -> list[Tensor]:
        return [getattr(self, f"core_codes_{k}") for k in range(len(self.modes))] if self.core_bits < 16 else []

    def tt_cores(self) -> list[Tensor]:
        """The TT cores at the stored dtype (dequantized for this use when core_bits < 16; empty without TT)."""
        if self.core_bits == 16:
            return list(self.cores)
        return [dequantize_part(c, s, self.core_bits, math.prod(shape), self.dtype).reshape(shape)
                for c, s, shape in zip(self._core_codes(), self.core_scales, self._core_shapes(), strict=True)]

    def kept_values(self) -> Tensor:
        """The kept residual values (nnz,) at the stored dtype (dequantized for this use when value_bits < 16)."""
        if self.value_bits == 16:
            return self.values
        return dequantize_part(self.value_codes, self.value_scales, self.value_bits, self.nnz, self.dtype)

    def _trainable(self) -> list[Tensor]:
        cores = list(self.cores) if self.core_bits == 16 else list(self.core_scales)
        return [*cores, self._float_ref()]

    def _part_tensors(self) -> list[Tensor]:
        """Every stored tensor of the weight: the cache keys of everything derived from them."""
        values = [self.values] if self.value_bits == 16 else [self.value_codes, self.value_scales]
        return [*self._core_tensors(), *values, self.mask]

    def _core_tensors(self) -> list[Tensor]:
        return list(self.cores) if self.core_bits == 16 else [*self._core_codes(), *self.core_scales]

    def _load_parts(self, cores: list[Tensor], values: Tensor | None) -> None:
        """Store fitted cores and kept values, quantizing them as the spec says (no_grad, in place)."""
        if self.core_bits == 16:
            for p, g in zip(self.cores, cores, strict=True):
                p.copy_(g)
        else:
            for k, g in enumerate(cores):
                codes, scales = quantize_part(g, self.core_bits, self.dtype)
                getattr(self, f"core_codes_{k}").copy_(codes)
                self.core_scales[k].copy_(scales)
        if values is None:
            return
        if self.value_bits == 16:
            self.values.copy_(values)
        else:
            codes, scales = quantize_part(values, self.value_bits, self.dtype)
            self.value_codes.copy_(codes)
            self.value_scales.copy_(scales)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LayerSpec, *, scores: Tensor | None = None,
                    stats=None, dtype: torch.dtype | None = None) -> SatenLinear:
        """Compress `linear` with `spec`; `scores` (in, out) optionally multiply |residual| to choose the mask.

        `stats` (calibrate.InputStats of this layer's inputs) is required by the activation-aware methods:
        saten-aw / svd-w whiten the low-rank step with it, saten-aw / wanda score the mask by input norms.
        `dtype` (default: the weight's) is the deploy dtype the TT cores are rounded to before the residual is
        taken, so the sparse part corrects that rounding; the layer itself is built at the weight's dtype (the
        working precision of compression and healing) and `model.to(dtype)` later stores what was fitted.
        Example:
            >>> layer = SatenLinear.from_linear(nn.Linear(64, 128), LayerSpec(rank=8, density=0.1))
            >>> layer(torch.randn(2, 64)).shape
            torch.Size([2, 128])
        """
        in_f, out_f = linear.in_features, linear.out_features
        spec.validate(in_f, out_f)
        whiten, scores = _activation_inputs(spec, stats, scores, in_f, out_f)
        if scores is not None and tuple(scores.shape) != (in_f, out_f):
            raise ValueError(f"scores must have shape (in, out) = ({in_f}, {out_f}), got {tuple(scores.shape)}")
        w = linear.weight.detach()
        wt = w.float().mT  # (in, out)
        if spec.method == "sparsegpt":
            cores, residual, mask, fmt, packed = _sparsegpt_fit(w, spec, stats)
        else:
            cores, residual, mask, fmt, packed = cls._fit(wt, in_f, out_f, spec, dtype or w.dtype, whiten, scores)
        layer = cls(in_f, out_f, spec, ranks=[1] + [int(g.shape[-1]) for g in cores] if cores else [],
                    nnz=int(mask.sum()) if mask is not None else 0, mask_format=fmt,
                    bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            layer._load_parts(cores, residual[mask] if mask is not None else None)
            if mask is not None:
                layer.mask.copy_(packed)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @staticmethod
    def _lowrank(wt: Tensor, in_f: int, out_f: int, spec: LayerSpec, dtype: torch.dtype,
                 whiten: Whitening | None = None) -> tuple[list, Tensor]:
        """TT cores (at the stored dtype) and the residual Wt - TT(Wt) seen by the sparse part (float32).

        With `whiten` (L, L L^T = input second moment, and that moment) the TT is chosen for output error
        (whiten.whitened_tt).
        """
        if not _has_lowrank(spec.method):
            return [], wt
        in_modes, out_modes = _modes(in_f, out_f, spec)
        if whiten is None:
            found = tt_svd(tensorize(wt, in_modes, out_modes), eps=spec.eps, max_rank=spec.rank)
        else:
            found = whitened_tt(wt, whiten, in_modes, out_modes, eps=spec.eps, max_rank=spec.rank)
        cores = [g.to(dtype) for g in found]
        stored = [fake_quantize(g, spec.core_bits, dtype).float() for g in cores]  # what from_linear will store
        a, b = tt_factor_pair(stored, len(in_modes))
        return cores, wt - a @ b  # residual against the rounded cores, so the sparse part corrects them too

    @classmethod
    def _fit(cls, wt: Tensor, in_f: int, out_f: int, spec: LayerSpec, dtype: torch.dtype,
             whiten: Whitening | None, scores: Tensor | None) -> tuple:
        """(cores, residual, mask, format, packed): the one-shot split, then `spec.fit_rounds` joint rounds.

        Why: the one-shot TT-SVD spends its rank on large entries that the sparse part keeps anyway. Each round
        refits the TT part to W - S and re-chooses the mask on W - TT (alternating low-rank and sparse fits, as in
        OATS, Zhang & Papyan 2024). The best round by the (whitened) error of TT + S is kept, so the result is never
        worse than one shot on that measure. On smollm2-135m this is what lets saten-aw's TT part pay for its bytes
        (docs/BENCHMARKS.md, "joint TT + sparse fit").
        """
        cores, residual = cls._lowrank(wt, in_f, out_f, spec, dtype, whiten)
        mask, fmt, packed = cls._residual_mask(residual, spec, scores)
        if mask is None or not cores or spec.fit_rounds == 0:
            return cores, residual, mask, fmt, packed
        best = (_fit_error(residual, mask, whiten), cores, residual, mask, fmt, packed)
        for _ in range(spec.fit_rounds):
            sparse = residual * mask
            cores, rest = cls._lowrank(wt - sparse, in_f, out_f, spec, dtype, whiten)
            residual = rest + sparse  # = W - TT, against the new cores
            mask, fmt, packed = cls._residual_mask(residual, spec, scores)
            err = _fit_error(residual, mask, whiten)
            if err < best[0]:
                best = (err, cores, residual, mask, fmt, packed)
        return best[1:]

    @staticmethod
    def _residual_mask(residual: Tensor, spec: LayerSpec, scores: Tensor | None):
        """(mask (in, out) bool, format, packed) for the sparse part, or (None, None, None) without one."""
        if not _has_sparse(spec):
            return None, None, None
        score = residual.abs() if scores is None else residual.abs() * scores.to(residual.device).float()
        mask = nm_mask(score) if spec.structure == "2:4" else topk_mask(score, spec.density, spec.group)
        fmt, packed = pack_mask(mask, spec.structure)
        return mask, fmt, packed

    # ---- layout / skeleton --------------------------------------------------------------------------
    def layout(self) -> dict:
        """JSON-able description from which `from_layout` rebuilds an empty skeleton of the same shapes."""
        return {"in_features": self.in_features, "out_features": self.out_features, "spec": self.spec.to_dict(),
                "modes": list(self.modes), "n_in_modes": self.n_in_modes, "ranks": list(self.ranks),
                "nnz": self.nnz, "mask_format": self.mask_format, "bias": self.bias is not None,
                "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_layout(cls, layout: dict, *, device=None) -> SatenLinear:
        """Empty skeleton (uninitialised tensors) ready for `load_state_dict`."""
        dtype = getattr(torch, layout["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {layout['dtype']!r} in layout")
        spec = LayerSpec.from_dict(layout["spec"])
        return cls(layout["in_features"], layout["out_features"], spec, ranks=layout["ranks"], nnz=layout["nnz"],
                   mask_format=layout["mask_format"], bias=layout["bias"], dtype=dtype, device=device)

    # ---- accounting ---------------------------------------------------------------------------------
    def stored_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every tensor in state_dict except the bias: cores + kept values + packed mask.

        With `dtype`, floating-point tensors count at that dtype (a layer fitted in fp32, served in bf16).
        """
        return sum(bytes_at(t, dtype) for name, t in self.state_dict().items() if name != "bias")

    def param_count(self) -> int:
        """Trainable numbers of the compressed weight: core sizes + kept values (bias excluded)."""
        return sum(math.prod(shape) for shape in self._core_shapes()) + self.nnz

    def rank(self) -> int:
        """Matrix rank r of the low-rank part (the bond between input-side and output-side cores)."""
        return self.ranks[self.n_in_modes] if self.ranks else 0

    def macs_per_token(self) -> int:
        """Multiply-adds per token with a sparse kernel: r*(in + out) for the factor pair + one per kept value."""
        return self.rank() * (self.in_features + self.out_features) + self.nnz

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.spec.method}, "
                f"ranks={self.ranks}, nnz={self.nnz}, structure={self.spec.structure}, "
                f"value_bits={self.value_bits}, core_bits={self.core_bits}")

    # ---- dense views --------------------------------------------------------------------------------
    def _flat_index(self) -> Tensor:
        """Row-major flat positions in (in, out) of the kept values (derived from the packed mask, cached).

        Only the materialized gather path uses it: an int64 per kept value is 4x a 16-bit value, so the compact
        path never keeps it. Built outside torch.inference_mode so a later healing pass may reuse it.
        """
        key = ("index", self.mask.data_ptr(), self.mask._version, self.mask.device)
        if self._cache.get("index_key") != key:
            with torch.inference_mode(False):
                flat = self._mask_flat().nonzero().reshape(-1)
            self._cache.update(index_key=key, index=flat)
        return self._cache["index"]

    def _mask_flat(self) -> Tensor:
        """The boolean mask, flattened row-major over (in, out): built per use, never kept."""
        return unpack_mask(self.mask_format, self.mask, (self.in_features, self.out_features)).reshape(-1)

    def _residual(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dense R (in, out) with the kept values scattered in (differentiable in `values`), at `dtype`."""
        return scatter_values(mask_of(self), self.kept_values(), dtype or self.dtype)

    def _factor_pair(self) -> tuple[Tensor, Tensor]:
        return tt_factor_pair(self.tt_cores(), self.n_in_modes)

    def to_dense(self) -> Tensor:
        """The equivalent dense weight (out, in), like `nn.Linear.weight`."""
        wt = self._residual() if self.nnz or not self.ranks else None
        if self.ranks:
            a, b = self._factor_pair()
            wt = a @ b if wt is None else a @ b + wt
        return wt.mT

    # ---- forward ------------------------------------------------------------------------------------
    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._trainable())

    def _param_key(self) -> tuple:
        """Changes whenever a parameter or the mask is replaced, moved, cast or updated in place."""
        return (self._semi_structured,) + tuple(
            (p.data_ptr(), p._version, p.device, p.dtype) for p in self._part_tensors())

    def _choose_path(self, tokens: int) -> str:
        """The sparse-term implementation for this call (see the class docstring for the measured rule)."""
        if self.sparse_path != "auto":
            return self.sparse_path
        density = self.nnz / (self.in_features * self.out_features)
        if self.mask.device.type != "cpu" or self.dtype not in (torch.float32, torch.float64):
            return "dense"  # CPU CSR matmul has no fp16/bf16 kernel
        if tokens * self.nnz <= GATHER_MAX_WORK:
            return "gather"
        return "csr" if density <= CSR_MAX_DENSITY else "dense"

    def _cached(self, path: str) -> tuple[tuple[Tensor, Tensor] | None, object]:
        """Inference operands (factor pair, sparse operand for `path`), rebuilt only when parameters change.

        Operands of several paths live side by side (prefill and decode may choose different ones).
        """
        key = self._param_key()
        if self._cache.get("key") != key:
            kept = ("index", "pair", "rows", "tiles", "fast")  # the compact path's entries survive
            keep = {k: v for k, v in self._cache.items() if k.startswith(kept)}
            self._cache = keep | {"key": key, "ops": {}, "ab": None}
        with torch.no_grad():
            if self._cache["ab"] is None and self.ranks:
                self._cache["ab"] = self._cached_pair()
            ops = self._cache["ops"]
            if path not in ops:
                ops[path] = self._sparse_operand(path) if self.nnz else None
        return self._cache["ab"], ops[path]

    def _sparse_operand(self, path: str):
        if path == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta": known, measured, chosen anyway
                warnings.simplefilter("ignore", UserWarning)
                return self._residual().mT.contiguous().to_sparse_csr()  # (out, in)
        if path == "gather":
            flat = self._flat_index()
            return flat // self.out_features, flat % self.out_features, self.kept_values().detach()
        r = self._residual()
        if self._semi_structured:
            from torch.sparse import to_sparse_semi_structured

            return to_sparse_semi_structured(r.mT.contiguous())  # (out, in), 2:4 along the input dimension
        return r

    def _sparse_term(self, x2d: Tensor, path: str, operand) -> Tensor:
        if path == "csr":
            return torch.sparse.mm(operand, x2d.mT).mT
        if path == "gather":
            rows, cols, vals = operand
            out = x2d.new_zeros(x2d.shape[0], self.out_features)
            return out.index_add_(1, cols, x2d[:, rows] * vals)
        if self._semi_structured:
            return F.linear(x2d, operand)
        return x2d @ operand

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out): (x A) B + sparse term + bias, without keeping a dense weight."""
        x2d = x.reshape(-1, self.in_features)  # (T, in)
        if self._needs_grad():
            y = self._train_forward(x2d)
        elif self.resident == "compact":
            y = self._compact_forward(x2d)
        else:
            y = self._materialized_forward(x2d)
        if y is None:
            y = x2d.new_zeros(x2d.shape[0], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _compact_forward(self, x2d: Tensor) -> Tensor | None:
        """Inference from the stored format through the kernel the measured rule picks (kernels/dispatch.py).

        No dense residual is kept: the compiled/Triton kernels read the bitmask and values in place, and the
        reference path (`kernel_path = "reference"`, or where no kernel exists) builds it for one call only.
        Per call this costs a few microseconds of Python (decode runs it 210 times per token for SmolLM2): the
        operands are looked up once per parameter change, keyed by the tensors' versions.
        """
        ops = self._compact_operands(x2d.device)
        a, b, rows, cdt = ops
        if rows is None:
            return None if a is None else ((x2d.to(cdt) @ a.to(cdt)) @ b.to(cdt)).to(x2d.dtype)
        path = self.kernel_path
        if path == "auto":
            path = dispatch.choose(x2d.device, x2d.shape[0], self.out_features)
        tiles = self._tile_offsets() if path.startswith("triton") else None
        if self.value_bits < 16:  # dequantized for this call only: between calls the codes are what is held
            rows = replace(rows, values=self.kept_values().detach())
        return dispatch.run(path, x2d, rows, a, b, compute=cdt, tiles=tiles)

    def _compact_operands(self, device: torch.device) -> tuple:
        """(A, B, SparseRows or None, compute dtype), cached until a core, the values or the mask change.

        The key is the (data_ptr, version) of the parameter objects themselves, kept with the operands: cheaper
        than walking the ParameterList every call; _apply (to/cuda/half) drops the cache, load_state_dict bumps.
        """
        fast = self._cache.get("fast")
        if fast is not None and [(t.data_ptr(), t._version) for t in fast[0]] == fast[1]:
            return fast[2]
        a, b = self._cached_pair() if self.ranks else (None, None)
        rows = self._sparse_rows() if self.nnz else None  # may rewrite a 2:4 mask: tensors after it
        tensors = self._part_tensors()
        ops = (a, b, rows, compute_dtype(self.dtype, device))
        self._cache["fast"] = (tensors, [(t.data_ptr(), t._version) for t in tensors], ops)
        return ops

    def _apply(self, fn, recurse=True):
        self._cache = {}  # moved or cast tensors are new objects: every cached operand is stale
        return super()._apply(fn, recurse)

    def _sparse_rows(self) -> SparseRows:
        """The kernels' view of S (bitmask, values, row offsets), rebuilt only when the mask or values change.

        A 2:4 mask is rewritten in place as the bitmask: both take in*out/8 bytes, so resident memory is
        unchanged. An index mask (density < 1/32) gets a cached bitmask of in*out/8 bytes next to it.
        """
        if self.mask_format == "nm":
            with torch.inference_mode(False), torch.no_grad():  # a buffer that later healing may still read
                self.mask = as_bitmask("nm", self.mask, self.in_features, self.out_features)
            self.mask_format = "bitmask"
        v = self.values if self.value_bits == 16 else self.value_codes[:0]  # quantized: values joined per call
        key = (self.mask.data_ptr(), self.mask._version, v.data_ptr(), v._version, v.dtype, v.device)
        if self._cache.get("rows_key") != key:
            rows = sparse_rows(self.mask_format, self.mask, v.detach(), self.in_features, self.out_features)
            self._cache.update(rows_key=key, rows=rows, tiles=None)
        return self._cache["rows"]

    def _tile_offsets(self) -> Tensor:
        """Per-(row, output tile) value offsets for the Triton kernels, cached with the rows."""
        rows = self._sparse_rows()
        if self._cache.get("tiles") is None:
            from saten_core.kernels.triton import DEFAULT_BLOCK_N

            self._cache["tiles"] = tile_offsets(rows, DEFAULT_BLOCK_N)
        return self._cache["tiles"]

    def _cached_pair(self) -> tuple[Tensor, Tensor]:
        """A (in, r), B (r, out) at the stored dtype, rebuilt only when a core changes (the only inference cache)."""
        key = tuple((g.data_ptr(), g._version, g.device, g.dtype) for g in self._core_tensors())
        if self._cache.get("pair_key") != key:
            with torch.no_grad():
                pair = tt_factor_pair([g.float() for g in self.tt_cores()], self.n_in_modes)
            dtype = self.dtype
            self._cache.update(pair_key=key, pair=tuple(t.to(dtype) for t in pair))
        return self._cache["pair"]

    def _materialized_forward(self, x2d: Tensor) -> Tensor | None:
        """Opt-in dense-cache path (materialize()): operands cached while the parameters are unchanged."""
        path = self._choose_path(x2d.shape[0])
        ab, operand = self._cached(path)
        y = None
        if ab is not None:
            y = (x2d @ ab[0]) @ ab[1]
        if operand is not None:
            s = self._sparse_term(x2d, path, operand)
            y = s if y is None else y + s
        return y

    def materialize(self, on: bool = True) -> None:
        """Opt in to (or, with on=False, out of) the dense-cache inference path; drops every cached operand."""
        self.resident = "materialized" if on else "compact"
        self._cache = {}

    def _train_forward(self, x2d: Tensor) -> Tensor | None:
        """Differentiable path: factor pair from the live cores, values scattered into a dense residual."""
        y = None
        if self.ranks:
            a, b = self._factor_pair()
            y = (x2d @ a) @ b
        if self.nnz:
            s = x2d @ self._residual()
            y = s if y is None else y + s
        return y

    def enable_semi_structured(self) -> None:
        """Use PyTorch's 2:4 semi-structured sparse kernel for the residual (CUDA, compute capability >= 8.0,
        fp16/bf16 only; off by default, it helps large prefill batches and loses at batch-1 decode)."""
        if self.spec.structure != "2:4":
            raise ValueError(f"semi-structured kernels need structure '2:4', got {self.spec.structure!r}")
        dev = self.mask.device
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 8:
            raise ValueError(f"semi-structured kernels need a CUDA device of compute capability >= 8.0, got {dev}")
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"semi-structured kernels need float16/bfloat16 weights, got {self.dtype}")
        self._semi_structured, self.sparse_path, self.resident = True, "dense", "materialized"
        self._cache = {}


def _activation_inputs(spec: LayerSpec, stats, scores: Tensor | None, in_f: int,
                       out_f: int) -> tuple[Whitening | None, Tensor | None]:
    """(whitening: L and the moment it factors, or None; mask scores) for the spec's method.

    Data-free methods ignore `stats`.
    """
    if not needs_stats(spec.method):
        return None, scores
    if stats is None:
        raise ValueError(f"method {spec.method!r} needs calibration input statistics for this layer, got none")
    if tuple(stats.xtx.shape) != (in_f, in_f):
        raise ValueError(f"input statistics of shape {tuple(stats.xtx.shape)} do not fit a layer with {in_f} inputs")
    whiten = Whitening.of(stats) if _has_lowrank(spec.method) else None
    if scores is None and _has_sparse(spec):
        scores = stats.column_norms.float()[:, None].expand(in_f, out_f)
    return whiten, scores


def _sparsegpt_fit(w: Tensor, spec: LayerSpec, stats) -> tuple:
    """([], updated weight (in, out), mask (in, out), format, packed): SparseGPT's OBS pruning of w (out, in).

    The kept count per output row is kept_entries / out, so bytes are exactly what predict_bytes promised.
    """
    from saten_core.quant.obs import sparsegpt

    n_out, n_in = w.shape
    keep = kept_entries(n_in, n_out, spec) // n_out
    if spec.structure != "2:4" and keep * n_out != kept_entries(n_in, n_out, spec):
        raise ValueError(f"sparsegpt keeps the same count in every output row; use mask_group 'row' "
                         f"(got group {spec.group!r})")
    pruned, mask = sparsegpt(w.float(), stats.xtx, keep, nm=spec.structure == "2:4")
    mask_t = mask.mT.contiguous()
    fmt, packed = pack_mask(mask_t, spec.structure)
    return [], pruned.mT.contiguous(), mask_t, fmt, packed


def _fit_error(residual: Tensor, mask: Tensor, whiten: Whitening | None) -> float:
    """||L^T (W - TT - S)||_F (output error on the calibration inputs), or ||W - TT - S||_F without L."""
    left = residual.masked_fill(mask, 0.0)
    if whiten is None:
        return float(left.norm())
    return output_error(left, whiten.low)


def mask_of(layer: SatenLinear) -> Tensor:
    """The boolean (in, out) mask of a layer's sparse part (all False when it has none)."""
    shape = (layer.in_features, layer.out_features)
    if layer.mask_format is None:
        return torch.zeros(shape, dtype=torch.bool, device=layer.mask.device)
    return unpack_mask(layer.mask_format, layer.mask, shape)

