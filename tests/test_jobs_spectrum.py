"""The all-layer spectrum scan as a background job: queued, run by the worker, result in the spectrum disk cache.

Run: .venv/bin/python -m pytest -q tests/test_jobs_spectrum.py
"""

from __future__ import annotations

import pytest

from saten_core import jobs


def test_spectrum_job_fills_the_cache_and_stays_out_of_compression_runs(tiny_llama_dir, tmp_path, monkeypatch):
    from saten_core.models import linear_layers, load_model
    from saten_core.spectrum import load_cached, weights_fingerprint

    monkeypatch.setenv("SATEN_HOME", str(tmp_path))  # cold cache
    job_id = jobs.submit_spectrum(str(tiny_llama_dir), device="cpu")
    job = jobs.get_job(job_id)
    assert job.task == "spectrum" and job.status == "queued" and not job.evaluate
    assert jobs.run_worker(once=True) == 1
    job = jobs.get_job(job_id)
    assert job.status == "succeeded", job.error
    assert job.result["layers"] == 14 and job.result["cached"] is False and job.artifact_dir is None
    import torch

    deployed = load_model(str(tiny_llama_dir), dtype=torch.bfloat16).model  # the job scans at the deploy dtype
    fingerprint = weights_fingerprint(linear_layers(deployed), extra="order=2")
    assert job.result["fingerprint"] == fingerprint and load_cached(fingerprint) is not None
    assert "[load]" in jobs.read_log(job_id)


def test_compression_jobs_are_task_compress(tiny_llama_dir, tmp_path, monkeypatch):
    from saten_core.plan import Plan

    monkeypatch.setenv("SATEN_HOME", str(tmp_path))
    job_id = jobs.submit(str(tiny_llama_dir), Plan(target_ratio=0.8).to_json())
    assert jobs.get_job(job_id).task == "compress"


def test_spectrum_job_of_a_bad_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SATEN_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="unknown model"):
        jobs.submit_spectrum(str(tmp_path / "missing"))
    assert jobs.list_jobs() == []
