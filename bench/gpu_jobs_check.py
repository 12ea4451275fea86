"""GPU check of the job worker (issue 4): auto prefers CUDA, cancel frees GPU memory, CUDA OOM -> hint, SIGKILL.

Builds two Llama models from configs on the machine (no download), runs each case through store + worker in a
fresh SATEN_HOME and prints one line per case. Exit 1 when any case fails.
Run: PYTHONPATH=.:<dir holding tensorly> python3 bench/gpu_jobs_check.py TOKENIZER_DIR
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

os.environ["SATEN_HOME"] = tempfile.mkdtemp(prefix="saten-gpu-jobs-")
os.environ["HF_HUB_OFFLINE"] = "1"

from saten_core.jobs import store, worker  # noqa: E402 - SATEN_HOME must be set first
from saten_core.plan import Plan  # noqa: E402

PLAN = Plan(method="saten", rank=8, density=0.05).to_json()
RESULTS: list[tuple[str, bool, str]] = []


def build(tokenizer_dir: str, layers: int, hidden: int, mlp: int) -> str:
    """A random Llama saved as a local HF folder (safetensors), like tests/conftest.py's tiny_llama_dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=mlp,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    path = tempfile.mkdtemp(prefix=f"llama{layers}x{hidden}-")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def record(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def wait_for(predicate, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def case_auto_prefers_cuda(model: str) -> None:
    t0 = time.perf_counter()
    job_id = store.submit(model, PLAN, evaluate=True, tokens=256, device="auto")
    worker.run_worker(once=True)
    job = store.get_job(job_id)
    alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    ok = (job.status == "succeeded" and job.device_used == "cuda" and job.ppl is not None and job.prefill_ms
          and alloc == 0 and reserved == 0)
    record("auto->cuda succeeds with metrics, GPU left clean", bool(ok),
           f"allocated after={alloc} reserved after={reserved} "
           f"status={job.status} device={job.device_used} ppl={job.ppl} kl={job.kl} top1={job.top1_agreement} "
           f"bytes={job.bytes_before}->{job.bytes_after} prefill_ms={job.prefill_ms} error={job.error} "
           f"wall={time.perf_counter() - t0:.1f}s")


def case_cancel_frees_memory(model: str) -> None:
    base = torch.cuda.memory_allocated()
    job_id = store.submit(model, PLAN, device="cuda")
    seen: dict[str, float] = {}

    def cancel() -> None:
        if wait_for(lambda: store.get_job(job_id).stage == "compress"):
            seen["alloc_running"] = torch.cuda.memory_allocated()
            store.request_cancel(job_id)

    thread = threading.Thread(target=cancel)
    thread.start()
    worker.run_worker(once=True)
    thread.join()
    job = store.get_job(job_id)
    left = [p.name for p in worker.job_dir(job_id).iterdir() if p.name != "job.log"]
    alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    ok = job.status == "cancelled" and job.fraction < 1 and not left and alloc == 0 and reserved == 0
    record("cancel on cuda frees GPU memory", ok,
           f"status={job.status} message={job.message!r} fraction={job.fraction:.3f} leftovers={left} "
           f"allocated running={seen.get('alloc_running')} after={alloc} (before {base}) reserved after={reserved}")


def case_oom_hint(model: str) -> None:
    import saten_core.compress as compress

    real = compress.compress_

    def greedy(*args, **kwargs):
        torch.empty(1 << 48, dtype=torch.uint8, device="cuda")  # 256 TiB: a real CUDA OOM
        return real(*args, **kwargs)

    compress.compress_ = greedy
    try:
        job_id = store.submit(model, PLAN, device="cuda")
        worker.run_worker(once=True)
    finally:
        compress.compress_ = real
    job = store.get_job(job_id)
    alloc = torch.cuda.memory_allocated()
    reserved = torch.cuda.memory_reserved()
    ok = job.status == "failed" and job.error == worker.OOM_HINT and alloc == 0 and reserved == 0
    record("CUDA OOM -> failed with hint", ok,
           f"status={job.status} error={job.error!r} allocated after={alloc} reserved after={reserved}")


def case_sigkill(slow: str, tiny: str) -> None:
    first = store.submit(slow, PLAN, device="cuda")
    second = store.submit(tiny, PLAN, device="cuda")
    proc = subprocess.Popen([sys.executable, "-m", "saten_core", "jobs", "worker", "--once"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reached = wait_for(lambda: store.get_job(first).stage == "compress" or proc.poll() is not None)
    running = store.get_job(first).status == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    recovered = store.recover_stale()
    job = store.get_job(first)
    integrity = store.connect().execute("PRAGMA integrity_check").fetchone()[0]
    left = [p.name for p in worker.job_dir(first).iterdir() if p.name != "job.log"]
    worker.run_worker(once=True)
    nxt = store.get_job(second)
    ok = (reached and running and recovered == [first] and job.status == "failed" and integrity == "ok"
          and not left and nxt.status == "succeeded")
    record("SIGKILL on cuda -> failed, next job runs", ok,
           f"recovered={recovered} in {time.monotonic() - t0:.3f}s error={job.error!r} integrity={integrity} "
           f"leftovers={left} next={nxt.status}/{nxt.device_used}")


def main() -> int:
    print(f"torch {torch.__version__} cuda={torch.cuda.is_available()} "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}", flush=True)
    tiny = build(sys.argv[1], layers=2, hidden=64, mlp=128)
    slow = build(sys.argv[1], layers=48, hidden=256, mlp=1024)
    for case in (lambda: case_auto_prefers_cuda(tiny), lambda: case_cancel_frees_memory(slow),
                 lambda: case_oom_hint(tiny), lambda: case_sigkill(slow, tiny)):
        try:
            case()
        except Exception as exc:  # noqa: BLE001 - report and go on to the next case
            record(getattr(case, "__name__", "case"), False, f"{type(exc).__name__}: {exc}")
    return 0 if all(ok for _, ok, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
