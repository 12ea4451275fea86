"""Deploy dtype: the precision a model is served in, which every byte count, load and measurement uses.

Why: LLMs are served in 16 bits, so a ratio against fp32 bytes claims half of its saving from a free cast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a function needs it: the CLI and plan module start without it
    import torch

# CPU flags that give torch native 16-bit matmul kernels (oneDNN); without them it emulates and is slower
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}

DTYPES = ("bfloat16", "float16", "float32")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}  # bytes per element, for callers that do not import torch
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
    import torch

    return getattr(torch, check_dtype(name))


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def cpu_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has native matmul units for a 16-bit dtype (fp32 always counts as native)."""
    name = dtype_name(dtype)
    return name not in NATIVE_FLAGS or any(f in _cpu_flags() for f in NATIVE_FLAGS[name])


def bytes_at(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bytes of `t` with its floating-point values counted at `dtype` (as stored when None; integer tensors such as
    packed masks always as stored): what a tensor fitted in fp32 takes once served at the deploy dtype."""
    elem = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
    return t.numel() * elem


def compute_dtype(storage: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a layer computes in: on a CPU without native units for a 16-bit dtype, fp32 for the call.

    Why: measured 2026-12-01, F.linear 576x1536 at 128 tokens: on a CPU without avx512_bf16 torch's bf16 path is
    2-4x slower than fp32; on one with it (the same box type, another draw) bf16 was 2.2x faster (550 vs 1265 us).
    The upcast copy lives only inside one layer's call, so stored and resident bytes stay at the deploy dtype.
    CUDA computes in the stored dtype.
    """
    import torch

    if torch.device(device).type == "cpu" and not cpu_native(storage):
        return torch.float32
    return storage
