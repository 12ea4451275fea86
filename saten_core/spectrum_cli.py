"""The `spectrum` sub-command: per-layer singular-value spectra of a model written as one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `spectrum --model M --json OUT` to the main CLI (handler returns an exit code)."""
    p = subparsers.add_parser("spectrum", help="singular values, energies, ranks and TT unfoldings per layer")
    p.add_argument("--model", required=True, help="registry name, local HF folder or hub id")
    p.add_argument("--json", required=True, metavar="OUT", help="output JSON file ('-' for stdout)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default=None, help="dtype the weights are read at (default bfloat16, the deploy "
                   "dtype the pages and spectrum jobs use, so they share one cache entry)")
    p.add_argument("--no-cache", action="store_true", help="recompute even when a cached spectrum matches")
    p.set_defaults(func=handler)


def check_writable(out: str) -> None:
    """Fail before the (slow) computation when OUT cannot be written: ValueError naming OUT."""
    if out == "-":
        return
    path = Path(out)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"--json {out!r} is a folder, expected a file path")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--json {out!r} cannot be written: folder {str(parent)!r} is missing or read-only")


def handler(args: argparse.Namespace) -> int:
    from saten_core.deploy.dtype import DEFAULT_DTYPE, check_dtype, torch_dtype
    from saten_core.files import atomic_write_text
    from saten_core.models import resolve_ref
    from saten_core.spectrum import stored_spectra

    check_writable(args.json)
    dtype = torch_dtype(check_dtype(args.dtype or DEFAULT_DTYPE))  # not fp32: that doubles a 16-bit folder
    name, _ = resolve_ref(args.model, check_dtype(args.dtype or DEFAULT_DTYPE))
    progress = lambda stage, frac, msg: print(f"[{stage} {frac:4.0%}] {msg}", file=sys.stderr, flush=True)
    data = stored_spectra(args.model, dtype=dtype, device=args.device, use_cache=not args.no_cache,
                          progress=progress)  # one layer in memory at a time
    data = {"model": name, "ref": args.model, **data}
    text = json.dumps(data, separators=(",", ":"))
    if args.json == "-":
        print(text)
    else:
        atomic_write_text(args.json, text)
    how = "from cache" if data["cached"] else f"in {data['seconds']:.1f} s"
    print(f"spectrum of {len(data['layers'])} layers {how} -> {args.json}", file=sys.stderr)
    return 0
