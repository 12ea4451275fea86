"""Sweeps (one job per method x ratio x heal-steps, one sweep id), the new job columns, --drain, schema upgrade.

Run: .venv/bin/python -m pytest -q tests/test_sweep.py
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from saten_core.jobs import store, worker
from saten_core.jobs.sweep import SweepConfig, submit_sweep
from saten_core.plan import Plan
from tests.conftest import saten_cli as cli

pytestmark = pytest.mark.usefixtures("job_home")
REPO = Path(__file__).resolve().parents[1]


def test_a_sweep_queues_every_combination_under_one_id(tiny_llama_dir: Path):
    cfg = SweepConfig(str(tiny_llama_dir), methods=["saten", "prune"], ratios=[0.5, 0.8], heal_steps=[0, 5],
                      evaluate=True, tokens=64, device="cpu")
    sweep_id, ids = submit_sweep(cfg)
    assert len(ids) == 8 and sweep_id.startswith("sweep-")
    jobs = store.list_jobs(sweep=sweep_id)
    assert sorted(j.id for j in jobs) == sorted(ids)
    combos = {(p.method, p.target_ratio, p.heal_steps) for p in (Plan.from_json(j.plan_json) for j in jobs)}
    assert combos == {(m, r, h) for m in ("saten", "prune") for r in (0.5, 0.8) for h in (0, 5)}
    assert all(j.evaluate and j.eval_tokens == 64 and j.status == "queued" and j.executor is None for j in jobs)
    assert SweepConfig.from_json(cfg.to_json()) == cfg
    other, _ = submit_sweep(SweepConfig(str(tiny_llama_dir), methods=["svd"], ratios=[0.5]))
    assert len(store.list_jobs(sweep=other)) == 1 and len(store.list_jobs(sweep=sweep_id)) == 8


@pytest.mark.parametrize("change, match", [
    ({"methods": []}, "at least one value in methods"),
    ({"ratios": [0.5, 1.5]}, "ratio must be in"),
    ({"ratios": [0.5, 0.5]}, "repeats"),
    ({"heal_steps": [-1]}, "heal steps"),
    ({"methods": ["saten", "nope"]}, "nope"),
])
def test_a_bad_sweep_queues_nothing(tiny_llama_dir: Path, change: dict, match: str):
    base = {"model": str(tiny_llama_dir), "methods": ["saten"], "ratios": [0.5]}
    with pytest.raises(ValueError, match=match):
        submit_sweep(SweepConfig(**{**base, **change}))
    assert store.list_jobs() == []


def test_sweep_cli_prints_ids_and_list_filters_by_sweep(tiny_llama_dir: Path, job_home: Path):
    out = cli("jobs", "sweep", "--model", str(tiny_llama_dir), "--methods", "saten", "svd", "--ratios", "0.5",
              "--json", home=job_home)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert len(made["ids"]) == 2
    listed = json.loads(cli("jobs", "list", "--sweep", made["sweep"], "--json", home=job_home).stdout)
    assert sorted(r["id"] for r in listed) == sorted(made["ids"])
    assert all(r["sweep"] == made["sweep"] and "executor" in r for r in listed)
    bad = cli("jobs", "sweep", "--model", str(tiny_llama_dir), "--methods", "saten", "--ratios", "2", home=job_home)
    assert bad.returncode == 2 and "ratio must be in" in bad.stderr and "Traceback" not in bad.stderr


def test_drain_runs_the_queue_then_exits_and_marks_the_executor(tiny_llama_dir: Path):
    _, ids = submit_sweep(SweepConfig(str(tiny_llama_dir), methods=["saten"], ratios=[0.5, 0.8], device="cpu"))
    ran = worker.run_worker(drain=True)
    assert ran == 2
    for job_id in ids:
        job = store.get_job(job_id)
        assert job.status == "succeeded" and job.executor == "local" and job.bytes_after is not None


def test_a_store_from_before_the_sweep_columns_is_upgraded_in_place(job_home: Path):
    """An older jobs.db (no sweep / executor columns) keeps its rows and gains the columns when opened."""
    old_fields = [f for f in store._schema().split("(", 1)[1].rstrip(")").split(", ")
                  if not f.startswith(("sweep ", "executor "))]
    path = job_home / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"CREATE TABLE jobs ({', '.join(old_fields)})")
        conn.execute("INSERT INTO jobs (created_at, model_ref, plan_json, status) VALUES (1.0, 'm', '{}', 'queued')")
    job = store.list_jobs()[0]
    assert (job.model_ref, job.sweep, job.executor) == ("m", None, None)


def test_claim_refuses_an_unknown_executor():
    with pytest.raises(ValueError, match="'spark'"):
        store.claim_next(1, executor="spark")


def test_results_keep_one_sweep_and_the_original():
    import pandas as pd

    from saten_core import charts

    jobs = [{"id": 1, "sweep": None, "model_ref": "m"}, {"id": 2, "sweep": "sweep-a", "model_ref": "m"},
            {"id": 3, "sweep": "sweep-b", "model_ref": "m"}, {"id": 4, "sweep": "sweep-c", "model_ref": "other"}]
    runs = pd.DataFrame({"id": [1, 2, 3], "baseline": [True, False, False]})
    assert charts.sweeps_of(jobs, "m") == ["sweep-b", "sweep-a"]
    assert list(charts.in_sweep(runs, jobs, "sweep-a")["id"]) == [1, 2]
    assert list(charts.in_sweep(runs, jobs, None)["id"]) == [1, 2, 3]


def test_the_default_worker_never_imports_ray(tiny_llama_dir: Path, job_home: Path):
    """`jobs worker` without --executor runs a job and drains without Ray in the process."""
    store.submit(str(tiny_llama_dir), Plan(method="saten", rank=4, density=0.05).to_json(), device="cpu")
    code = ("import sys; from saten_core.__main__ import main; rc = main(['jobs', 'worker', '--drain']); "
            "print(rc, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "SATEN_HOME": str(job_home)},
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stderr[-1500:]
    assert store.list_jobs()[0].status == "succeeded"
