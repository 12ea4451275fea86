"""Background compression jobs: a durable SQLite queue (store) and the process that runs it (worker).

Example:
    from saten_core import jobs
    job_id = jobs.submit("smollm2-135m", plan.to_json(), evaluate=True)
    jobs.ensure_worker()                 # detached worker process, survives the dashboard
    jobs.get_job(job_id).status          # queued -> running -> succeeded | failed | cancelled
"""

from saten_core.jobs.store import (
    FINAL_STATUSES,
    STATUSES,
    Job,
    get_job,
    list_jobs,
    recover_stale,
    request_cancel,
    submit,
    submit_baselines,
    submit_reference,
    submit_spectrum,
)
from saten_core.jobs.sweep import SweepConfig, submit_sweep
from saten_core.jobs.worker import ensure_worker, job_dir, read_log, run_worker

__all__ = ["FINAL_STATUSES", "STATUSES", "Job", "SweepConfig", "ensure_worker", "get_job", "job_dir", "list_jobs",
           "read_log", "recover_stale", "request_cancel", "run_worker", "submit", "submit_baselines",
           "submit_reference", "submit_spectrum", "submit_sweep"]
