"""Job store and worker: submit, run, cancel, SIGKILL recovery, concurrency, reopen, bad input.

Run: .venv/bin/python -m pytest -q tests/test_jobs.py
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from saten_core.jobs import store, worker
from saten_core.plan import Override, Plan
from tests.conftest import kill_worker_at, wait_for
from tests.conftest import saten_cli as cli

pytestmark = pytest.mark.usefixtures("job_home")
REPO = Path(__file__).resolve().parents[1]
PLAN = Plan(method="saten", rank=4, density=0.05).to_json()


def leftovers(job_id: int) -> list[str]:
    """Anything in the job folder besides the log: a cancelled/failed job must leave no (partial) artifacts."""
    folder = worker.job_dir(job_id)
    return sorted(p.name for p in folder.iterdir() if p.name != "job.log") if folder.exists() else []


def test_submit_then_worker_once_succeeds_with_metrics(tiny_llama_dir: Path, job_home: Path):
    job_id = store.submit(str(tiny_llama_dir), PLAN, evaluate=True, tokens=256, device="cpu")
    assert store.get_job(job_id).status == "queued"
    assert worker.run_worker(once=True) == 1
    job = store.get_job(job_id)
    assert job.status == "succeeded", job.error
    assert job.device_used == "cpu" and job.fraction == 1.0 and job.finished_at >= job.started_at
    assert math.isfinite(job.ppl) and job.ppl > 1
    assert job.kl >= 0 and 0 <= job.top1_agreement <= 1
    assert 0 < job.bytes_after < job.bytes_before
    assert job.prefill_ms > 0 and job.decode_ms_per_token > 0 and job.seconds > 0
    assert json.loads(job.result_json)["totals"]["bytes_after"] == job.bytes_after
    model_dir = Path(job.artifact_dir)
    assert model_dir == worker.job_dir(job_id) / "model" and (model_dir / "report.json").is_file()
    assert leftovers(job_id) == ["model"]
    assert "[compress]" in worker.read_log(job_id) and "succeeded" in worker.read_log(job_id)
    reopened = cli("jobs", "show", str(job_id), "--json", home=job_home)  # a fresh process: the result persisted
    assert reopened.returncode == 0 and store.Job.from_dict(json.loads(reopened.stdout)) == job


def test_plan_is_stored_exactly_as_plan_to_json(tiny_llama_dir: Path):
    compact = json.dumps(json.loads(PLAN))  # same plan, other formatting
    job = store.get_job(store.submit(str(tiny_llama_dir), compact))
    assert job.plan_json == Plan.from_json(compact).to_json()
    assert job.model_ref == str(tiny_llama_dir.resolve())


@pytest.mark.parametrize("model, plan, match", [
    ("no-such-model", PLAN, "no-such-model"),
    ("/definitely/not/a/folder", PLAN, "not/a/folder"),
    (None, '{"method": "saten", "rank": 0}', "0"),
    (None, '{"method": "magic"}', "magic"),
    (None, '{"rnak": 4}', "rnak"),
    (None, "not json", "not valid JSON"),
])
def test_bad_plan_or_model_is_rejected_and_never_queued(tiny_llama_dir: Path, model, plan, match):
    with pytest.raises(ValueError, match=match):
        store.submit(model or str(tiny_llama_dir), plan)
    assert store.list_jobs() == []


def test_bad_device_or_budget_is_rejected(tiny_llama_dir: Path):
    with pytest.raises(ValueError, match="tpu"):
        store.submit(str(tiny_llama_dir), PLAN, device="tpu")
    with pytest.raises(ValueError, match="-5"):
        store.submit(str(tiny_llama_dir), PLAN, time_budget_s=-5)
    assert store.list_jobs() == []


def test_cancel_mid_run_leaves_no_artifacts(slow_llama_dir: Path, monkeypatch: pytest.MonkeyPatch):
    freed: list[bool] = []
    real_free = worker.free_device_memory
    monkeypatch.setattr(worker, "free_device_memory", lambda: (freed.append(True), real_free()))
    job_id = store.submit(str(slow_llama_dir), PLAN, device="cpu")

    def cancel_when_compressing() -> None:
        wait_for(lambda: store.get_job(job_id).stage == "compress")
        store.request_cancel(job_id)

    canceller = threading.Thread(target=cancel_when_compressing)
    canceller.start()
    worker.run_worker(once=True)
    canceller.join()
    job = store.get_job(job_id)
    assert job.status == "cancelled", (job.status, job.error)
    assert job.cancel_requested == 1 and job.artifact_dir is None and job.ppl is None
    assert "compress" in job.message and job.fraction < 1.0  # stopped between layers, not at the end
    assert leftovers(job_id) == [] and freed == [True]


def test_cancel_queued_job_is_immediate_and_never_runs(tiny_llama_dir: Path):
    job_id = store.submit(str(tiny_llama_dir), PLAN)
    assert store.request_cancel(job_id).status == "cancelled"
    assert worker.run_worker(once=True) == 0
    assert store.get_job(job_id).started_at is None
    with pytest.raises(ValueError, match="already cancelled"):
        store.request_cancel(job_id)


def test_reference_job_is_queued_once_per_model_device_and_length(tiny_llama_dir: Path):
    """The original is timed once per (model, device, tokens); a failed or cancelled one does not count."""
    first = store.submit_reference(str(tiny_llama_dir))
    job = store.get_job(first)
    assert job.evaluate and Plan.from_json(job.plan_json).exclude == ["*"]
    assert store.submit_reference(str(tiny_llama_dir)) is None  # queued already
    worker.run_worker(once=True)
    assert store.get_job(first).status == "succeeded"
    assert store.submit_reference(str(tiny_llama_dir)) is None  # done already
    other = [store.submit_reference(str(tiny_llama_dir), device="cpu"),
             store.submit_reference(str(tiny_llama_dir), tokens=64)]
    assert None not in other and len(set(other)) == 2
    store.request_cancel(other[0])
    assert store.submit_reference(str(tiny_llama_dir), device="cpu") not in (None, *other)
    with pytest.raises(ValueError, match="device"):
        store.submit_reference(str(tiny_llama_dir), device="tpu")


def test_baselines_are_queued_at_the_same_budget_and_refusals_reported(tiny_llama_dir: Path):
    plan = Plan(method="saten", target_ratio=0.6, overrides=[Override("*", rank=2, density=0.1)]).to_json()
    done = store.submit_baselines(str(tiny_llama_dir), plan, ["prune", "svd"], device="cpu")
    assert [(m, i is not None, e) for m, i, e in done] == [("prune", True, None), ("svd", True, None)]
    queued = [Plan.from_json(store.get_job(i).plan_json) for _, i, _ in done]
    assert [(p.method, p.target_ratio, p.overrides) for p in queued] == [("prune", 0.6, []), ("svd", 0.6, [])]
    assert all(store.get_job(i).evaluate for _, i, _ in done)
    fixed = store.submit_baselines(str(tiny_llama_dir), Plan(method="saten", rank=2).to_json(), ["prune"])
    ratio = Plan.from_json(store.get_job(fixed[0][1]).plan_json).target_ratio
    assert 0 < ratio < 1  # measured on the model: a rank-2 plan has no target_ratio of its own
    refused = store.submit_baselines(str(tiny_llama_dir), Plan(method="saten", eps=0.3).to_json(), ["wanda", "svd"])
    assert [i for _, i, _ in refused] == [None, None] and all("error-bound" in e for _, _, e in refused)


def test_time_budget_fails_with_reason(slow_llama_dir: Path):
    job_id = store.submit(str(slow_llama_dir), PLAN, device="cpu", time_budget_s=1e-3)
    worker.run_worker(once=True)
    job = store.get_job(job_id)
    assert job.status == "failed" and "time budget of 0.001 s exceeded" in job.error
    assert leftovers(job_id) == []


def test_pipeline_error_becomes_failed_job_with_short_reason(tiny_llama_dir: Path):
    # rank 1000 passes plan validation but exceeds what a 64-wide layer allows, so the engine raises
    job_id = store.submit(str(tiny_llama_dir), Plan(method="svd", rank=1000).to_json(), device="cpu")
    worker.run_worker(once=True)
    job = store.get_job(job_id)
    assert job.status == "failed" and "1000" in job.error and "\n" not in job.error
    assert "Traceback" in (worker.job_dir(job_id) / "job.log").read_text()
    assert leftovers(job_id) == []


def test_progress_records_stage_fraction_and_eta(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(worker, "PROGRESS_EVERY_S", 0.0)
    store.submit(str(tiny_llama_dir), PLAN)
    job = store.claim_next(os.getpid())
    run = worker.JobRun(job=job, pid=os.getpid(), log=worker.JobLog(worker.job_dir(job.id) / "job.log"))
    run.progress("compress", 0.1, "layer 1")
    assert store.get_job(job.id).eta_seconds is None  # no rate yet
    run.progress("compress", 0.4, "layer 4")
    row = store.get_job(job.id)
    assert (row.stage, row.fraction, row.message) == ("compress", 0.4, "layer 4") and row.eta_seconds >= 0
    run.progress("compress", 1.0, "done")
    assert store.get_job(job.id).eta_seconds == 0
    store.request_cancel(job.id)
    with pytest.raises(Exception, match="cancelled at stage save"):
        run.progress("save", 0.0, "writing")


def test_progress_is_stage_agnostic(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Stages the pipeline may add (calibrate, heal, ...) get the same per-stage fraction, ETA and log line."""
    monkeypatch.setattr(worker, "PROGRESS_EVERY_S", 0.0)
    store.submit(str(tiny_llama_dir), PLAN)
    job = store.claim_next(os.getpid())
    run = worker.JobRun(job=job, pid=os.getpid(), log=worker.JobLog(worker.job_dir(job.id) / "job.log"))
    for stage in ("calibrate", "heal"):
        run.progress(stage, 0.0, f"{stage} start")
        assert store.get_job(job.id).eta_seconds is None  # a new stage starts without a rate
        time.sleep(0.01)
        run.progress(stage, 0.5, f"{stage} half")
        row = store.get_job(job.id)
        assert (row.stage, row.fraction) == (stage, 0.5) and row.eta_seconds > 0
    assert "[calibrate] calibrate start" in worker.read_log(job.id) and "[heal] heal start" in worker.read_log(job.id)


def test_cuda_oom_reason_has_hint():
    import torch

    assert worker.failure_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 2 GiB")) == worker.OOM_HINT
    assert worker.failure_message(RuntimeError("boom\nmore")) == "RuntimeError: boom"


def test_sigkill_worker_mid_run_then_recovery_and_next_job(slow_llama_dir: Path, tiny_llama_dir: Path,
                                                           job_home: Path):
    first = store.submit(str(slow_llama_dir), PLAN, device="cpu")
    second = store.submit(str(tiny_llama_dir), PLAN, device="cpu")  # queued before the crash: must survive it
    def half_written() -> None:
        assert any(p.name.startswith(".model.") for p in worker.job_dir(first).iterdir())  # half-written dir

    pid = kill_worker_at(first, "compress", job_home, before_kill=half_written)
    assert store.recover_stale() == [first]
    job = store.get_job(first)
    assert job.status == "failed" and f"worker process {pid} died" in job.error
    assert store.connect().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert leftovers(first) == []  # recovery removed the temp model dir the killed worker was writing
    assert store.get_job(second).status == "queued"
    assert worker.run_worker(once=True) == 1
    assert store.get_job(second).status == "succeeded"
    assert store.get_job(first).status == "failed"


def test_sigterm_stops_worker_and_records_the_job(slow_llama_dir: Path, job_home: Path):
    job_id = store.submit(str(slow_llama_dir), PLAN, device="cpu")
    env = {**os.environ, "SATEN_HOME": str(job_home)}
    proc = subprocess.Popen([sys.executable, "-m", "saten_core", "jobs", "worker"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.get_job(job_id).stage == "compress" or proc.poll() is not None, every=0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    job = store.get_job(job_id)
    assert job.status == "failed" and "worker was stopped" in job.error and "compress" in job.error
    assert leftovers(job_id) == [] and store.live_workers() == []


def test_silent_worker_is_recovered_after_30_s(tiny_llama_dir: Path):
    job_id = store.submit(str(tiny_llama_dir), PLAN)
    job = store.claim_next(os.getpid())  # this process is alive, so only the heartbeat age can fail it
    assert job.id == job_id and store.recover_stale(time.time() + 5) == []
    assert store.recover_stale(time.time() + store.STALE_AFTER_S + 5) == [job_id]
    assert "stopped sending heartbeats" in store.get_job(job_id).error


def test_heartbeat_thread_keeps_a_long_job_fresh(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(worker, "HEARTBEAT_S", 0.05)
    store.submit(str(tiny_llama_dir), PLAN)
    job = store.claim_next(os.getpid())
    with worker.heartbeat_thread(os.getpid(), job.id):
        first = store.get_job(job.id).heartbeat_at
        wait_for(lambda: store.get_job(job.id).heartbeat_at > first, timeout=10)
        assert os.getpid() in store.live_workers()


def test_two_concurrent_submits_each_get_one_row(tiny_llama_dir: Path, job_home: Path):
    ids: list[int] = []
    threads = [threading.Thread(target=lambda: ids.append(store.submit(str(tiny_llama_dir), PLAN)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    code = f"from saten_core.jobs import store; print(store.submit({str(tiny_llama_dir)!r}, {PLAN!r}))"
    env = {**os.environ, "SATEN_HOME": str(job_home)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    ids += [int(p.communicate(timeout=300)[0]) for p in procs]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert sorted(j.id for j in store.list_jobs()) == sorted(ids)


def test_claim_is_atomic_across_threads(tiny_llama_dir: Path):
    store.submit(str(tiny_llama_dir), PLAN)
    got: list = []
    barrier = threading.Barrier(4)

    def claim(pid: int) -> None:
        barrier.wait()
        got.append(store.claim_next(pid))

    threads = [threading.Thread(target=claim, args=(100000 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(j is not None for j in got) == 1


def test_db_survives_reopen_and_rows_round_trip_json(tiny_llama_dir: Path, job_home: Path):
    job_id = store.submit(str(tiny_llama_dir), PLAN, evaluate=True, time_budget_s=60)
    before = store.get_job(job_id)
    assert store.Job.from_dict(json.loads(json.dumps(before.to_dict()))) == before
    reopened = cli("jobs", "show", str(job_id), "--json", home=job_home)
    assert reopened.returncode == 0, reopened.stderr
    assert store.Job.from_dict(json.loads(reopened.stdout)) == before
    assert before.evaluate and before.time_budget_s == 60


def test_cli_submit_list_show_cancel(tiny_llama_dir: Path, job_home: Path, tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(PLAN)
    out = cli("jobs", "submit", "--model", str(tiny_llama_dir), "--plan", str(plan_file), "--eval", "--json",
              home=job_home)
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["id"]
    listed = json.loads(cli("jobs", "list", "--json", home=job_home).stdout)
    assert [j["id"] for j in listed] == [job_id] and listed[0]["status"] == "queued"
    assert "result_json" not in listed[0] and store.Job.from_dict(listed[0]).evaluate
    assert cli("jobs", "cancel", str(job_id), home=job_home).returncode == 0
    assert store.get_job(job_id).status == "cancelled"


def test_cli_submit_dtype_and_materialize_land_in_the_stored_plan(tiny_llama_dir: Path, job_home: Path,
                                                                  tmp_path: Path):
    """--dtype / --materialize rewrite the plan the job stores (the job stores exactly that JSON)."""
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(PLAN)
    out = cli("jobs", "submit", "--model", str(tiny_llama_dir), "--plan", str(plan_file), "--eval", "--reference",
              "--dtype", "float16", "--materialize", "--json", home=job_home)
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout)
    stored = json.loads(store.get_job(ids["id"]).plan_json)
    assert stored["dtype"] == "float16" and stored["materialize"] is True
    assert json.loads(store.get_job(ids["reference_id"]).plan_json)["dtype"] == "float16"
    bad = cli("jobs", "submit", "--model", str(tiny_llama_dir), "--plan", str(plan_file), "--dtype", "int8",
              home=job_home)
    assert bad.returncode == 2 and "int8" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_submit_with_reference_queues_the_original_once(tiny_llama_dir: Path, job_home: Path, tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(PLAN)
    args = ("jobs", "submit", "--model", str(tiny_llama_dir), "--plan", str(plan_file), "--device", "cpu")
    out = [cli(*args, "--eval", "--reference", "--json", home=job_home) for _ in range(2)]
    assert [o.returncode for o in out] == [0, 0], [o.stderr for o in out]
    first, second = (json.loads(o.stdout) for o in out)
    assert first["reference_id"] is not None and second["reference_id"] is None
    assert Plan.from_json(store.get_job(first["reference_id"]).plan_json).exclude == ["*"]
    refused = cli(*args, "--reference", home=job_home)
    assert refused.returncode == 2 and "--eval" in refused.stderr and len(store.list_jobs()) == 3


def test_cli_submit_compare_queues_baselines_and_exits_2_on_a_refusal(tiny_llama_dir: Path, job_home: Path,
                                                                        tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(Plan(method="saten", target_ratio=0.6).to_json())
    out = cli("jobs", "submit", "--model", str(tiny_llama_dir), "--plan", str(plan_file), "--compare", "prune",
              "magic", "--json", home=job_home)
    assert out.returncode == 2, out.stderr
    compared = json.loads(out.stdout)["compare"]
    assert compared[0]["method"] == "prune" and compared[0]["error"] is None
    assert compared[1]["id"] is None and "magic" in compared[1]["error"]
    assert Plan.from_json(store.get_job(compared[0]["id"]).plan_json).method == "prune"


@pytest.mark.parametrize("args", [("show", "424242"), ("cancel", "424242")])
def test_unknown_job_id_exits_2_with_one_line(job_home: Path, args):
    out = cli("jobs", *args, home=job_home)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "424242" in out.stderr and out.stdout == ""


def test_cli_rejects_unknown_model_with_exit_2(job_home: Path, tmp_path: Path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(PLAN)
    out = cli("jobs", "submit", "--model", "no-such-model", "--plan", str(plan_file), "--json", home=job_home)
    assert out.returncode == 2 and "no-such-model" in out.stderr and "Traceback" not in out.stderr
    assert store.list_jobs() == []


@pytest.mark.parametrize("plan_text, match", [('{"method": "magic"}', "magic"), (None, "nope.json")])
def test_cli_rejects_bad_or_missing_plan_with_exit_2(tiny_llama_dir: Path, job_home: Path, tmp_path: Path,
                                                     plan_text: str | None, match: str):
    plan_file = tmp_path / ("plan.json" if plan_text is not None else "nope.json")
    if plan_text is not None:
        plan_file.write_text(plan_text)
    out = cli("jobs", "submit", "--model", str(tiny_llama_dir), "--plan", str(plan_file), "--json", home=job_home)
    assert out.returncode == 2 and match in out.stderr and out.stderr.strip().count("\n") == 0
    assert out.stdout == "" and store.list_jobs() == []


def test_ensure_worker_spawns_one_detached_worker_that_runs_the_queue(tiny_llama_dir: Path):
    job_id = store.submit(str(tiny_llama_dir), PLAN, device="cpu")
    pid = worker.ensure_worker(idle_exit_s=3)
    wait_for(lambda: pid in store.live_workers(), timeout=120, every=0.05)
    assert worker.ensure_worker(idle_exit_s=3) == pid  # a live heartbeat: no second worker
    wait_for(lambda: store.get_job(job_id).status in store.FINAL_STATUSES, timeout=300, every=0.2)
    assert store.get_job(job_id).status == "succeeded", store.get_job(job_id).error
    wait_for(lambda: not store.pid_alive(pid), timeout=60, every=0.2)
    assert store.live_workers() == []


@pytest.mark.slow
def test_real_model_job_succeeds_with_metrics_and_report(monkeypatch: pytest.MonkeyPatch):
    """SmolLM2-135M end to end through the queue, kept CI-cheap: two of 30 blocks, 128 eval tokens, one timing run.

    The pipeline's default latency (6 x 128-token prefill + 16 decode steps) alone takes ~100 s on 2 CPU cores.
    """
    import functools

    from saten_core import evaluate

    monkeypatch.setattr(evaluate, "latency", functools.partial(evaluate.latency, prefill_tokens=32,
                                                                 decode_tokens=4, repeats=1))
    plan = Plan(method="saten", target_ratio=0.9, include=["model.layers.0.*", "model.layers.1.*"])
    job_id = store.submit("smollm2-135m", plan.to_json(), evaluate=True, tokens=128, device="auto")
    assert worker.run_worker(once=True) == 1
    job = store.get_job(job_id)
    assert job.status == "succeeded", job.error
    assert math.isfinite(job.ppl) and job.ppl > 1 and 0 <= job.top1_agreement <= 1 and job.kl >= 0
    assert job.bytes_after <= 0.9 * job.bytes_before * 1.01
    assert job.prefill_ms > 0 and job.decode_ms_per_token > 0
    assert len(job.result["layers"]) == 14 and (Path(job.artifact_dir) / "report.json").is_file()
