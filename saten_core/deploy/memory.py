"""Memory as a deployment sees it: exact resident tensor bytes, and process memory measured in a fresh process.

`python -m saten_core.deploy.memory --model REF --dtype D` is the child the measurement runs (one per model),
so nothing the parent loaded before (the other model, the teacher, allocator leftovers) is counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

MEMORY_TOKENS = 512  # tokens of the one forward pass before memory is read (a perplexity window)


def _tensors_in(value: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by an attribute value: a tensor, or one inside dicts / lists / tuples / dataclasses (caches)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):  # e.g. kernels.format.SparseRows: its row offsets
            yield from _tensors_in(getattr(value, field.name), depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 4 and isinstance(value, list | tuple):
        for v in value:
            yield from _tensors_in(v, depth + 1)


def held_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the modules hold: parameters, buffers and any tensor kept in a module attribute (caches)."""
    for module in model.modules():
        yield from module.parameters(recurse=False)
        yield from module.buffers(recurse=False)
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                yield from _tensors_in(value)


def resident_bytes(model: nn.Module) -> int:
    """Exact bytes of every storage the model holds, each shared storage once (tied weights, views).

    Call it after a forward so lazily built caches are counted: this is what a replica keeps in memory
    between requests, activations and the KV cache aside.
    Example:
        >>> resident_bytes(nn.Linear(4, 2, bias=False))
        32
    """
    seen: dict[tuple, int] = {}
    for t in held_tensors(model):
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return int(sum(seen.values()))


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def _peak_rss() -> int:
    """This process's peak RSS: VmHWM, which exec resets (ru_maxrss keeps the parent's peak across exec on Linux,
    so a child started by a big process would report the parent's memory)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # no /proc: KiB, may include the parent


def _preload_code(ref: str, dtype: str) -> None:
    """Import the architecture's modules and read the tokenizer first, so the growth counts weights, not code."""
    from transformers import AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    from saten_core.checkpoint import is_compressed_dir
    from saten_core.models import load_config, resolve_ref

    folder = Path(ref) if is_compressed_dir(ref) else resolve_ref(ref, dtype)[1]
    config = load_config(folder)
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING):
        if type(config) in mapping:
            mapping[type(config)]  # the lazy mapping imports the architecture's module on lookup
    AutoTokenizer.from_pretrained(folder)


def measure_here(ref: str, dtype: str, device: str, tokens: int, materialize: bool) -> dict:
    """Load `ref` at `dtype`, run one forward of `tokens` tokens, report memory (the child's work)."""
    from saten_core.checkpoint import load_any
    from saten_core.evaluate import forward_once

    dev = torch.device(device)
    _preload_code(ref, dtype)
    before = _rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    loaded = load_any(ref, device, dtype=dtype, materialize=materialize)
    forward_once(loaded, tokens)
    out = {"resident_bytes": resident_bytes(loaded.model), "rss_before_load": before, "rss_after": _rss(),
           "peak_rss": _peak_rss(), "tokens": tokens, "device": str(dev)}
    out["growth_bytes"] = out["rss_after"] - before
    if dev.type == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return out


def measure_process(ref: str, *, dtype: str, device: str = "cpu", tokens: int = MEMORY_TOKENS,
                    materialize: bool = False, timeout: float = 900.0) -> dict:
    """Memory of `ref` measured in a fresh Python process: peak RSS (CPU) or max_memory_allocated (CUDA).

    Returns measure_here's dict plus `peak_memory_bytes` (the figure reports carry) and, on CPU,
    `memory_growth_bytes` (RSS after load + one forward minus RSS before loading).
    """
    cmd = [sys.executable, "-m", "saten_core.deploy.memory", "--model", str(ref), "--dtype", dtype,
           "--device", device, "--tokens", str(tokens)] + (["--materialize"] if materialize else [])
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        tail = " ".join((done.stderr or "").strip().splitlines()[-1:]) or f"exit {done.returncode}"
        raise RuntimeError(f"memory measurement of {ref} failed: {tail}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    cuda = torch.device(device).type == "cuda"
    out["peak_memory_bytes"] = out["peak_cuda_bytes"] if cuda else out["peak_rss"]
    if not cuda:
        out["memory_growth_bytes"] = out["growth_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saten_core.deploy.memory")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=MEMORY_TOKENS)
    p.add_argument("--materialize", action="store_true")
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(measure_here(args.model, args.dtype, args.device, args.tokens, args.materialize)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
