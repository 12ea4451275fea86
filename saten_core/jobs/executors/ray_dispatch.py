"""The Ray executor: a dispatcher claims queued jobs from the SQLite store and runs each as a Ray task.

Why this shape: the job store stays the single record (the dispatcher is its only writer: tasks stream progress
back through a small actor, and the dispatcher heartbeats every job it runs), while Ray places the work. Each task
gets `num_gpus` (fractional allowed) in a fresh worker process (`max_calls=1`, so GPU memory goes back with the
process), `max_retries=0` (a failed job runs once). The dispatcher claims no more jobs than the cluster has slots
(free GPUs / gpus_per_job, or CPUs when it has no GPU), so no claimed job waits inside Ray looking "running".
Cancel: the task's should_stop sees the flag at the next layer; after CANCEL_GRACE_S the task is killed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saten_core.jobs import store

POLL_S = 0.25
CANCEL_GRACE_S = 10.0  # a cancelled task that has not stopped by itself after this long is killed
CHECK_CANCEL_S = 0.5  # how often a task asks the channel whether it was cancelled


class Channel:
    """A Ray actor between the dispatcher and its tasks: progress posts one way, cancel flags the other."""

    def __init__(self) -> None:
        self.posts: list[tuple[int, dict]] = []
        self.cancelled: set[int] = set()

    def post(self, job_id: int, values: dict) -> None:
        self.posts.append((job_id, values))

    def take(self) -> list[tuple[int, dict]]:
        posts, self.posts = self.posts, []
        return posts

    def cancel(self, job_id: int) -> None:
        self.cancelled.add(job_id)

    def is_cancelled(self, job_id: int) -> bool:
        return job_id in self.cancelled


def _remote_run_class():
    """RemoteRun: a JobRun that posts to the channel instead of writing the store (defined lazily: worker imports)."""
    from saten_core.jobs.worker import JobRun

    @dataclass
    class RemoteRun(JobRun):
        channel: Any = None
        checked_at: float = 0.0
        cancel_seen: bool = field(default=False)

        def write(self, **values: Any) -> bool:
            self.channel.post.remote(self.job.id, values)
            return True

        def cancel_flag(self) -> bool:
            import ray

            now = time.monotonic()
            if not self.cancel_seen and now - self.checked_at >= CHECK_CANCEL_S:
                self.checked_at = now
                self.cancel_seen = bool(ray.get(self.channel.is_cancelled.remote(self.job.id)))
            return self.cancel_seen

    return RemoteRun


def run_task(job_dict: dict, home: str, channel: Any) -> tuple[str, dict]:
    """The body of one job's Ray task, in its own worker process: (final status, column values)."""
    os.environ["SATEN_HOME"] = home  # the job folder lives under the dispatcher's home (shared across nodes)
    import ray

    from saten_core.jobs.worker import JobLog, job_dir, run_job

    job = store.Job.from_dict(job_dict)
    run = _remote_run_class()(job=job, pid=os.getpid(), log=JobLog(job_dir(job.id) / "job.log"), channel=channel)
    run.log.write(f"ray task on node {ray.get_runtime_context().get_node_id()}")
    return run_job(run)


@dataclass
class Running:
    """A job the dispatcher has handed to Ray."""

    job: store.Job
    ref: Any
    cancel_at: float | None = None  # monotonic time the cancel was passed on
    forced: bool = False


def job_slots(ray: Any, gpus_per_job: float, running: int = 0) -> int:
    """How many of this dispatcher's jobs may run at once: whole multiples of gpus_per_job in the GPUs not held
    by others (the cluster's total less what is in use beyond our `running` jobs), else the cluster's CPUs.

    At least 1 on a cluster that has GPUs at all: a job then waits in Ray for one to come free.
    """
    if not gpus_per_job > 0:
        raise ValueError(f"--gpus-per-job must be > 0, got {gpus_per_job!r}")
    total = ray.cluster_resources()
    gpus = float(total.get("GPU", 0.0))
    if gpus > 0:
        in_use = gpus - float(ray.available_resources().get("GPU", 0.0))
        others = max(0.0, in_use - running * gpus_per_job)  # ours may be pending, so never below zero
        return max(1, int((gpus - others) / gpus_per_job + 1e-9))
    return max(1, int(total.get("CPU", 1)))


def start_ray(address: str | None, **init: Any) -> bool:
    """Connect to `address`, or start a local instance; True when this call started (and must stop) Ray."""
    import ray

    if ray.is_initialized():
        return False
    repo = str(Path(__file__).resolve().parents[3])  # local workers import saten_core from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False, **init)
    return True


def dispatch(pid: int, *, gpus_per_job: float = 1.0, drain: bool = False, idle_exit_s: float | None = None,
             once: bool = False) -> int:
    """Claim, run and record jobs through Ray until drained / idle / once; returns how many jobs finished."""
    import ray

    channel = ray.remote(Channel).options(num_cpus=0).remote()
    gpus = _has_gpus(ray)
    task = ray.remote(max_calls=1, max_retries=0)(run_task).options(num_cpus=0 if gpus else 1,
                                                                    num_gpus=gpus_per_job if gpus else 0)
    running: dict[int, Running] = {}
    finished, idle_since, claimed = 0, time.monotonic(), 0
    try:
        while True:
            slots = job_slots(ray, gpus_per_job, len(running))  # GPUs other drivers took are not ours to fill
            while len(running) < slots and not (once and claimed):
                job = store.claim_next(pid, executor="ray")
                if job is None:
                    break
                claimed += 1
                running[job.id] = Running(job, task.remote(job.to_dict(), str(store.saten_home()), channel))
            _apply_posts(ray, channel, pid)
            for run in running.values():
                store.heartbeat(pid, run.job.id)
                _pass_cancel(ray, channel, run)
            done, _ = ray.wait([r.ref for r in running.values()], num_returns=1, timeout=POLL_S) if running \
                else ([], [])
            for ref in done:
                job_id = next(i for i, r in running.items() if r.ref == ref)
                _apply_posts(ray, channel, pid)
                _finish(ray, pid, running.pop(job_id))
                finished, idle_since = finished + 1, time.monotonic()
            if running:
                continue
            store.heartbeat(pid)
            if _should_exit(once and claimed > 0, drain, idle_exit_s, idle_since):
                return finished
            time.sleep(POLL_S)
    finally:
        for run in running.values():  # the dispatcher is going away (Ctrl-C, SIGTERM): record, then kill its tasks
            ray.cancel(run.ref, force=True)
            store.update_running(run.job.id, pid, status="failed", finished_at=time.time(), eta_seconds=None,
                                 error="the Ray dispatcher was stopped while the job ran")
            store.remove_partial_files(run.job.id)


def _should_exit(once_done: bool, drain: bool, idle_exit_s: float | None, idle_since: float) -> bool:
    """With nothing running: --once after its job; --drain or --idle-exit once the queue is empty (and idle)."""
    if once_done:
        return True
    if _queued():
        return False
    return drain or (idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s)


def _has_gpus(ray: Any) -> bool:
    return float(ray.cluster_resources().get("GPU", 0.0)) > 0


def _queued() -> bool:
    return bool(store.list_jobs(status="queued", limit=1))


def _apply_posts(ray: Any, channel: Any, pid: int) -> None:
    """Write the tasks' progress posts into the store (only rows this dispatcher still owns change)."""
    for job_id, values in ray.get(channel.take.remote()):
        store.update_running(job_id, pid, **values)


def _pass_cancel(ray: Any, channel: Any, run: Running) -> None:
    """A cancel requested in the store goes to the task (soft); after the grace period the task is killed."""
    now = time.monotonic()
    if run.cancel_at is None and store.cancel_requested(run.job.id):
        run.cancel_at = now
        ray.get(channel.cancel.remote(run.job.id))
    elif run.cancel_at is not None and not run.forced and now - run.cancel_at > CANCEL_GRACE_S:
        run.forced = True
        ray.cancel(run.ref, force=True)


def _finish(ray: Any, pid: int, run: Running) -> None:
    """Record a finished task's outcome; a killed or crashed task leaves no partial files behind."""
    try:
        status, values = ray.get(run.ref)
    except Exception as exc:  # noqa: BLE001 - the task died (killed, crashed): the job row says why
        status, values = _lost(run, exc)
        store.remove_partial_files(run.job.id)
    values = {k: v for k, v in values.items() if k != "finished_at"}
    store.update_running(run.job.id, pid, status=status, finished_at=time.time(), **values)


def _lost(run: Running, exc: Exception) -> tuple[str, dict]:
    if run.cancel_at is not None:
        return "cancelled", {"message": "cancelled (the Ray task was stopped)", "eta_seconds": None}
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "failed", {"error": f"Ray task ended without a result: {type(exc).__name__}: {text}"[:300],
                      "eta_seconds": None}


def run_ray_worker(*, address: str | None = None, gpus_per_job: float = 1.0, drain: bool = False,
                   idle_exit_s: float | None = None, once: bool = False, pid: int | None = None,
                   **init: Any) -> int:
    """`jobs worker --executor ray`: one dispatcher per SATEN_HOME (the worker lock), stale jobs recovered first."""
    from saten_core.jobs.worker import serving

    pid = os.getpid() if pid is None else pid
    with serving(pid) as got:
        if not got:
            return 0
        started = start_ray(address, **init)
        try:
            return dispatch(pid, gpus_per_job=gpus_per_job, drain=drain, idle_exit_s=idle_exit_s, once=once)
        finally:
            if started:
                import ray

                ray.shutdown()
