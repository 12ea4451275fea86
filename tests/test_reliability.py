"""Reliability campaign (issue 19): bad input ends in one clear line with nothing written, faults lose no job.

Each case is listed in docs/RELIABILITY.md with the test that checks it (here or elsewhere in tests/).
Run: .venv/bin/python -m pytest -q tests/test_reliability.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from saten_core.jobs import store, worker
from saten_core.plan import Plan
from tests.conftest import kill_worker_at
from tests.conftest import saten_cli as cli

pytestmark = pytest.mark.usefixtures("job_home")
REPO = Path(__file__).resolve().parents[1]
PLAN = Plan(method="saten", rank=4, density=0.05).to_json()


def assert_one_line(proc: subprocess.CompletedProcess, word: str) -> None:
    """Exit 2, one stderr line `error: ...` naming the value, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and word in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def damaged(tiny_llama_dir: Path, where: Path, how: str) -> Path:
    """A copy of the tiny Llama with its weights replaced: no safetensors, a pickle only, garbage, cut short."""
    folder = where / how
    shutil.copytree(tiny_llama_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    if how == "no-weights":
        weights.unlink()
    elif how == "pickle":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif how == "corrupt":
        weights.write_bytes(b"\x00" * 64 + b"garbage")
    elif how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("how, word", [("no-weights", "no safetensors"), ("pickle", "pytorch_model.bin"),
                                       ("corrupt", "is not a safetensors file"), ("truncated", "is truncated")])
def test_bad_model_folders_fail_in_one_line_and_write_nothing(tiny_llama_dir: Path, tmp_path: Path,
                                                              job_home: Path, how: str, word: str):
    folder = damaged(tiny_llama_dir, tmp_path, how)
    plan = tmp_path / "plan.json"
    plan.write_text(PLAN)
    out = tmp_path / "out"
    assert_one_line(cli("compress", "--model", folder, "--plan", plan, "--out", out, home=job_home), word)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert_one_line(cli("jobs", "submit", "--model", folder, "--plan", plan, home=job_home), word)
    assert store.list_jobs() == []
    spectra = tmp_path / "spectra.json"
    assert_one_line(cli("spectrum", "--model", folder, "--json", spectra, home=job_home), word)
    assert not spectra.exists()


def test_a_truncated_plan_file_fails_in_one_line(tiny_llama_dir: Path, tmp_path: Path, job_home: Path):
    whole = Plan(method="saten", target_ratio=0.5).to_json()
    plan = tmp_path / "cut.json"
    plan.write_text(whole[: len(whole) // 2])
    out = tmp_path / "out"
    assert_one_line(cli("compress", "--model", tiny_llama_dir, "--plan", plan, "--out", out, home=job_home),
                    "cut.json")
    assert not out.exists()
    assert_one_line(cli("jobs", "submit", "--model", tiny_llama_dir, "--plan", plan, home=job_home), "JSON")
    assert store.list_jobs() == []


def test_a_binary_file_is_not_taken_as_calibration_text(tiny_llama_dir: Path, tmp_path: Path, job_home: Path):
    """NUL bytes are valid UTF-8: without the check a binary file would be read as (useless) text."""
    from saten_core.corpus import decode_text

    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x00\x01\x02" * 5000)
    with pytest.raises(ValueError, match="looks binary"):
        decode_text(blob.read_bytes(), "weights.bin")
    plan = tmp_path / "plan.json"
    plan.write_text(Plan(method="saten-aw", target_ratio=0.5, calib=str(blob)).to_json())
    out = tmp_path / "out"
    assert_one_line(cli("compress", "--model", tiny_llama_dir, "--plan", plan, "--out", out, home=job_home),
                    "looks binary")
    assert not out.exists()


def test_texts_over_the_documented_limit_are_refused(job_home: Path, tmp_path: Path, monkeypatch):
    """A 300 MB upload is refused by the browser (server.maxUploadSize) and by the library (the same number)."""
    from saten_core import corpus

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == corpus.MAX_TEXT_MB < 300
    with pytest.raises(ValueError, match=r"300 MB, over the 50 MB limit"):
        corpus.check_text_size(300 * 10**6, "big.txt")
    monkeypatch.setattr(corpus, "MAX_TEXT_MB", 0.001)  # 1000 bytes: the refusal without allocating 300 MB
    with pytest.raises(ValueError, match="over the"):
        corpus.save_user_text(b"word " * 1000, "upload.txt")
    assert not (job_home / "texts").exists()  # nothing kept
    big = tmp_path / "big.txt"
    big.write_text("word " * 1000)
    with pytest.raises(ValueError, match="over the"):
        corpus.read_text_file(big)


def test_two_workers_started_at_once_one_runs_the_queue_the_other_exits_cleanly(slow_llama_dir: Path,
                                                                                 job_home: Path):
    job_id = store.submit(str(slow_llama_dir), PLAN, device="cpu")
    env = {**os.environ, "SATEN_HOME": str(job_home)}
    cmd = [sys.executable, "-m", "saten_core", "jobs", "worker", "--drain"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    errs = sorted(err for _, err in outs)
    assert sum("another worker already serves" in e for e in errs) == 1, errs
    assert sum("worker ran 1 job(s)" in e for e in errs) == 1, errs
    assert store.get_job(job_id).status == "succeeded"
    log = (worker.job_dir(job_id) / "job.log").read_text()
    assert log.count(f"job {job_id}: model") == 1  # ran once
    assert store.connect().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigkill_mid_heal_loses_no_job_and_leaves_no_folder(slow_llama_dir: Path, tiny_llama_dir: Path,
                                                            job_home: Path):
    healing = Plan(method="saten", rank=4, density=0.05, heal_steps=400, heal_eval_every=100,
                   heal_tokens=4096, heal_seq_len=64).to_json()
    first = store.submit(str(slow_llama_dir), healing, device="cpu")
    second = store.submit(str(tiny_llama_dir), PLAN, device="cpu")
    kill_worker_at(first, "heal", job_home)
    assert store.recover_stale() == [first]
    job = store.get_job(first)
    assert job.status == "failed" and "died" in job.error and "heal" in job.error
    folder = worker.job_dir(first)
    assert sorted(p.name for p in folder.iterdir() if p.name != "job.log") == []
    assert store.get_job(second).status == "queued" and worker.run_worker(drain=True) == 1
    assert store.get_job(second).status == "succeeded"


def test_a_store_keeps_every_row_across_an_app_restart_mid_queue(tiny_llama_dir: Path, job_home: Path):
    """The app process holds no job state: a new process (a restarted dashboard) sees the same queue and results."""
    ids = [store.submit(str(tiny_llama_dir), PLAN, device="cpu") for _ in range(2)]
    assert worker.run_worker(once=True) == 1
    code = ("import json; from saten_core.jobs import store; "
            "print(json.dumps([[j.id, j.status] for j in store.list_jobs()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "SATEN_HOME": str(job_home)},
                         capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout) == [[ids[1], "queued"], [ids[0], "succeeded"]], out.stderr


def test_a_shared_studio_refuses_calibration_paths_outside_its_text_folders(tiny_llama_dir: Path, tmp_path: Path,
                                                                             job_home: Path, monkeypatch):
    from saten_core.build import calibration_text
    from saten_core.corpus import save_user_text

    secret = tmp_path / "secret.txt"
    secret.write_text("private words " * 500)
    uploaded = save_user_text(b"calibration words " * 500, "mine.txt")
    outside = Plan(method="saten-aw", target_ratio=0.5, calib=str(secret)).to_json()
    sneaky = Plan(method="saten-aw", target_ratio=0.5, calib=str(uploaded.parent / ".." / ".." / "x.txt")).to_json()
    inside = Plan(method="saten-aw", target_ratio=0.5, calib=str(uploaded)).to_json()
    assert store.submit(str(tiny_llama_dir), outside)  # a private studio reads what its user names
    monkeypatch.setenv("SATEN_SHARED", "1")
    for plan in (outside, sneaky):
        with pytest.raises(ValueError, match="outside the folders this shared studio reads"):
            store.submit(str(tiny_llama_dir), plan)
    assert len(store.list_jobs()) == 1
    assert store.submit(str(tiny_llama_dir), inside)
    with pytest.raises(ValueError, match="outside"):  # a job queued before sharing was turned on
        calibration_text(Plan.from_json(outside))
    monkeypatch.setenv("SATEN_TEXT_DIRS", str(tmp_path))
    assert calibration_text(Plan.from_json(outside)).startswith("private")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(outside)
    monkeypatch.delenv("SATEN_TEXT_DIRS")
    assert_one_line(cli("jobs", "submit", "--model", tiny_llama_dir, "--plan", plan_file, home=job_home),
                    "outside the folders")  # SATEN_SHARED=1 is inherited by the CLI process
    assert len(store.list_jobs()) == 2


def test_disk_full_while_saving_fails_the_job_and_leaves_no_folder(tiny_llama_dir: Path, monkeypatch):
    """The weights writer raising ENOSPC mid-save (a patched writer: what a full disk does to the worker)."""
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    job_id = store.submit(str(tiny_llama_dir), PLAN, device="cpu")
    assert worker.run_worker(once=True) == 1
    job = store.get_job(job_id)
    assert job.status == "failed" and "No space left on device" in job.error and job.artifact_dir is None
    folder = worker.job_dir(job_id)
    assert sorted(p.name for p in folder.iterdir() if p.name != "job.log") == []
    assert store.connect().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
