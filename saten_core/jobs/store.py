"""The durable job queue: a SQLite table of compression jobs under SATEN_HOME, with atomic claim and recovery."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from saten_core.files import saten_home

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
STALE_AFTER_S = 30.0  # a running job whose heartbeat is older than this has lost its worker
METRICS = ("ppl", "kl", "top1_agreement", "bytes_before", "bytes_after", "prefill_ms", "decode_ms_per_token",
           "seconds")


@dataclass
class Job:
    """One row of the jobs table; `to_dict`/`from_dict` round-trip through JSON unchanged."""

    id: int
    created_at: float
    model_ref: str
    plan_json: str  # exactly Plan.to_json() of the submitted plan
    eval_json: str = "{}"  # evaluation settings, e.g. {"evaluate": true}
    device_requested: str = "auto"
    device_used: str | None = None
    time_budget_s: float | None = None
    status: str = "queued"
    cancel_requested: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    stage: str | None = None
    fraction: float = 0.0
    eta_seconds: float | None = None
    message: str | None = None
    error: str | None = None
    worker_pid: int | None = None
    heartbeat_at: float | None = None
    ppl: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    prefill_ms: float | None = None
    decode_ms_per_token: float | None = None
    seconds: float | None = None
    result_json: str | None = None  # the pipeline's report dict
    artifact_dir: str | None = None
    sweep: str | None = None  # the sweep id of a job queued by `jobs sweep` (jobs/sweep.py)
    executor: str | None = None  # "local" (jobs worker) or "ray" (its Ray dispatcher), set when claimed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown job fields: {', '.join(unknown)}")
        return cls(**d)

    @property
    def evaluate(self) -> bool:
        return bool(json.loads(self.eval_json or "{}").get("evaluate", False))

    @property
    def eval_tokens(self) -> int | None:
        return json.loads(self.eval_json or "{}").get("tokens")

    @property
    def task(self) -> str:
        """What the worker does with the row: "compress" (plan -> model folder) or "spectrum" (all-layer spectra)."""
        return json.loads(self.eval_json or "{}").get("task", "compress")

    @property
    def result(self) -> dict | None:
        return json.loads(self.result_json) if self.result_json else None


_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT"}
_COLUMN_TYPES = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "created_at": "REAL NOT NULL",
                 "model_ref": "TEXT NOT NULL", "plan_json": "TEXT NOT NULL", "status": "TEXT NOT NULL",
                 "cancel_requested": "INTEGER NOT NULL DEFAULT 0", "fraction": "REAL NOT NULL DEFAULT 0",
                 "bytes_before": "INTEGER", "bytes_after": "INTEGER", "worker_pid": "INTEGER"}


def _schema() -> str:
    """CREATE TABLE built from the dataclass, so the row type and the table cannot drift apart."""
    cols = [f"{f.name} {_COLUMN_TYPES.get(f.name, _guess_type(f.type))}" for f in fields(Job)]
    return f"CREATE TABLE IF NOT EXISTS jobs ({', '.join(cols)})"


def _guess_type(annotation: str) -> str:
    for py, sql in _SQL_TYPES.items():
        if py.__name__ in str(annotation):
            return sql
    return "TEXT"


_WORKERS_SCHEMA = "CREATE TABLE IF NOT EXISTS workers (pid INTEGER PRIMARY KEY, started_at REAL, heartbeat_at REAL)"
_local = threading.local()


def db_path() -> Path:
    """saten_home()/jobs.db, read at call time so SATEN_HOME set by tests or the app is honoured."""
    return saten_home() / "jobs.db"


def job_dir(job_id: int) -> Path:
    """saten_home()/jobs/<id>/: the job's log, and model/ (the artifact dir) once it succeeded."""
    return saten_home() / "jobs" / str(int(job_id))


def remove_partial_files(job_id: int) -> list[str]:
    """Delete the temp entries (".name.xxx.tmp") a killed worker left in the job folder; returns their names.

    Atomic writes only ever rename a finished temp into place, so after a SIGKILL the only debris is the temps:
    removing them leaves the folder as if the interrupted write had never started.
    """
    folder = job_dir(job_id)
    removed = sorted(p.name for p in folder.glob(".*")) if folder.is_dir() else []
    for name in removed:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    return removed


def connect() -> sqlite3.Connection:
    """This thread's connection to the current db_path() (one per process and thread, opened once)."""
    key = (os.getpid(), str(db_path()))
    conns: dict = _local.__dict__.setdefault("conns", {})
    if key not in conns:
        conns[key] = _open(Path(key[1]))
    return conns[key]


def _open(path: Path) -> sqlite3.Connection:
    """WAL so readers never block the worker; busy_timeout so concurrent writers wait instead of failing."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    with _transaction(conn):
        conn.execute(_schema())
        conn.execute(_WORKERS_SCHEMA)
        _add_new_columns(conn)
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, id)")
    return conn


def _add_new_columns(conn: sqlite3.Connection) -> None:
    """ALTER TABLE for Job fields a store made by an older version lacks (nullable, so old rows stay valid)."""
    have = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)").fetchall()}
    for f in fields(Job):
        if f.name not in have:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {f.name} {_COLUMN_TYPES.get(f.name, _guess_type(f.type))}")


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE takes the write lock up front, so read-then-write steps cannot interleave."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _job(row: sqlite3.Row) -> Job:
    return Job.from_dict(dict(row))


def insert_job(model_ref: str, plan_json: str, *, eval_settings: dict | None = None, device: str = "auto",
               time_budget_s: float | None = None, sweep: str | None = None) -> int:
    """Queue an already validated job and return its id (use jobs.submit for validation)."""
    with _transaction(connect()) as conn:
        return _insert(conn, model_ref, plan_json, eval_settings, device, time_budget_s, sweep)


def _insert(conn: sqlite3.Connection, model_ref: str, plan_json: str, eval_settings: dict | None, device: str,
            time_budget_s: float | None, sweep: str | None) -> int:
    cur = conn.execute(
        "INSERT INTO jobs (created_at, model_ref, plan_json, eval_json, device_requested, time_budget_s, status, "
        "sweep) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
        (time.time(), model_ref, plan_json, json.dumps(eval_settings or {}, sort_keys=True), device,
         time_budget_s, sweep))
    return int(cur.lastrowid)


def insert_jobs(rows: list[dict[str, Any]]) -> list[int]:
    """Queue several validated jobs in one transaction: all of them or (on any error) none. Each row holds
    insert_job's arguments by name (model_ref, plan_json, eval_settings, device, time_budget_s, sweep)."""
    with _transaction(connect()) as conn:
        return [_insert(conn, r["model_ref"], r["plan_json"], r.get("eval_settings"), r.get("device", "auto"),
                        r.get("time_budget_s"), r.get("sweep")) for r in rows]


def get_job(job_id: int) -> Job:
    """The job row; ValueError naming the id when it does not exist."""
    row = connect().execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
    if row is None:
        raise ValueError(f"unknown job id {job_id}")
    return _job(row)


def list_jobs(*, status: str | None = None, limit: int | None = None, sweep: str | None = None) -> list[Job]:
    """Newest first; optionally only one status, only one sweep's jobs."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown job status {status!r}; expected one of {', '.join(STATUSES)}")
    where = [(c, v) for c, v in (("status", status), ("sweep", sweep)) if v is not None]
    sql, args = "SELECT * FROM jobs", [v for _, v in where]
    if where:
        sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
    sql += " ORDER BY id DESC" + (" LIMIT ?" if limit is not None else "")
    args += [int(limit)] if limit is not None else []
    return [_job(r) for r in connect().execute(sql, args).fetchall()]


def request_cancel(job_id: int) -> Job:
    """A queued job is cancelled at once; a running one is flagged and its worker stops at the next layer."""
    with _transaction(connect()) as conn:
        job = get_job(job_id)
        if job.status in FINAL_STATUSES:
            raise ValueError(f"job {job_id} already {job.status}; nothing to cancel")
        if job.status == "queued":
            conn.execute("UPDATE jobs SET status='cancelled', cancel_requested=1, finished_at=?, "
                         "message='cancelled before it started' WHERE id=?", (time.time(), job.id))
        else:
            conn.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job.id,))
    return get_job(job_id)


def cancel_requested(job_id: int) -> bool:
    row = connect().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
    return bool(row and row[0])


def claim_next(pid: int, executor: str = "local") -> Job | None:
    """Atomically move the oldest queued job to running for worker `pid`; None when the queue is empty.

    One UPDATE ... WHERE status='queued' RETURNING inside BEGIN IMMEDIATE, so two workers never get the same job.
    executor: who runs it, "local" (the worker process itself) or "ray" (a Ray task of dispatcher `pid`).
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; expected 'local' or 'ray'")
    now = time.time()
    with _transaction(connect()) as conn:
        row = conn.execute(
            "UPDATE jobs SET status='running', started_at=?, heartbeat_at=?, worker_pid=?, stage='starting', "
            "fraction=0, message=NULL, executor=? WHERE id = (SELECT id FROM jobs WHERE status='queued' ORDER BY id "
            "LIMIT 1) AND status='queued' RETURNING *", (now, now, pid, executor)).fetchone()
    return _job(row) if row is not None else None


def update_running(job_id: int, pid: int, **values: Any) -> bool:
    """Set columns of a job this worker still owns; False when it was recovered or finished meanwhile."""
    bad = sorted(set(values) - {f.name for f in fields(Job)} - {"id"})
    if bad or "id" in values:
        raise ValueError(f"cannot update job columns {bad or ['id']}")
    sets = ", ".join(f"{k} = ?" for k in values)
    with _transaction(connect()) as conn:
        cur = conn.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND status = 'running' AND worker_pid = ?",
                           [*values.values(), int(job_id), int(pid)])
    return cur.rowcount == 1


def heartbeat(pid: int, job_id: int | None = None) -> None:
    """Record that worker `pid` (and the job it runs) is alive now."""
    now = time.time()
    with _transaction(connect()) as conn:
        conn.execute("INSERT INTO workers (pid, started_at, heartbeat_at) VALUES (?, ?, ?) "
                     "ON CONFLICT(pid) DO UPDATE SET heartbeat_at = excluded.heartbeat_at", (pid, now, now))
        if job_id is not None:
            conn.execute("UPDATE jobs SET heartbeat_at=? WHERE id=? AND status='running' AND worker_pid=?",
                         (now, job_id, pid))


def remove_worker(pid: int) -> None:
    with _transaction(connect()) as conn:
        conn.execute("DELETE FROM workers WHERE pid = ?", (pid,))


def live_workers(now: float | None = None) -> list[int]:
    """Pids of workers with a fresh heartbeat whose process still exists."""
    now = time.time() if now is None else now
    rows = connect().execute("SELECT pid, heartbeat_at FROM workers").fetchall()
    return [r["pid"] for r in rows if now - (r["heartbeat_at"] or 0) <= STALE_AFTER_S and pid_alive(r["pid"])]


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists and is not a zombie (a killed child nobody has waited for yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def stale_reason(job: Job, now: float) -> str | None:
    """Why a running job has lost its worker, or None while it looks alive."""
    if job.worker_pid is not None and not pid_alive(job.worker_pid):
        return f"worker process {job.worker_pid} died while the job was running (stage {job.stage})"
    age = now - (job.heartbeat_at or job.started_at or job.created_at)
    if age > STALE_AFTER_S:
        return f"worker process {job.worker_pid} stopped sending heartbeats {age:.0f} s ago (stage {job.stage})"
    return None


def recover_stale(now: float | None = None) -> list[int]:
    """Mark running jobs whose worker is dead or silent as failed with the reason; returns their ids.

    Their half-written temp files are removed too, so a recovered job's folder holds only whole files.
    """
    now = time.time() if now is None else now
    recovered = []
    for job in list_jobs(status="running"):
        reason = stale_reason(job, now)
        if reason is None:
            continue
        with _transaction(connect()) as conn:
            cur = conn.execute("UPDATE jobs SET status='failed', error=?, finished_at=?, eta_seconds=NULL "
                               "WHERE id=? AND status='running' AND worker_pid IS ?",
                               (reason, now, job.id, job.worker_pid))
        if cur.rowcount:
            recovered.append(job.id)
            remove_partial_files(job.id)
    _forget_dead_workers(now)
    return recovered


def _forget_dead_workers(now: float) -> None:
    """Drop worker rows that no longer heartbeat; writes only when there is one (list/show poll often)."""
    alive = set(live_workers(now))
    dead = [pid for (pid,) in connect().execute("SELECT pid FROM workers").fetchall() if pid not in alive]
    if dead:
        with _transaction(connect()) as conn:
            conn.executemany("DELETE FROM workers WHERE pid = ?", [(pid,) for pid in dead])


def submit(model_ref: str, plan_json: str, *, evaluate: bool = False, tokens: int | None = None,
           device: str = "auto", time_budget_s: float | None = None) -> int:
    """Validate, then queue a compression job; returns its id. Bad input raises ValueError and queues nothing.

    The plan is parsed and validated and stored exactly as Plan.to_json(); the model must be a registry name,
    an existing local HF folder or (online only) a hub id. Weights are not loaded here: that is the worker's job.
    tokens: evaluation length (None -> the pipeline's default); only meaningful with evaluate.
    Example:
        job_id = submit("smollm2-135m", Plan(method="saten", target_ratio=0.8).to_json(), evaluate=True)
        get_job(job_id).status == "queued"
    """
    return insert_job(**checked_job(model_ref, plan_json, evaluate=evaluate, tokens=tokens, device=device,
                                    time_budget_s=time_budget_s))


def checked_job(model_ref: str, plan_json: str, *, evaluate: bool = False, tokens: int | None = None,
                device: str = "auto", time_budget_s: float | None = None, sweep: str | None = None) -> dict:
    """submit's validation without the insert: insert_job's arguments, or ValueError naming the bad value."""
    from saten_core.plan import Plan

    try:
        plan = Plan.from_json(plan_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"plan is not valid JSON: {exc}") from None
    plan.validate()
    if plan.calib not in (None, "default"):
        from saten_core.files import check_text_path

        check_text_path(plan.calib)
    model_ref = check_model_ref(model_ref)
    device = check_device(device)
    if time_budget_s is not None and not float(time_budget_s) > 0:
        raise ValueError(f"time budget must be a positive number of seconds, got {time_budget_s!r}")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 2):
        raise ValueError(f"evaluation tokens must be an integer >= 2, got {tokens!r}")
    return {"model_ref": model_ref, "plan_json": plan.to_json(), "device": device, "sweep": sweep,
            "eval_settings": {"evaluate": bool(evaluate), "tokens": tokens},
            "time_budget_s": None if time_budget_s is None else float(time_budget_s)}


def submit_reference(model_ref: str, *, tokens: int | None = None, device: str = "auto",
                     dtype: str | None = None) -> int | None:
    """Queue an evaluated run of the original model (a plan that changes nothing), unless one is already there.

    Speed is only comparable on one machine, so the Results and ROI pages compare a run's decode time with the
    original's measured by such a job on the same device. "Already there": a queued, running or succeeded
    reference job of this model, device request and evaluation length. Returns the new job's id, or None.
    """
    from saten_core.plan import reference_plan

    ref, plan_json = check_model_ref(model_ref), reference_plan(dtype).to_json()
    for job in list_jobs():
        if (job.model_ref, job.plan_json, job.device_requested, job.eval_tokens) == (ref, plan_json, device, tokens) \
                and job.task == "compress" and job.evaluate and job.status in ("queued", "running", "succeeded"):
            return None
    return submit(ref, plan_json, evaluate=True, tokens=tokens, device=device)


def submit_baselines(model_ref: str, plan_json: str, methods: list[str], *, evaluate: bool = True,
                     tokens: int | None = None, device: str = "auto", time_budget_s: float | None = None,
                     model: Any = None) -> list[tuple[str, int | None, str | None]]:
    """Queue one job per method at the plan's byte budget (plan.baseline_plan): (method, job id, None) when
    queued, (method, None, reason) when that method cannot run this plan. One refusal does not stop the others.

    A plan without a target_ratio (allocated, or fixed rank/density) is measured on `model` (loaded when not
    given) to find the ratio of bytes it keeps.
    """
    from saten_core.plan import Plan, baseline_plan

    plan = Plan.from_json(plan_json)
    if not methods:
        return []
    try:
        ratio = _plan_ratio(model_ref, plan, model)
    except ValueError as exc:
        return [(method, None, str(exc)) for method in methods]
    done: list[tuple[str, int | None, str | None]] = []
    for method in methods:
        try:
            job_id = submit(model_ref, baseline_plan(plan, method, ratio).to_json(), evaluate=evaluate,
                            tokens=tokens, device=device, time_budget_s=time_budget_s)
            done.append((method, job_id, None))
        except ValueError as exc:
            done.append((method, None, str(exc)))
    return done


def _plan_ratio(model_ref: str, plan: Any, model: Any) -> float:
    """The plan's kept byte ratio; the model is loaded (on the CPU) only when the plan has no target_ratio."""
    from saten_core.plan import budget_ratio

    if plan.target_ratio is None and model is None:
        from saten_core.models import load_model

        model = load_model(check_model_ref(model_ref), device="cpu").model
    return budget_ratio(model, plan)


def submit_spectrum(model_ref: str, *, device: str = "auto", dtype: str | None = None) -> int:
    """Queue the all-layer spectrum scan of a model (minutes on a CPU); the worker fills the disk cache.

    It is a job, not a call in the dashboard process, so it shows progress, can be cancelled and survives the page.
    The row carries a plan that changes nothing (the table needs one) whose dtype is the one the weights are
    scanned at (the spectra cache is keyed by the weights, so it must be the dtype the pages load); `Job.task`
    says "spectrum".
    """
    from saten_core.plan import reference_plan

    settings = {"task": "spectrum", "evaluate": False, "tokens": None}
    return insert_job(check_model_ref(model_ref), reference_plan(dtype).to_json(), eval_settings=settings,
                      device=check_device(device))


def check_model_ref(ref: str) -> str:
    """The reference the worker should load: registry names and hub ids as given, folders made absolute."""
    from saten_core.models import HUB_ID, REGISTRY, check_weights

    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"model reference must be a non-empty string, got {ref!r}")
    if ref in REGISTRY:
        return ref
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"no config.json in model folder {ref!r}")
        check_weights(path)
        return str(path.resolve())
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if HUB_ID.match(ref) and not path.exists() and not ref.startswith((".", "~")) and not offline:
        return ref
    raise ValueError(f"unknown model {ref!r}: not a registry name ({', '.join(REGISTRY)}), an existing local "
                     "folder" + (" (hub ids need network; HF_HUB_OFFLINE is set)" if offline else " or a hub id"))


def check_device(device: str) -> str:
    """Accept auto, cpu, cuda, cuda:N without touching CUDA: the worker's machine decides what it has."""
    dev = device.strip().lower() if isinstance(device, str) else ""
    if dev not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", dev):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev
