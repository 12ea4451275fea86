"""Deploy dtype: the precision a model is served in, which every byte count, load and measurement uses.

Why: LLMs are served in 16 bits, so a ratio against fp32 bytes claims half of its saving from a free cast.
"""

from __future__ import annotations

import torch

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_DTYPE = "bfloat16"
# Plans saved before the deploy dtype existed were compressed and counted at fp32; they keep that meaning.
LEGACY_DTYPE = "float32"


def check_dtype(name: object) -> str:
    """The dtype name when it is one of DTYPES, else ValueError naming it."""
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16 (only the deploy dtypes are accepted).

    Example:
        >>> torch_dtype("float16")
        torch.float16
    """
    return getattr(torch, check_dtype(name))


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(storage: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a layer computes in: on CPU 16-bit weights are upcast to fp32 for the call.

    Why: this CPU (AVX2/FMA/F16C, no bf16 units) runs torch's bf16/fp16 matmul 2-4x slower than fp32 once
    compute-bound (docs/benchmarks/maths.md); the upcast copy lives only inside one layer's call, so stored and
    resident bytes stay at the deploy dtype. CUDA computes in the stored dtype.
    """
    if torch.device(device).type == "cpu" and storage in (torch.bfloat16, torch.float16):
        return torch.float32
    return storage
