"""The job worker: a separate process that runs queued compression jobs one at a time, with heartbeat and cancel."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saten_core.files import atomic_dir, atomic_write_text, saten_home
from saten_core.jobs import store

HEARTBEAT_S = 2.0  # well under store.STALE_AFTER_S, so a busy worker never looks dead
POLL_S = 1.0  # how often an idle worker looks for new jobs
PROGRESS_EVERY_S = 0.5  # progress rows are throttled; stage changes are always written
OOM_HINT = "CUDA out of memory: try a smaller rank or --device cpu"
_spawned: list[subprocess.Popen] = []  # children of this process, polled so they never linger as zombies


job_dir = store.job_dir  # kept here too: the dashboard and tests reach the job folder through the worker


def read_log(job_id: int) -> str:
    """The job's log text ('' before a worker starts it); the file is replaced atomically, so any read is whole."""
    path = job_dir(job_id) / "job.log"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


class JobLog:
    """The job's log file, rewritten atomically on every line so a reader never sees half a line."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def write(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.lines += [f"{stamp} {line}" for line in text.rstrip("\n").splitlines()]
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


@dataclass
class JobRun:
    """What the pipeline callbacks of one running job need: who owns it, since when, why it should stop."""

    job: store.Job
    pid: int
    log: JobLog
    t0: float = field(default_factory=time.monotonic)
    stage_t0: float = field(default_factory=time.monotonic)  # fractions are per stage, so is the ETA:
    stage_f0: float = 0.0  # rate = (fraction - stage_f0) / (now - stage_t0), from the stage's first report
    stop_reason: str | None = None  # "cancelled" or a time-budget message, once decided
    last_write: float = 0.0
    last_stage: str | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write(self, **values: Any) -> bool:
        """Record columns of the running job (the local worker writes the store itself)."""
        return store.update_running(self.job.id, self.pid, **values)

    def cancel_flag(self) -> bool:
        """Whether a cancel was requested (the local worker reads the store itself)."""
        return store.cancel_requested(self.job.id)

    def should_stop(self) -> bool:
        """Checked by the pipeline between layers: a cancel request or an exhausted time budget."""
        if self.stop_reason is None and self.cancel_flag():
            self.stop_reason = "cancelled"
        budget = self.job.time_budget_s
        if self.stop_reason is None and budget is not None and self.elapsed() > budget:
            self.stop_reason = f"time budget of {budget:g} s exceeded after {self.elapsed():.1f} s"
        return self.stop_reason is not None

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        """Record stage, fraction and the stage's ETA (time left at the rate seen so far); throttled DB writes.

        Also stops the job at stage boundaries (load, evaluate, save), not only between layers.
        """
        if self.should_stop():
            from saten_core.compress import Cancelled

            raise Cancelled(f"{self.stop_reason} at stage {stage}")
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        if stage == self.last_stage and fraction < 1.0 and now - self.last_write < PROGRESS_EVERY_S:
            return
        if stage != self.last_stage:
            self.log.write(f"[{stage}] {message}".rstrip())
            self.stage_t0, self.stage_f0 = now, fraction
        self.last_write, self.last_stage = now, stage
        done = fraction - self.stage_f0
        eta = (now - self.stage_t0) * (1.0 - fraction) / done if done > 0 else None
        self.write(stage=stage, fraction=fraction, eta_seconds=eta, message=message or None)


@contextlib.contextmanager
def heartbeat_thread(pid: int, job_id: int | None = None) -> Iterator[None]:
    """Beat every HEARTBEAT_S from a thread, so long layers or model loads never make the job look dead."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a locked DB for a moment must not kill the beat
                store.heartbeat(pid, job_id)

    store.heartbeat(pid, job_id)
    thread = threading.Thread(target=beat, name=f"saten-heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def metrics_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """The store's metric columns, taken from the pipeline report (top level or its "eval"/"latency" parts)."""
    places = [report, report.get("eval") or {}, report.get("totals") or {}, report.get("latency") or {},
              (report.get("eval") or {}).get("latency") or {}]
    out = {}
    for name in store.METRICS:
        value = next((p[name] for p in places if isinstance(p, dict) and p.get(name) is not None), None)
        out[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def failure_message(exc: BaseException) -> str:
    """A short readable reason: the OOM hint for CUDA OOM, the message itself for bad input, else type + text."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc):
        return OOM_HINT
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (ValueError, OSError)) and text:
        return text[:300]
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def free_device_memory() -> None:
    """Return cached GPU memory after every job, so a cancelled or failed job leaves the card clean.

    cuBLAS keeps a workspace (32 MiB on an H200) in the caching allocator after the first matmul; an idle
    worker should hold nothing, so that is released too (private API, present in CUDA builds of torch).
    """
    import torch

    gc.collect()
    if torch.cuda.is_available():
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def execute(job: store.Job, pid: int) -> str:
    """Run one claimed job to its final status and return it; never raises for errors of the job itself."""
    run = JobRun(job=job, pid=pid, log=JobLog(job_dir(job.id) / "job.log"))
    with heartbeat_thread(pid, job.id):
        try:
            status, values = run_job(run, reraise=True)
        except _Stopped as stop:  # Ctrl-C / SIGTERM / exit: record the job, then let the worker end
            _finish(run, *stop.outcome)
            raise stop.__cause__ from None
    _finish(run, status, values)
    return status


class _Stopped(Exception):
    """A BaseException (Ctrl-C, SIGTERM, exit) ended the job; `outcome` is its recorded (status, values)."""

    def __init__(self, outcome: tuple[str, dict[str, Any]]):
        super().__init__(outcome[0])
        self.outcome = outcome


def run_job(run: JobRun, *, reraise: bool = False) -> tuple[str, dict[str, Any]]:
    """(final status, column values) of one job run by `run`; shared by the local worker and Ray tasks.

    Never raises for errors of the job itself. reraise: a BaseException that is not an Exception (Ctrl-C,
    SIGTERM) is raised again as _Stopped carrying the outcome, so the worker records the job and then ends.
    """
    job = run.job
    run.log.write(f"job {job.id}: model {job.model_ref}, device {job.device_requested}, worker pid {run.pid}")
    try:
        return "succeeded", _run_pipeline(run)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row, KeyboardInterrupt included
        status, values = _classify(run, exc)
        run.log.write(traceback.format_exc() if status == "failed" else f"stopped: {values.get('message')}")
        if reraise and not isinstance(exc, Exception):
            raise _Stopped((status, values)) from exc
        return status, values
    finally:
        free_device_memory()


def _run_spectrum(run: JobRun) -> dict[str, Any]:
    """All-layer spectra of the job's model into the spectrum disk cache (the dashboard reads them from there)."""
    from saten_core.models import resolve_device
    from saten_core.spectrum import stored_spectra

    device = resolve_device(run.job.device_requested)
    run.write(device_used=device)
    run.progress("load", 0.0, f"loading {run.job.model_ref}")
    from saten_core.plan import Plan

    dtype = Plan.from_json(run.job.plan_json).torch_dtype()  # the dtype the pages load the weights at
    data = stored_spectra(run.job.model_ref, dtype=dtype, device=device, progress=run.progress)  # layer by layer
    summary = {"task": "spectrum", "fingerprint": data["fingerprint"], "layers": len(data["layers"]),
               "cached": data["cached"], "seconds": data.get("seconds")}
    return {"result_json": json.dumps(summary), "stage": "done", "fraction": 1.0, "eta_seconds": 0.0,
            "message": f"spectra of {len(data['layers'])} layers " + ("were cached" if data["cached"] else "cached")}


def _run_pipeline(run: JobRun) -> dict[str, Any]:
    """compress_to_dir into a temp sibling of jobs/<id>/model, renamed into place only on success."""
    from saten_core import pipeline

    if run.job.task == "spectrum":
        return _run_spectrum(run)
    from saten_core.models import resolve_device
    from saten_core.plan import Plan

    device = resolve_device(run.job.device_requested)
    run.write(device_used=device)
    out = job_dir(run.job.id) / "model"
    tokens = {} if run.job.eval_tokens is None else {"tokens": run.job.eval_tokens}
    with atomic_dir(out, overwrite=True) as tmp:
        report = pipeline.compress_to_dir(run.job.model_ref, Plan.from_json(run.job.plan_json), tmp,
                                          device=device, progress=run.progress, should_stop=run.should_stop,
                                          evaluate=run.job.evaluate, **tokens)
    # layer layouts only matter for reloading, and they live in model/report.json
    result_json = json.dumps({k: v for k, v in report.items() if k != "layouts"}, default=str)
    return {**metrics_from_report(report), "result_json": result_json, "artifact_dir": str(out),
            "stage": "done", "fraction": 1.0, "eta_seconds": 0.0, "message": "finished"}


def _classify(run: JobRun, exc: BaseException) -> tuple[str, dict[str, Any]]:
    """Cancel -> cancelled; time budget -> failed with that reason; anything else -> failed with a short reason."""
    if run.stop_reason == "cancelled" or (run.stop_reason is None and run.cancel_flag()):
        return "cancelled", {"message": f"cancelled during {run.last_stage or 'start-up'}", "eta_seconds": None}
    if run.stop_reason is not None:
        return "failed", {"error": run.stop_reason, "eta_seconds": None}
    if not isinstance(exc, Exception):
        why = f"worker was stopped ({type(exc).__name__}: {exc})" if str(exc) else f"worker was stopped ({exc!r})"
        return "failed", {"error": f"{why} during {run.last_stage or 'start-up'}", "eta_seconds": None}
    return "failed", {"error": failure_message(exc), "eta_seconds": None}


def _finish(run: JobRun, status: str, values: dict[str, Any]) -> None:
    if not store.update_running(run.job.id, run.pid, status=status, finished_at=time.time(), **values):
        run.log.write(f"job {run.job.id} was no longer owned by this worker; status {status} not recorded")
        return
    run.log.write(f"job {run.job.id} {status}" + (f": {values['error']}" if values.get("error") else ""))


def run_worker(*, once: bool = False, idle_exit_s: float | None = None, pid: int | None = None,
               drain: bool = False) -> int:
    """Recover stale jobs, then run queued jobs one at a time. Returns how many jobs ran.

    once: run at most one job and return. idle_exit_s: return after this long with an empty queue.
    drain: return as soon as the queue is empty (this worker runs one job at a time, so nothing else runs).
    Another worker holding saten_home()/worker.lock means this one returns 0 at once (one worker per home).
    """
    pid = os.getpid() if pid is None else pid
    with serving(pid) as got:
        return _loop(pid, once, 0.0 if drain else idle_exit_s) if got else 0


@contextlib.contextmanager
def serving(pid: int) -> Iterator[bool]:
    """The one worker (local or Ray dispatcher) of saten_home(): yields False, after saying so on stderr, when
    another holds worker.lock; else recovers stale jobs, yields True, and drops the worker row on exit."""
    with _worker_lock() as got:
        if not got:
            print(f"another worker already serves {saten_home()}; this one exits", file=sys.stderr)
            yield False
            return
        store.recover_stale()
        try:
            yield True
        finally:
            store.remove_worker(pid)


def _loop(pid: int, once: bool, idle_exit_s: float | None) -> int:
    ran, idle_since = 0, time.monotonic()
    while True:
        job = store.claim_next(pid)
        if job is not None:
            execute(job, pid)
            ran, idle_since = ran + 1, time.monotonic()
        if once or (idle_exit_s is not None and job is None and time.monotonic() - idle_since >= idle_exit_s):
            return ran
        if job is None:
            store.heartbeat(pid)
            time.sleep(POLL_S)


@contextlib.contextmanager
def _worker_lock() -> Iterator[bool]:
    """An exclusive flock on saten_home()/worker.lock; the kernel drops it when the process dies, even on SIGKILL."""
    with open(saten_home() / "worker.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_worker(*, idle_exit_s: float = 600.0) -> int:
    """Start a detached worker process unless a live one already heartbeats; returns the worker's pid.

    Used by the dashboard after a submit: the worker survives the page process and exits after idle_exit_s idle.
    """
    global _spawned
    _spawned = [p for p in _spawned if p.poll() is None]  # reap finished children
    store.recover_stale()
    live = store.live_workers()
    if live:
        return live[0]
    cmd = [sys.executable, "-m", "saten_core", "jobs", "worker", "--idle-exit", f"{idle_exit_s:g}"]
    with open(saten_home() / "worker.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]))
    _spawned.append(proc)
    return proc.pid
