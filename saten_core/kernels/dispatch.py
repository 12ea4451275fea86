"""Which kernel computes one call of a compressed layer: the measured rule per device, dtype and token count.

Rule (measured by bench/bench_kernels.py on this 2-core CPU, docs/benchmarks/maths.md "Fused kernels"):
- CPU with the compiled extension: "cpu-decode" (one streaming pass over S and B) up to DECODE_MAX_TOKENS tokens,
  "cpu-prefill" (S expanded in row chunks into a dense scratch, then torch's GEMM) above: decode's cost grows with
  the tokens, prefill's is a dense GEMM plus one expansion.
- CUDA: "reference" until the Triton kernels are measured on a GPU (none was lent while they were written; their
  tests run under the interpreter). `SATEN_CUDA_KERNELS=triton` opts in to "triton-decode" / "triton-prefill" at
  the same switch (Triton's decode takes at most 16 tokens); bench/gpu_check.sh measures both.
- Anything else (no compiler, an output width not divisible by 8, another device): "reference", which builds the
  dense S for the call; it is correct and slow, and the missing extension is said once (cpu.extension()).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from saten_core.kernels import cpu
from saten_core.kernels.format import SparseRows
from saten_core.kernels.reference import lowrank_sparse

PATHS = ("auto", "reference", "cpu-decode", "cpu-prefill", "triton-decode", "triton-prefill")
DECODE_MAX_TOKENS = 8  # 576x1536 bf16, cold weights: decode / prefill time 0.89 at 8 tokens, 1.31 at 16


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; expected one of {', '.join(PATHS)}")
    return path


def _triton_ready() -> bool:
    try:
        from saten_core.kernels import triton as tk
    except ImportError:
        return False
    return tk.supported()


def choose(device: torch.device, tokens: int, out_features: int) -> str:
    """The path "auto" takes for a call of `tokens` tokens on `device` (see the module docstring)."""
    if out_features % 8:
        return "reference"
    phase = "decode" if tokens <= DECODE_MAX_TOKENS else "prefill"
    if device.type == "cpu" and cpu.extension() is not None:
        return f"cpu-{phase}"
    if device.type == "cuda" and os.environ.get("SATEN_CUDA_KERNELS") == "triton" and _triton_ready():
        return f"triton-{phase}"
    return "reference"


def run(path: str, x: Tensor, rows: SparseRows, a: Tensor | None, b: Tensor | None, *, compute: torch.dtype,
        tiles: Tensor | None = None) -> Tensor:
    """y = x (A B + S) for x (T, in) through `path` (not "auto"); every path equals "reference" to fp32 rounding."""
    if path == "cpu-decode":
        return cpu.decode(x, rows, a, b)
    if path == "cpu-prefill":
        return cpu.prefill(x, rows, a, b, compute=compute)
    if path.startswith("triton-"):
        from saten_core.kernels import triton as tk

        fn = tk.decode if path == "triton-decode" else tk.prefill
        return fn(x, rows, a, b, None, tiles)
    if path == "reference":
        return lowrank_sparse(x, rows, a, b, compute=compute)
    check_path(path)
    raise ValueError(f"kernel path must be a concrete one (choose() resolves 'auto'), got {path!r}")


def model_paths(model: torch.nn.Module, device: torch.device | str) -> dict:
    """Which path each compressed layer's decode (1 token) and prefill (128 tokens) calls take, counted.

    Recorded with every evaluation so a speed figure says what computed it, e.g.
    {"decode": {"cpu-decode": 210}, "prefill": {"cpu-prefill": 210}, "isa": "avx512"}.
    """
    device = torch.device(device)
    counts: dict[str, dict[str, int]] = {"decode": {}, "prefill": {}}
    for module in model.modules():
        if not hasattr(module, "kernel_path") or getattr(module, "resident", "compact") != "compact":
            continue
        for phase, tokens in (("decode", 1), ("prefill", 128)):
            path = module.kernel_path if module.kernel_path != "auto" else choose(device, tokens, module.out_features)
            counts[phase][path] = counts[phase].get(path, 0) + 1
    ext = cpu.extension() if device.type == "cpu" else None
    return {**counts, "isa": ext.best_isa() if ext is not None else None}
