"""Bench: a LLaMA-3.2-1B-shaped model end to end on this machine: time and peak memory of every stage.

Run: PYTHONPATH=. .venv/bin/python bench/bench_scale.py --out docs/benchmarks/scale_1b.jsonl
     PYTHONPATH=. .venv/bin/python bench/bench_scale.py --layers 2 --out /tmp/scale_2l.jsonl   # a quick slice
Writes a random-weight bf16 folder with LLaMA-3.2-1B's config (hidden 2048, 16 layers, MLP 8192, 32/8 heads,
vocab 128256, tied embeddings; --layers N keeps N blocks) in sharded safetensors, with SmolLM2's tokenizer (its
ids fit the vocabulary: random weights say nothing about quality, only time and memory). Then each stage runs as
the CLI a user would type, in its own process: spectrum -> plan --allocate (saten-aw 50%) -> compress --sequential
(4096 calibration tokens) -> eval. Each row: the stage, its wall seconds and the child's peak RSS (its VmHWM,
polled), next to the folder's bf16 weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "head_dim": 64}


def write_folder(folder: Path, layers: int) -> int:
    """The random bf16 model in `folder` (reused when its config matches); returns its weight bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saten_core.models import embedded_dir

    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers}, torch_dtype="bfloat16")
    marker = folder / "bench_scale.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(config.to_dict())):  # tuples
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # std 0.02 like the config's initializer, drawn in bf16 directly
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p.dtype)
                    if p.dim() > 1 else torch.ones(p.shape))
    model = model.to(torch.bfloat16)
    model.tie_weights()  # to_empty gave lm_head its own storage; a 1B Llama ties it to the embedding
    model.save_pretrained(folder, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(embedded_dir("smollm2-135m")).save_pretrained(folder)
    marker.write_text(json.dumps(config.to_dict()))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _hwm_bytes(pid: int) -> int | None:
    """VmHWM of a live process: the peak resident set of its own address space (reset by exec)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_stage(name: str, args: list[str]) -> dict:
    """One CLI stage in a fresh process: wall seconds, its peak RSS, exit code, last stderr line.

    The peak is the child's VmHWM, polled every 0.1 s until it exits (monotonic, so the last read holds unless the
    peak falls in the final 0.1 s). Why not wait4's ru_maxrss: Linux carries the parent's high-water mark into
    the child at exec, so a parent that once held the model it wrote would be measured instead of the stage.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "saten_core", *args], stdout=out, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _hwm_bytes(proc.pid) or 0)
            time.sleep(0.1)
        err.seek(0)
        out.seek(0)
        lines, printed = err.read().strip().splitlines(), out.read()
    blocks = [line for line in lines if "block " in line]
    row = {"stage": name, "seconds": time.perf_counter() - start, "peak_rss_bytes": peak, "rc": proc.returncode,
           "stderr_tail": lines[-1][:300] if lines else "", "block_lines": blocks[-3:]}
    if name == "eval" and proc.returncode == 0:  # the --json result: quality and the side-by-side speed ratios
        result = json.loads(printed)
        row["eval"] = {k: result.get(k) for k in ("ppl", "kl", "decode_ratio", "prefill_ratio", "ratio_reference")}
    return row


def written_folder(folder: Path, layers: int) -> int:
    """write_folder in a child process, so this one never holds the model (see run_stage on ru_maxrss)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_scale; " \
           f"print(bench_scale.write_folder(__import__('pathlib').Path({str(folder)!r}), {layers}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def stages(folder: Path, work: Path, tokens: int, device: str = "cpu") -> list[tuple[str, list[str]]]:
    plan = work / "plan.json"
    return [
        ("spectrum", ["spectrum", "--model", str(folder), "--json", str(work / "spectrum.json"), "--device", device]),
        ("plan --allocate", ["plan", "--model", str(folder), "--method", "saten-aw", "--target-ratio", "0.5",
                             "--allocate", "--sequential", "--calib-tokens", str(tokens), "--out", str(plan)]),
        ("compress --sequential", ["compress", "--model", str(folder), "--plan", str(plan), "--out",
                                   str(work / "compressed"), "--device", device]),
        ("eval", ["eval", "--model", str(work / "compressed"), "--json", "--device", device, "--tokens", "1024",
                  "--latency"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="blocks to keep (16: the real depth)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--folder", default="/tmp/saten_scale_1b", help="where the random model is written")
    ap.add_argument("--only", nargs="*", default=None, help="stages to run (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu_check.sh's 1B-shaped section)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    folder, work = Path(args.folder) / f"l{args.layers}", Path(args.folder) / f"l{args.layers}-work"
    folder.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weight_bytes = written_folder(folder, args.layers)
    meta = {"layers": args.layers, "weight_bytes_bf16": weight_bytes, "tokens": args.tokens,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "device": args.device}
    print(f"folder {folder}: {weight_bytes / 2**30:.2f} GiB bf16 ({time.perf_counter() - start:.0f} s)", flush=True)
    shutil.rmtree(work / "compressed", ignore_errors=True)  # compress writes a new folder
    with open(args.out, "a") as out:
        for name, cli in stages(folder, work, args.tokens, args.device):
            if args.only and name not in args.only:
                continue
            row = {**run_stage(name, cli), **meta}
            row["peak_over_weights"] = row["peak_rss_bytes"] / weight_bytes
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{name}: {row['seconds']:.0f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB "
                  f"({row['peak_over_weights']:.2f}x the bf16 weights), rc {row['rc']} {row['stderr_tail']}",
                  flush=True)
            if row["rc"]:
                break


if __name__ == "__main__":
    main()
