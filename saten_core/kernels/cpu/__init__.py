"""The compiled CPU kernels (saten_cpu.cpp): built once per machine with torch.utils.cpp_extension, then cached.

`extension()` returns the loaded module, or None where it cannot be built (no compiler, no ninja, not x86 is
fine: the scalar loop compiles anywhere); callers then use the reference path, and a warning says so once.
The build key is the source hash and the torch version, so an edited kernel rebuilds and a stale one never loads.
The setup script builds it (`python -m saten_core build-kernels`), so tests and jobs never pay the ~1 min build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("saten_cpu.cpp")
FLAGS = ["-O3", "-fopenmp"]  # instruction sets are chosen per function at run time (target attributes)


def build_dir() -> Path:
    """$SATEN_KERNEL_CACHE, default saten_home()/kernels/<torch version>-<source hash>."""
    from saten_core.files import saten_home

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    env = os.environ.get("SATEN_KERNEL_CACHE")
    root = Path(env).expanduser() if env else saten_home() / "kernels"
    return root / f"torch{torch.__version__.replace('+', '_')}-{key}"


@lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled module (built on first use when the cache is empty), or None with one warning."""
    try:
        return _build(verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means "use the reference path", said once
        warnings.warn(f"compiled CPU kernels unavailable ({type(err).__name__}: {str(err)[:200]}); "
                      "using the pure-torch reference path (correct, slower)", RuntimeWarning, stacklevel=2)
        return None


def _build(verbose: bool) -> ModuleType:
    """Build or load under our own flock, clearing a baton a killed builder left behind.

    torch's FileBaton is a plain `lock` file: a build killed mid-way (a cancelled CI run, a SIGKILLed job) leaves
    it, and every later `load` waits on it forever. An flock dies with its holder, so while we hold ours no live
    builder of this folder exists and any `lock` file there is stale.
    """
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = "saten_cpu_" + folder.name.rsplit("-", 1)[1]
    with open(folder / "saten-build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        return load(name=name, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(folder), verbose=verbose)


def build(verbose: bool = True) -> str:
    """Build (or find) the extension now; returns the instruction set it will use. Raises on failure."""
    return _build(verbose).best_isa()


ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
SCRATCH_BYTES = 4 << 20  # prefill expands at most this much of S at a time (a few rows of a large layer)
_EMPTY = torch.empty(0)  # stands for an absent A / B (the binding takes tensors, not None)


def _check(rows, isa: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"unknown isa {isa!r}; expected one of {', '.join(ISAS)}")
    if rows.out_features % 8:
        raise ValueError(f"the compiled kernels need out_features divisible by 8, got {rows.out_features}")
    if extension() is None:
        raise ValueError("the compiled CPU kernels are not available on this machine (see the warning)")


def decode(x, rows, a, b, bias=None, isa: str = "auto"):
    """y = x (A B + S) + bias for few tokens x (T, in): one streaming pass over S and B, fp32 accumulation.

    Kept lean (one call into C++): it runs once per layer per decoded token.
    """
    _check(rows, isa)
    return extension().decode(x.contiguous(), rows.mask, rows.values, rows.row_offsets, _EMPTY if a is None else a,
                              _EMPTY if b is None else b, bias, rows.out_features, ISAS[isa])


_SCRATCH = threading.local()  # per thread: two threads' prefills never share a buffer


def _scratch(numel: int, dtype):
    """A reused buffer of >= numel elements: a fresh 2 MB tensor per call is a fresh mmap, and its page faults
    cost ~300 us per 576x1536 prefill (measured: 1.04-1.22 ms vs 0.76 ms of parts). One per dtype and thread, at
    most SCRATCH_BYTES, held by the thread (not by any model) between calls."""
    bufs = _SCRATCH.__dict__.setdefault("by_dtype", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def prefill(x, rows, a, b, bias=None, compute=None, isa: str = "auto"):
    """Many tokens: S expanded into a dense scratch, then torch's dense GEMM (compute bound, so the GEMM decides).

    When S and B fit in SCRATCH_BYTES they share one scratch [S; B] (in + r, out) and one GEMM with [x, x A]
    (bench: one GEMM instead of GEMM + addmm); larger layers go in row chunks of <= SCRATCH_BYTES.
    """
    _check(rows, isa)
    ext, compute = extension(), compute or x.dtype
    xc, n_in, n_out, rank = x.to(compute), rows.in_features, rows.out_features, 0 if a is None else a.shape[1]
    elem = compute.itemsize
    if (n_in + rank) * n_out * elem <= SCRATCH_BYTES:
        scratch = _scratch((n_in + rank) * n_out, compute).view(n_in + rank, n_out)
        if rank:
            scratch[n_in:].copy_(b)
        ext.expand_rows(rows.mask, rows.values, rows.row_offsets, 0, n_in, n_out, compute, ISAS[isa], scratch[:n_in])
        y = (torch.cat([xc, xc @ a.to(compute)], 1) if rank else xc) @ scratch
    else:
        y = (xc @ a.to(compute)) @ b.to(compute) if rank else xc.new_zeros(x.shape[0], n_out)
        step = max(1, SCRATCH_BYTES // (n_out * elem))
        for i0 in range(0, n_in, step):
            i1 = min(n_in, i0 + step)
            s = _scratch((i1 - i0) * n_out, compute).view(i1 - i0, n_out)
            ext.expand_rows(rows.mask, rows.values, rows.row_offsets, i0, i1, n_out, compute, ISAS[isa], s)
            y.addmm_(xc[:, i0:i1], s)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)
