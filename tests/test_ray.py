"""The Ray executor: a dispatcher runs queued jobs as Ray tasks, bounded by the cluster's GPUs, the store its record.

One local Ray for the module (num_cpus=2, 2 fake GPUs, small object store, no dashboard); tests run serially.
Run: .venv/bin/python -m pytest -q tests/test_ray.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray

from saten_core.jobs import store
from saten_core.jobs.executors import ray_dispatch
from saten_core.jobs.sweep import SweepConfig, submit_sweep
from saten_core.plan import Plan
from tests.conftest import wait_for

pytestmark = pytest.mark.usefixtures("job_home")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, num_gpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def dispatcher_thread(**kw) -> threading.Thread:
    """The dispatcher in this process (Ray is already up, so it joins it rather than starting one)."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            ray_dispatch.run_ray_worker(**kw)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def most_at_once(jobs: list[store.Job]) -> int:
    """The largest number of the jobs' [started_at, finished_at] intervals that overlap (an ordering of events)."""
    events = sorted([(j.started_at, 1) for j in jobs] + [(j.finished_at, -1) for j in jobs])
    now = top = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


def test_a_sweep_on_two_gpus_runs_at_most_two_jobs_at_once(local_ray, tiny_llama_dir: Path):
    sweep_id, ids = submit_sweep(SweepConfig(str(tiny_llama_dir), methods=["saten", "prune"], ratios=[0.5, 0.8],
                                             device="cpu"))
    assert ray_dispatch.job_slots(ray, 1.0) == 2 and ray_dispatch.job_slots(ray, 0.5) == 4

    @ray.remote(num_gpus=1, num_cpus=0)
    class Holder:  # another user of the cluster holding one GPU
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    assert ray_dispatch.job_slots(ray, 1.0) == 1 and ray_dispatch.job_slots(ray, 0.5) == 2
    ray.kill(holder)
    wait_for(lambda: ray_dispatch.job_slots(ray, 1.0) == 2, timeout=30)
    thread = dispatcher_thread(gpus_per_job=1.0, drain=True)
    thread.join(timeout=600)
    assert not thread.is_alive() and not thread.errors
    jobs = [store.get_job(i) for i in ids]
    assert [j.status for j in jobs] == ["succeeded"] * 4, [j.error for j in jobs]
    assert all(j.executor == "ray" and j.sweep == sweep_id and j.bytes_after and j.artifact_dir for j in jobs)
    assert all(Path(j.artifact_dir, "report.json").is_file() for j in jobs)
    assert most_at_once(jobs) <= 2
    assert len({j.worker_pid for j in jobs}) == 1  # the dispatcher owns every row; tasks never write the store


def test_cancel_reaches_a_running_ray_task(local_ray, slow_llama_dir: Path):
    job_id = store.submit(str(slow_llama_dir), Plan(method="saten", rank=4, density=0.05).to_json(), device="cpu")
    thread = dispatcher_thread(drain=True)
    wait_for(lambda: store.get_job(job_id).stage not in (None, "starting"))  # the task has reported progress
    store.request_cancel(job_id)
    thread.join(timeout=300)
    job = store.get_job(job_id)
    assert job.status == "cancelled" and job.executor == "ray", (job.status, job.error, job.stage)
    assert job.artifact_dir is None and job.fraction < 1.0
    folder = store.job_dir(job_id)
    assert sorted(p.name for p in folder.iterdir() if p.name != "job.log") == []


def test_a_failing_job_runs_once_and_is_marked_failed(local_ray, tiny_llama_dir: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    job_id = store.submit(str(broken), Plan(method="saten", rank=4, density=0.05).to_json(), device="cpu")
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    thread = dispatcher_thread(drain=True)
    thread.join(timeout=300)
    job = store.get_job(job_id)
    assert job.status == "failed" and job.error and "Traceback" not in job.error
    log = (store.job_dir(job_id) / "job.log").read_text()
    assert log.count(f"job {job_id}: model") == 1  # max_retries=0: one attempt


def test_a_killed_dispatcher_loses_no_job(local_ray, slow_llama_dir: Path, job_home: Path):
    plan = Plan(method="saten", rank=4, density=0.05).to_json()
    running_id = store.submit(str(slow_llama_dir), plan, device="cpu")
    waiting_id = store.submit(str(slow_llama_dir), plan, device="cpu")
    env = {**os.environ, "SATEN_HOME": str(job_home)}
    proc = subprocess.Popen([sys.executable, "-m", "saten_core", "jobs", "worker", "--executor", "ray",
                             "--ray-address", local_ray, "--gpus-per-job", "2"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: store.get_job(running_id).stage == "compress")
        assert store.get_job(waiting_id).status == "queued"  # 2 GPUs / 2 per job: one slot
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert store.recover_stale() == [running_id]
    lost = store.get_job(running_id)
    assert lost.status == "failed" and "died" in lost.error
    assert store.get_job(waiting_id).status == "queued"  # still there for the next worker
    assert not store.job_dir(running_id).joinpath("model").exists()


TWO_NODES = """
import json, os, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1,
                                                         "object_store_memory": 80 * 2**20})
cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20)
import ray
ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
cluster.wait_for_nodes()
from saten_core.jobs.executors import ray_dispatch
ran = ray_dispatch.run_ray_worker(gpus_per_job=1.0, drain=True)
ray.shutdown()
cluster.shutdown()
print(json.dumps({"ran": ran}))
"""


def test_a_two_node_cluster_spreads_jobs_over_its_nodes(tiny_llama_dir: Path, job_home: Path):
    """ray.cluster_utils.Cluster with two 1-GPU nodes (own Ray, in a child process): two jobs, one per node."""
    plan = Plan(method="saten", rank=4, density=0.05).to_json()
    ids = [store.submit(str(tiny_llama_dir), plan, device="cpu") for _ in range(2)]
    env = {**os.environ, "SATEN_HOME": str(job_home),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", TWO_NODES], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = [store.get_job(i) for i in ids]
    assert [j.status for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    nodes = {line.rsplit(" ", 1)[1] for i in ids for line in (store.job_dir(i) / "job.log").read_text().splitlines()
             if "ray task on node" in line}
    assert len(nodes) == 2  # 1 GPU per node and per job: both nodes ran one
