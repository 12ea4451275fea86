"""Bench: the home page's guided demo, end to end, as a manager would run it (its three jobs, one worker, CPU).

Run: PYTHONPATH=. .venv/bin/python bench/bench_demo.py [--home DIR]
Submits the demo exactly as the Home page does (saten_core.demo.submit_demo: a reference job that measures the
original, the baseline at the same bytes, then the demo compression), runs one worker in this process until the
queue is empty, and prints each job's wall time and measured numbers as a Markdown table. SATEN_HOME defaults to
a fresh temporary folder, so nothing of a real store is touched; the embedded model cache is shared
(SATEN_MODEL_CACHE / setup.sh).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="SATEN_HOME for the job store (default: a new temp folder)")
    args = ap.parse_args()
    from saten_core.models import model_cache_dir

    os.environ.setdefault("SATEN_MODEL_CACHE", str(model_cache_dir()))  # keep the warm cache, new job store
    os.environ["SATEN_HOME"] = args.home or tempfile.mkdtemp(prefix="saten-demo-")
    from saten_core import jobs
    from saten_core.demo import DEMO_SCOPE, demo_plan, submit_demo
    from saten_core.jobs.worker import run_worker

    start = time.time()
    ids = submit_demo()
    run_worker(idle_exit_s=0.5)
    total = time.time() - start
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; demo = {demo_plan().method} on {DEMO_SCOPE}")
    print("| job | status | wall s | ppl | KL | top-1 | decode ms/token | changed-layer bytes kept |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for job_id, role in zip(ids, ("reference", "demo", "baseline"), strict=True):
        j = jobs.get_job(job_id)
        kept = f"{j.bytes_after / j.bytes_before:.3f}" if j.bytes_before else "-"
        print(f"| {job_id} {role} | {j.status} | "
              f"{j.finished_at - j.started_at:.1f} | {j.ppl:.2f} | {j.kl:.4f} | {j.top1_agreement:.3f} | "
              f"{j.decode_ms_per_token:.1f} | {kept} |")
    print(f"from the click to all three results: {total:.1f} s")


if __name__ == "__main__":
    main()
