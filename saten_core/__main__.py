"""Command line: `python -m saten_core {models,plan,compress,eval,warm-cache,...}` — parsing and printing only.

Bad input exits 2 with one `error: ...` line on stderr; heavy imports stay inside the handlers so --help is fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from saten_core.deploy.dtype import DEFAULT_DTYPE, DTYPES
from saten_core.deploy.flags import add_deploy_args
from saten_core.plan import FIT_ROUNDS, JOINT_SHARE, JOINT_SHARE_MAX_RATIO, LOWRANK_SHARE, MASK_GROUPS
from saten_core.spec import METHODS, STRUCTURES, is_quantized, needs_stats, storage_method

GROUP_MODULES = ("saten_core.jobs.cli", "saten_core.spectrum_cli")
CLI_METHODS = METHODS


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one `error: ...` line (exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def fail_line(exc: BaseException) -> str:
    """One line, whatever the exception's message holds."""
    return "error: " + " ".join(str(exc).split()) if str(exc) else f"error: {type(exc).__name__}"


def quiet_libraries() -> None:
    """Keep stderr for our own lines: silence transformers' info/progress chatter and Python warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")


def emit(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- models / warm-cache

def cmd_models(args: argparse.Namespace) -> int:
    from saten_core.models import list_models

    rows = list_models()
    if args.json:
        emit(rows)
        return 0
    for r in rows:
        print(f"{r['name']:<16} {r['kind']:<8} {r['params'] / 1e6:8.1f}M  {r.get('description', '')}")
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from saten_core.kernels.cpu import build

    try:
        isa = build(verbose=False)
    except Exception as err:  # noqa: BLE001 - a missing compiler is a message, and the reference path still works
        print(f"error: compiled CPU kernels did not build ({type(err).__name__}: {str(err)[:300]}); "
              "inference falls back to the pure-torch reference path", file=sys.stderr)
        return 2
    print(f"compiled CPU kernels ready (instruction set: {isa})", file=sys.stderr)
    return 0


def cmd_warm_cache(args: argparse.Namespace) -> int:
    from saten_core.models import warm_cache

    warm_cache()
    print("model cache ready", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- plan

def plan_from_args(args: argparse.Namespace):
    """Turn the plan flags into a validated Plan (ValueError names the conflicting or bad value)."""
    from saten_core.plan import Override, Plan

    kind = storage_method(args.method)  # wanda prunes, svd-w is an svd, saten-aw a saten
    if kind == "prune" and (args.rank is not None or args.eps is not None):
        raise ValueError(f"{args.method} keeps weights by score: use --density or --target-ratio, not --rank/--eps")
    sized = args.target_ratio is not None or getattr(args, "target_bytes", None) is not None
    if kind == "rtn" and (args.rank is not None or args.eps is not None or args.density is not None):
        raise ValueError(f"{args.method} quantizes every weight: use --bits (and --group) or --target-ratio, "
                         "not --rank/--eps/--density")
    if kind == "rtn" and not sized and args.bits is None:
        raise ValueError(f"method {args.method} needs --bits (2, 3, 4 or 8) or --target-ratio / --target-bytes")
    if kind not in ("prune", "rtn") and not sized and args.rank is None and args.eps is None:
        raise ValueError(f"method {args.method} needs one of --target-ratio, --target-bytes, --rank or --eps")
    if kind == "prune" and not sized and args.density is None and args.structure != "2:4":
        raise ValueError(f"method {args.method} needs --density, --target-ratio or --target-bytes")
    overrides = []
    density = args.density
    if sized and density is not None:
        if kind not in ("saten", "saten-q"):
            raise ValueError(f"--density {density} conflicts with a byte target (--target-ratio / --target-bytes) "
                             f"for method {args.method}")
        overrides, density = [Override(pattern="*", density=density)], None  # fixed density, rank fills the rest
    plan = Plan(method=args.method, structure=args.structure, rank=args.rank, eps=args.eps,
                density=0.0 if density is None else density, target_ratio=args.target_ratio,
                lowrank_share=args.lowrank_share, order=args.order, mask_group=args.mask_group,
                fit_rounds=args.fit_rounds, overrides=overrides, dtype=args.dtype, bits=args.bits,
                quant_group=args.group, symmetric=args.symmetric, quant_base=args.quant_base,
                repair_share=args.repair_share, value_bits=args.value_bits, core_bits=args.core_bits)
    plan = with_calibration_args(plan, args)
    plan.validate()
    return plan


def calib_arg(value: str | None) -> str | None:
    """--calib: 'default' (bundled calibration text) or a UTF-8 file, checked now and stored as an absolute path."""
    from saten_core.corpus import read_text_file

    if value is None or value == "default":
        return value
    read_text_file(value)  # missing / not UTF-8 / empty -> one-line error before any heavy work
    return str(Path(value).resolve())


def with_calibration_args(plan, args: argparse.Namespace):
    """The plan with the calibration / healing flags that were given replacing its fields (validated)."""
    from dataclasses import replace

    given = {field: getattr(args, field, None) for field in ("calib_tokens", "heal_steps", "heal_lr",
                                                                 "heal_core_lr_scale", "sequential")}
    changes = {k: v for k, v in given.items() if v is not None}
    if getattr(args, "calib", None) is not None:
        changes["calib"] = calib_arg(args.calib)
    if getattr(args, "dtype", None) is not None:
        changes["dtype"] = args.dtype
    if getattr(args, "materialize", False):
        changes["materialize"] = True
    plan = replace(plan, **changes)
    plan.validate()
    return plan


def cmd_plan(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)  # before the heavy imports: flag errors come back at once
    if args.allocate and plan.target_ratio is None and args.target_bytes is None:
        raise ValueError("--allocate needs --target-ratio or --target-bytes")
    if args.allocate and is_quantized(plan.method):
        raise ValueError(f"--allocate spreads TT ranks and densities over layers; {plan.method} quantizes every "
                         "layer on one grid (choose --bits / --group instead)")
    if args.allocate_spectra == "whitened" and not (args.allocate and needs_stats(plan.method)):
        raise ValueError(f"--allocate-spectra whitened needs --allocate and an activation-aware method "
                         f"(saten-aw, svd-w, wanda), got method {plan.method}")
    from saten_core.files import atomic_write_text
    from saten_core.lazy import skeleton
    from saten_core.models import load_model
    from saten_core.plan import dry_run, dry_run_totals, predicted_model_bytes

    whitened = args.allocate and args.allocate_spectra == "whitened"  # needs the weights to run calibration
    loaded = (load_model if whitened else skeleton)(args.model, dtype=plan.torch_dtype())  # else: shapes only
    plan = sized_plan(plan, loaded, args)
    rows = dry_run(loaded.model, plan)  # validates every layer against the plan before anything is written
    tot = dry_run_totals(rows)
    atomic_write_text(args.out, plan.to_json())
    if args.json:
        emit({"plan": json.loads(plan.to_json()), "layers": rows, "totals": tot})
    print(plan_summary(tot, args.out, plan.dtype), file=sys.stderr)
    if args.target_bytes is not None and (whole := predicted_model_bytes(loaded.model, tot, plan.torch_dtype())):
        print(f"whole model: {whole:,} B predicted for a target of {args.target_bytes:,} B", file=sys.stderr)
    return 0


def sized_plan(plan, loaded, args: argparse.Namespace):
    """--target-bytes becomes the equivalent target ratio; --allocate turns the ratio into per-layer overrides."""
    from dataclasses import replace

    from saten_core.plan import ratio_for_model_bytes

    if args.target_bytes is not None:  # whole-model bytes -> the block linears' share of them
        plan = replace(plan, target_ratio=ratio_for_model_bytes(loaded.model, args.target_bytes, plan.torch_dtype()))
    if args.allocate:  # on the weights' spectra unless asked (whitened ones measured worse for saten-aw)
        from saten_core.allocate import activation_spectra, allocate_plan

        progress = tenths(stderr_progress)
        if args.allocate_spectra == "whitened":
            spectra = activation_spectra(loaded, plan, progress=progress)
        else:  # the weights' spectra, read one layer at a time (the disk cache when present)
            from saten_core.spectrum import stored_spectra

            spectra = stored_spectra(args.model, dtype=plan.torch_dtype(), progress=progress)
        plan = allocate_plan(loaded, plan, progress=progress, spectra=spectra)
    return plan


def plan_summary(tot: dict, out: str, dtype: str | None = None) -> str:
    pred = tot["predicted_bytes"]
    after = "decided by eps" if pred is None else f"{pred:,} B ({pred / max(tot['bytes_before'], 1):.1%})"
    return (f"plan written to {out}: {tot['layers_changed']} of {tot['layers']} block linears change; "
            f"bytes {tot['bytes_before']:,} -> {after}" + (f" at {dtype}" if dtype else ""))


# ---------------------------------------------------------------- compress / eval

def read_plan(path: str):
    from saten_core.plan import Plan

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"plan file {path} is not UTF-8 text") from None
    try:
        return Plan.from_json(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad plan file {path}: {' '.join(str(exc).split())}") from None


def stderr_progress(stage: str, fraction: float, message: str) -> None:
    print(f"[{stage} {fraction:4.0%}] {message}", file=sys.stderr, flush=True)


def tenths(progress: Callable[[str, float, str], None]) -> Callable[[str, float, str], None]:
    """Pass on a stage's first report and then one per 10% of it: hundreds of per-layer lines help nobody."""
    last: dict[str, int] = {}

    def report(stage: str, fraction: float, message: str) -> None:
        step = int(fraction * 10)
        if last.get(stage, -1) < step:
            last[stage] = step
            progress(stage, fraction, message)
    return report


def cmd_compress(args: argparse.Namespace) -> int:
    from saten_core.pipeline import check_out_dir, compress_to_dir

    plan = with_calibration_args(read_plan(args.plan), args)
    check_out_dir(args.out)
    text = read_text_arg(args.text)
    progress = lambda stage, frac, msg: stage != "load" and stderr_progress(stage, frac, msg)
    report = compress_to_dir(args.model, plan, args.out, device=args.device, progress=progress,
                             evaluate=args.eval, text=text, tokens=args.tokens)
    t = report["totals"]
    print(f"{t['layers']} layers: {t['bytes_before']:,} -> {t['bytes_after']:,} B ({t['ratio']:.1%}) "
          f"in {t['seconds']:.1f} s; report: {Path(args.out) / 'report.json'}", file=sys.stderr)
    if report.get("heal"):
        h = report["heal"]
        print(f"healed {len(h['loss_curve'])} steps: held-out KL {h['eval_curve'][0][1]:.4f} -> "
              f"{h['best_eval']:.4f} (best step {h['best_step']})", file=sys.stderr)
    if args.json:
        emit(report)
    return 0


def read_text_arg(path: str | None) -> str | None:
    from saten_core.corpus import read_text_file

    return None if path is None else read_text_file(path)


def cmd_eval(args: argparse.Namespace) -> int:
    from saten_core.pipeline import evaluate_ref

    text = read_text_arg(args.text)
    out = evaluate_ref(args.model, text=text, tokens=args.tokens, device=args.device, latency=args.latency,
                       dtype=args.dtype, materialize=args.materialize)
    if args.json:
        emit(out)
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


# ---------------------------------------------------------------- parser

def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, or one line naming the bad value (exit 2, no traceback)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(s: str) -> int:
    """An argparse type: a byte count with an optional unit (400MiB, 0.4GB, 419430400), > 0."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", s)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 400MiB, 0.4GB or 419430400, got {s!r}")
    value = int(float(m.group(1)) * BYTE_UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {s!r}")
    return value


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="write a compression plan (and print its dry run)")
    p.add_argument("--model", required=True, help="registry name, local HF folder or hub id")
    p.add_argument("--method", required=True, choices=CLI_METHODS)
    p.add_argument("--structure", default="unstructured", choices=STRUCTURES)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--target-ratio", type=float, help="fraction of each block linear's bytes to keep")
    size.add_argument("--target-bytes", type=byte_size, help="whole-model size to fit, e.g. 400MiB, 0.4GB or "
                      "419430400 (embeddings, norms and biases stay; the block linears get the rest)")
    size.add_argument("--rank", type=int, help="cap on every TT bond (svd: the matrix rank)")
    size.add_argument("--eps", type=float, help="TT-SVD relative error bound")
    p.add_argument("--density", type=float, help="fraction of residual (saten) / weights (prune) kept")
    p.add_argument("--lowrank-share", type=float, default=None,
                   help=f"saten(-aw) + target ratio: TT share of bytes (default: {JOINT_SHARE} for saten-aw with "
                   f"joint rounds at target ratios up to {JOINT_SHARE_MAX_RATIO}, {LOWRANK_SHARE} otherwise)")
    p.add_argument("--order", type=int, default=2, help="modes per side of the tensorisation")
    p.add_argument("--mask-group", choices=MASK_GROUPS, default="auto",
                   help="unstructured top-k over each layer or the same count per output row; auto: per row for "
                   "the activation-scored masks (wanda, saten-aw), per layer otherwise")
    p.add_argument("--fit-rounds", type=int, default=None,
                   help="saten / saten-aw: joint TT + sparse rounds after the one-shot split (default: "
                   f"{FIT_ROUNDS} for saten-aw, 0 for saten)")
    add_quant_args(p)
    p.add_argument("--allocate", action="store_true", help="per-layer allocation (issue 3's allocator)")
    p.add_argument("--allocate-spectra", choices=["weights", "whitened"], default="weights",
                   help="what --allocate predicts errors from: the weights' spectra (default) or, for "
                   "activation-aware methods, the spectra of W L from the --calib text's input statistics "
                   "(measured worse on smollm2-135m: docs/benchmarks/spectrum.md)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--json", action="store_true", help="print plan + dry run as JSON on stdout")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                   help="deploy dtype: the original, the compressed parts and every byte count (default bfloat16)")
    add_calibration_args(p)
    p.set_defaults(func=cmd_plan)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """Flags of the quantizing methods (rtn, gptq, saten-q); see saten_core/quant."""
    from saten_core.plan import QUANT_GROUP, REPAIR_SHARE
    from saten_core.quant.grid import BITS
    from saten_core.quant.parts import CORE_BITS, PART_GROUP, VALUE_BITS

    p.add_argument("--bits", type=int, choices=BITS, default=None,
                   help="rtn / gptq / saten-q: bits per weight (default: the most that fit --target-ratio; "
                   f"saten-q leaves at least --repair-share {REPAIR_SHARE} of the budget to its repair)")
    p.add_argument("--group", type=int, default=QUANT_GROUP,
                   help=f"inputs per quantization group, each with a 16-bit scale (default {QUANT_GROUP}; "
                   "0: one group per output row); must divide every planned layer's input width")
    p.add_argument("--symmetric", action="store_true",
                   help="symmetric grid (no minimum per group); default: scale + minimum, as GGUF Q4_1")
    p.add_argument("--quant-base", choices=["rtn", "gptq"], default="rtn",
                   help="saten-q: the quantizer whose error the TT + sparse repair fits")
    p.add_argument("--repair-share", type=float, default=None,
                   help="saten-q with the bits picked: least share of each layer's budget left to the repair")
    p.add_argument("--value-bits", type=int, choices=VALUE_BITS, default=16,
                   help="saten / saten-aw / saten-q: bits of each kept sparse value (16: the deploy dtype; 8 or 4: "
                   f"codes + a scale per {PART_GROUP} values); a target ratio then keeps more entries")
    p.add_argument("--core-bits", type=int, choices=CORE_BITS, default=16,
                   help=f"saten / saten-aw / saten-q: bits of the TT cores (16: the deploy dtype; 8: codes + a scale "
                   f"per {PART_GROUP} numbers)")


def float_above(minimum: float, *, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a number > minimum (>= with `inclusive`), or one line naming the bad value."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not (v >= minimum if inclusive else v > minimum):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {s}")
        return v
    return parse


positive_float, non_negative_float = float_above(0, inclusive=False), float_above(0, inclusive=True)


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """Flags for the plan's calibration / healing fields (on compress they override the plan file)."""
    p.add_argument("--calib", help="calibration text: 'default' (bundled) or a UTF-8 file; used by "
                                   "saten-aw / svd-w / wanda and healing")
    p.add_argument("--calib-tokens", type=positive_int, help="calibration tokens for input statistics")
    p.add_argument("--sequential", action="store_true", default=None,
                   help="calibrate and compress block by block, each block's statistics on the outputs of the "
                   "already-compressed blocks before it (one block's statistics in memory at a time)")
    p.add_argument("--heal-steps", type=non_negative_int, help="distillation fine-tune steps after compressing "
                                                               "(0: off)")
    p.add_argument("--heal-lr", type=positive_float, help="healing learning rate")
    p.add_argument("--heal-core-lr-scale", type=non_negative_float,
                   help="TT cores heal at the learning rate x this (default 1; 0 freezes them)")


def add_run_parsers(sub) -> None:
    c = sub.add_parser("compress", help="compress a model with a plan into DIR")
    c.add_argument("--model", required=True)
    c.add_argument("--plan", required=True)
    c.add_argument("--out", required=True, help="new (or empty) folder for the compressed model")
    c.add_argument("--device", default="auto")
    c.add_argument("--eval", action="store_true", help="also measure ppl / KL / top-1 against the original")
    c.add_argument("--text", help="UTF-8 text file for --eval (default: bundled held-out text)")
    c.add_argument("--tokens", type=positive_int, default=2048)
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    add_deploy_args(c)
    add_calibration_args(c)
    c.set_defaults(func=cmd_compress)
    e = sub.add_parser("eval", help="evaluate a model or a compressed DIR")
    e.add_argument("--model", required=True, help="model ref or compressed DIR")
    e.add_argument("--text", help="UTF-8 text file (default: bundled held-out text)")
    e.add_argument("--tokens", type=positive_int, default=2048)
    e.add_argument("--device", default="auto")
    e.add_argument("--latency", action="store_true", help="also time prefill and decode (a compressed DIR: "
                   "interleaved with its original in this process, ratios with min-max)")
    e.add_argument("--json", action="store_true")
    add_deploy_args(e, default_note="a model ref loads at D (default bfloat16); a DIR at its saved dtype")
    e.set_defaults(func=cmd_eval)


def build_parser() -> Parser:
    parser = Parser(prog="python -m saten_core", description="Saten (sparse augmented tensor network) compression")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    m = sub.add_parser("models", help="list the embedded models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    add_plan_parser(sub)
    add_run_parsers(sub)
    w = sub.add_parser("warm-cache", help="dequantise/cache the embedded models once")
    w.set_defaults(func=cmd_warm_cache)
    k = sub.add_parser("build-kernels", help="compile the CPU inference kernels once (cached per machine)")
    k.set_defaults(func=cmd_build_kernels)
    register_groups(sub)
    return parser


def register_groups(sub) -> None:
    """Sub-command groups other modules contribute, when they exist."""
    for name in GROUP_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue
            raise
        module.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    quiet_libraries()
    return run_handler(args)


def run_handler(args: argparse.Namespace) -> int:
    """Map failures to exit codes: bad input 2, cancelled 130, anything else 1 — always one line, no traceback."""
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        print(fail_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI contract is one line, never a traceback
        if type(exc).__name__ == "Cancelled":
            print(fail_line(exc), file=sys.stderr)
            return 130
        print(f"error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
