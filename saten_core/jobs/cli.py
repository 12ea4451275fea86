"""The `jobs` sub-command group of the CLI: submit, list, show, cancel and run the worker."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from saten_core.deploy.flags import add_deploy_args
from saten_core.jobs import store, worker

SUMMARY_COLUMNS = ("id", "status", "model_ref", "stage", "fraction", "device_used", "executor", "sweep", "ppl",
                   "bytes_after", "error")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `jobs {submit,list,show,cancel,worker}` to the main CLI; each handler returns an exit code."""
    jobs = subparsers.add_parser("jobs", help="background compression jobs (queue, worker, status)")
    sub = jobs.add_subparsers(dest="jobs_command", required=True)
    p = sub.add_parser("submit", help="queue a compression job")
    p.add_argument("--model", required=True, help="registry name, local HF folder or hub id")
    p.add_argument("--plan", required=True, help="plan JSON file (python -m saten_core plan ... --out plan.json)")
    p.add_argument("--eval", action="store_true", help="evaluate the compressed model after compressing")
    p.add_argument("--tokens", type=int, default=None, metavar="N", help="evaluation tokens (default: pipeline's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when the worker has it), cpu, cuda, cuda:N")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="fail the job after S seconds")
    p.add_argument("--reference", action="store_true", help="with --eval: also queue an evaluated run of the "
                   "original on the same device (speed comparisons and ROI need it), unless one is queued or done")
    p.add_argument("--compare", nargs="+", default=[], metavar="METHOD", help="also queue these methods at the "
                   "plan's byte budget, same layers, calibration text and healing (a plan without a target ratio is "
                   "measured on the model); exit 2 when one of them cannot run")
    p.add_argument("--json", action="store_true", help='print {"id": ..., "reference_id": ..., "compare": ...}')
    add_deploy_args(p)
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("list", help="jobs, newest first")
    p.add_argument("--status", choices=store.STATUSES, default=None)
    p.add_argument("--sweep", default=None, metavar="ID", help="only the jobs of this sweep")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--full", action="store_true", help="with --json: include each job's result_json report")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="one job with its progress, metrics and error")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("cancel", help="cancel a queued job, or stop a running one at the next layer")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("worker", help="run queued jobs: one at a time here, or as Ray tasks (foreground)")
    p.add_argument("--once", action="store_true", help="run at most one job, then exit")
    p.add_argument("--idle-exit", type=float, default=None, metavar="S", help="exit after S seconds with no jobs")
    p.add_argument("--drain", action="store_true", help="exit once the queue is empty and nothing runs")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default: this process runs each job; never imports Ray) or ray (a dispatcher "
                   "runs each job as a Ray task)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="with --executor ray: the cluster to join "
                   "(default: start a local Ray instance)")
    p.add_argument("--gpus-per-job", type=float, default=1.0, metavar="F", help="with --executor ray: GPUs per "
                   "job, fractional allowed (ignored on a cluster without GPUs: one CPU slot per job)")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("sweep", help="queue one job per method x ratio x heal-steps combination, tagged as a sweep")
    p.add_argument("--model", required=True, help="registry name, local HF folder or hub id")
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD")
    p.add_argument("--ratios", nargs="+", type=float, required=True, metavar="R", help="byte ratios in (0, 1]")
    p.add_argument("--heal-steps", nargs="+", type=int, default=[0], metavar="N")
    p.add_argument("--eval", action="store_true", help="evaluate each compressed model")
    p.add_argument("--tokens", type=int, default=None, metavar="N", help="evaluation tokens (default: pipeline's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="deploy dtype of every plan (default: the plan default)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="fail each job after S seconds")
    p.add_argument("--json", action="store_true", help='print {"sweep": ID, "ids": [...]}')
    p.set_defaults(func=cmd_sweep)


def read_plan_file(path: str) -> str:
    """The plan file's text; missing -> FileNotFoundError, unreadable text -> ValueError naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"plan file {path!r} is not UTF-8 text") from None


def with_deploy_args(plan_json: str, args: argparse.Namespace) -> str:
    """The plan JSON with --dtype / --materialize applied (unchanged text when neither is given)."""
    from dataclasses import replace

    from saten_core.plan import Plan

    if args.dtype is None and not args.materialize:
        return plan_json
    plan = Plan.from_json(plan_json)
    plan = replace(plan, dtype=args.dtype or plan.dtype, materialize=plan.materialize or args.materialize)
    plan.validate()
    return plan.to_json()


def cmd_submit(args: argparse.Namespace) -> int:
    if args.reference and not args.eval:
        raise ValueError("--reference times the original for comparison with an evaluated run: add --eval")
    plan_json = with_deploy_args(read_plan_file(args.plan), args)
    job_id = store.submit(args.model, plan_json, evaluate=args.eval, tokens=args.tokens,
                          device=args.device, time_budget_s=args.time_budget)
    dtype = json.loads(plan_json).get("dtype", "float32")
    ref_id = (store.submit_reference(args.model, tokens=args.tokens, device=args.device, dtype=dtype)
              if args.reference else None)
    others = store.submit_baselines(args.model, plan_json, args.compare, evaluate=args.eval,
                                    tokens=args.tokens, device=args.device, time_budget_s=args.time_budget)
    if args.json:
        print(json.dumps({"id": job_id} | ({"reference_id": ref_id} if args.reference else {})
                         | ({"compare": [{"method": m, "id": i, "error": e} for m, i, e in others]} if others else {})))
    else:
        print(f"queued job {job_id}" + (f" and reference job {ref_id}" if ref_id else ""))
        for method, other_id, error in others:
            print(f"queued {method} job {other_id}" if error is None else f"{method} not queued: {error}")
    return 0 if all(e is None for _, _, e in others) else 2


def cmd_list(args: argparse.Namespace) -> int:
    store.recover_stale()
    jobs = store.list_jobs(status=args.status, limit=args.limit, sweep=args.sweep)
    if args.json:
        rows = [j.to_dict() for j in jobs]
        if not args.full:  # reports hold every layer: keep the listing small, `show` has the full row
            rows = [{k: v for k, v in r.items() if k != "result_json"} for r in rows]
        print(json.dumps(rows, indent=2))
    else:
        print(format_table([summary(j) for j in jobs]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store.recover_stale()
    job = store.get_job(args.id)
    if args.json:
        print(json.dumps(job.to_dict(), indent=2))
        return 0
    for key, value in job.to_dict().items():
        if value is not None and key not in ("plan_json", "result_json"):
            print(f"{key:20s} {_fmt(key, value)}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = store.request_cancel(args.id)
    print(f"job {job.id} cancelled" if job.status == "cancelled" else f"job {job.id}: cancel requested, "
          "the worker stops it at the next layer")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Foreground worker; SIGTERM ends it like Ctrl-C, so the running job is recorded instead of going stale."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if args.executor == "ray":
        from saten_core.jobs.executors.ray_dispatch import run_ray_worker

        ran = run_ray_worker(address=args.ray_address, gpus_per_job=args.gpus_per_job, drain=args.drain,
                             idle_exit_s=args.idle_exit, once=args.once)
    else:
        if args.ray_address is not None:
            raise ValueError("--ray-address needs --executor ray")
        ran = worker.run_worker(once=args.once, idle_exit_s=args.idle_exit, drain=args.drain)
    print(f"worker ran {ran} job(s)", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from saten_core.jobs.sweep import SweepConfig, submit_sweep

    config = SweepConfig(model=args.model, methods=args.methods, ratios=args.ratios, heal_steps=args.heal_steps,
                         evaluate=args.eval, tokens=args.tokens, device=args.device, dtype=args.dtype,
                         time_budget_s=args.time_budget)
    sweep_id, ids = submit_sweep(config)
    print(json.dumps({"sweep": sweep_id, "ids": ids}) if args.json else f"queued sweep {sweep_id}: jobs {ids}")
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def summary(job: store.Job) -> dict:
    return {k: getattr(job, k) for k in SUMMARY_COLUMNS}


def _fmt(key: str, value: object) -> str:
    if key.endswith("_at") and isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Plain fixed-width table for terminals; --json is the stable format for scripts."""
    if not rows:
        return "no jobs"
    cells = [[_fmt(k, v) if v is not None else "" for k, v in r.items()] for r in rows]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i][:60]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c[:60].ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
