"""Chart builders. Run: .venv/bin/python -m pytest -q tests/test_charts.py"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from saten_core import charts


def test_spectrum_frame_energy_ends_at_one_and_is_monotone():
    df = charts.spectrum_frame([4.0, 2.0, 1.0])
    assert list(df["k"]) == [1, 2, 3]
    assert df["energy"].iloc[-1] == pytest.approx(1.0)
    assert df["energy"].iloc[0] == pytest.approx(16 / 21)
    assert (np.diff(df["energy"]) >= 0).all()


def test_spectrum_chart_is_log_and_marks_rank():
    fig = charts.spectrum_chart(charts.spectrum_frame([3.0, 2.0, 1.0]), rank=2)
    assert fig.layout.yaxis.type == "log"
    assert any(s.x0 == 2 for s in fig.layout.shapes)
    assert charts.spectrum_chart(charts.spectrum_frame([1.0]), rank=None).layout.shapes == ()


def test_energy_and_unfolding_charts():
    fig = charts.energy_chart(charts.spectrum_frame([3.0, 2.0, 1.0]), rank=1)
    assert len(fig.layout.shapes) == 4  # three levels + rank
    uf = charts.unfoldings_frame([[3.0, 1.0], [5.0, 2.0, 1.0], [1.0]])
    fig = charts.unfoldings_chart(uf, rank=2)
    assert [t.name for t in fig.data] == ["bond 1", "bond 2", "bond 3"]
    with pytest.raises(ValueError, match="empty"):
        charts.unfoldings_frame([])


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="sigma"):
        charts.spectrum_chart(pd.DataFrame({"k": [1]}))


def test_heatmap_pivots_layer_by_module():
    df = pd.DataFrame({"layer": [0, 0, 1, 1], "module": ["q_proj", "up_proj"] * 2, "value": [0.1, 0.2, 0.3, 0.4]})
    fig = charts.heatmap_chart(df)
    assert list(fig.data[0].y) == ["q_proj", "up_proj"]
    assert np.allclose(np.array(fig.data[0].z), [[0.1, 0.3], [0.2, 0.4]])


def test_pareto_mask_keeps_only_undominated():
    df = pd.DataFrame({"size": [1, 2, 3, 2.5], "ppl": [30, 20, 10, 25]})
    assert list(charts.pareto_mask(df, "size", "ppl")) == [True, True, True, False]


def test_tradeoff_chart_has_methods_front_and_reference():
    df = pd.DataFrame({"label": ["a", "b", "c"], "method": ["saten", "saten", "prune"],
                       "size": [1.0, 2.0, 1.5], "ppl": [20.0, 15.0, 30.0]})
    fig = charts.tradeoff_chart(df, "size", "ppl", reference={"size": 3.0, "ppl": 14.0})
    names = [t.name for t in fig.data]
    assert names == ["prune", "saten", "saten front", "Pareto front", charts.ORIGINAL_LABEL]
    assert list(fig.data[3].x) == [1.0, 2.0]


def test_tradeoff_chart_draws_every_methods_own_front():
    """rtn's points lie behind saten-q's overall, yet rtn's own front is drawn: each method's best at each size."""
    df = pd.DataFrame({"label": list("abcdef"), "method": ["rtn", "rtn", "rtn", "saten-q", "saten-q", "wanda"],
                       "size": [1.0, 2.0, 2.5, 1.0, 2.0, 1.5], "ppl": [40.0, 30.0, 35.0, 20.0, 15.0, 50.0]})
    fig = charts.tradeoff_chart(df, "size", "ppl")
    fronts = {t.name: list(t.x) for t in fig.data if t.name.endswith(" front")}
    assert fronts == {"rtn front": [1.0, 2.0], "saten-q front": [1.0, 2.0], "Pareto front": [1.0, 2.0]}
    rtn = next(t for t in fig.data if t.name == "rtn front")
    assert rtn.line.color == next(t for t in fig.data if t.name == "rtn").marker.color


def test_layer_error_and_loss_curve():
    fig = charts.layer_error_chart(pd.DataFrame({"name": ["a", "b"], "rel_error": [0.1, 0.2]}))
    assert list(fig.data[0].y) == [0.1, 0.2]
    loss = pd.DataFrame({"step": [0, 1, 0, 1], "loss": [2.0, 1.5, 2.1, 1.8], "split": ["train"] * 2 + ["held-out"] * 2})
    assert len(charts.loss_curve_chart(loss).data) == 2


def test_heal_curve_frame_has_train_and_held_out_lines():
    heal = {"loss_curve": [0.9, 0.7, 0.6], "eval_curve": [[0, 1.0], [3, 0.65]], "best_step": 3}
    frame = charts.heal_curve_frame(heal)
    assert list(frame[frame.split == "train KL"].step) == [1, 2, 3]
    assert list(frame[frame.split == "held-out KL"].loss) == [1.0, 0.65]
    assert len(charts.loss_curve_chart(frame).data) == 2
    assert charts.heal_curve_frame({}).empty


def test_layer_name_parts():
    assert charts.layer_name_parts("model.layers.12.mlp.up_proj") == (12, "mlp.up_proj")
    assert charts.layer_name_parts("encoder.layer.0.attention.self.query") == (0, "attention.self.query")
    with pytest.raises(ValueError, match="lm_head"):
        charts.layer_name_parts("lm_head")


def test_energy_kept_frame_grows_with_rank():
    layers = [{"name": "model.layers.0.mlp.up_proj", "singular_values": [3.0, 2.0, 1.0], "effective_rank": 2.5}]
    low = charts.energy_kept_frame(layers, 1)["value"].iloc[0]
    high = charts.energy_kept_frame(layers, 2)["value"].iloc[0]
    assert low == pytest.approx(9 / 14) and high == pytest.approx(13 / 14)
    assert charts.energy_kept_frame(layers, 10)["value"].iloc[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank"):
        charts.energy_kept_frame(layers, 0)


def _job(id_, plan, **metrics):
    import json

    result = json.dumps({"eval": {"ppl_original": 15.0}})
    base = {"id": id_, "model_ref": "m", "plan_json": json.dumps(plan), "device_used": "cpu", "bytes_before": 100,
            "bytes_after": None, "ppl": None, "kl": None, "top1_agreement": None, "decode_ms_per_token": None,
            "prefill_ms": None, "seconds": 1.0, "result_json": result}
    base.update(metrics)
    return base


def test_runs_frame_labels_baseline_and_flags_slower_runs():
    jobs = [_job(1, {"exclude": ["*"], "method": "saten"}, bytes_before=0, bytes_after=0, ppl=15.0,
                 decode_ms_per_token=10.0),
            _job(2, {"method": "saten", "target_ratio": 0.8}, bytes_after=80, ppl=17.0, decode_ms_per_token=12.0),
            _job(3, {"method": "prune", "rank": None, "density": 0.5, "structure": "2:4"}, bytes_after=60, ppl=20.0,
                 decode_ms_per_token=8.0)]
    df = charts.runs_frame(jobs)
    assert list(df["method"]) == ["original", "saten", "prune"]
    assert list(df["baseline"]) == [True, False, False]
    assert list(df["slower"]) == [False, True, False]
    assert df["label"].iloc[1] == "#2 saten 80% bytes" and "2:4" in df["label"].iloc[2]
    ref = charts.reference_point(df, "m")
    assert ref["bytes_after"] == 100 and (ref["ppl"], ref["decode_ms"]) == (15.0, 10.0)
    assert charts.reference_point(df, "other") is None


def test_size_axis_is_whole_model_when_every_run_recorded_it():
    """Runs over different layer subsets only compare on whole-model bytes; older runs fall back honestly."""
    import json

    whole = json.dumps({"eval": {}, "totals": {"model_bytes_before": 2**21, "model_bytes_after": 2**21 - 40}})
    jobs = [_job(1, {"method": "saten", "target_ratio": 0.6}, bytes_after=60, result_json=whole),
            _job(2, {"method": "svd", "target_ratio": 0.6}, bytes_after=60, result_json=whole)]
    df, _, title = charts.with_size_mib(charts.runs_frame(jobs))
    assert title == "model size (MiB)" and df["size (MiB)"].tolist() == [(2**21 - 40) / 2**20] * 2
    assert charts.reference_point(df, "m")["model_bytes_after"] == 2**21
    df, _, title = charts.with_size_mib(charts.runs_frame(jobs + [_job(3, {"method": "tt"}, bytes_after=2**20)]))
    assert title.startswith("size of the changed layers") and df["size (MiB)"].tolist() == [60 / 2**20] * 2 + [1.0]


def test_runs_frame_says_when_a_run_touched_only_some_layers():
    job = _job(4, {"method": "saten-aw", "target_ratio": 0.7, "include": ["model.layers.2[0-5].mlp.*"]})
    assert charts.runs_frame([job])["label"].iloc[0] == "#4 saten-aw 70% bytes (only model.layers.2[0-5].mlp.*)"


def test_eval_texts_lists_the_texts_evaluated_runs_were_measured_on():
    import json

    def on(text):
        return json.dumps({"eval": {"text_sha256": text}})

    jobs = [_job(1, {"method": "saten"}, ppl=12.0, result_json=on("aaa")),
            _job(2, {"method": "svd"}, ppl=14.0, result_json=on("aaa")),
            _job(3, {"method": "tt"}, ppl=None, result_json=on("bbb")),  # not evaluated: no perplexity to compare
            _job(4, {"method": "prune"}, ppl=20.0)]  # before fingerprints
    assert charts.eval_texts(charts.runs_frame(jobs)) == ["aaa"]
    jobs.append(_job(5, {"method": "wanda"}, ppl=13.0, result_json=on("ccc")))
    assert charts.eval_texts(charts.runs_frame(jobs)) == ["aaa", "ccc"]


def test_newest_model_is_the_latest_runs_model():
    jobs = [_job(1, {"method": "saten"}), {**_job(3, {"method": "svd"}), "model_ref": "b-model"},
            {**_job(2, {"method": "tt"}), "model_ref": "z-model"}]
    assert charts.newest_model(charts.runs_frame(jobs)) == "b-model"


def test_runs_frame_labels_allocated_and_healed_runs_apart():
    """An allocated plan has no target_ratio and a healed run differs from its unhealed twin: labels say so."""
    allocated = {"method": "saten-aw", "overrides": [{"pattern": "a", "rank": 2, "density": 0.1, "skip": False},
                                                     {"pattern": "b", "skip": True}], "heal_steps": 128}
    labels = charts.runs_frame([_job(7, allocated), _job(8, {"method": "wanda", "target_ratio": 0.5})])["label"]
    assert labels.tolist() == ["#7 saten-aw per-layer plan (1 layer set), healed 128 steps", "#8 wanda 50% bytes"]


def _deployed_result(dtype="bfloat16", **ev) -> str:
    """A report JSON with the deployment measurements a job records (injected numbers, never measured here)."""
    import json

    totals = {"dtype": dtype, "model_bytes_before": 3 * 2**20, "model_bytes_after": 2 * 2**20,
              "macs_per_token_before": 1000, "macs_per_token_after": 400}
    base = {"ppl_original": 15.0, "resident_bytes": 2**21, "resident_bytes_original": 3 * 2**20,
            "peak_memory_bytes": 5 * 2**20, "peak_memory_bytes_original": 6 * 2**20, "memory_growth_bytes": 2**20,
            "memory_growth_bytes_original": 2**21, "decode_ratio": 0.8, "decode_ratio_min": 0.7,
            "decode_ratio_max": 0.9, "prefill_ratio": 1.1, "ratio_reference": "float32",
            "latency": {"decode_ms_per_token": 9.0, "side_by_side": {"rounds": 5}}}
    return json.dumps({"eval": {**base, **ev}, "totals": totals})


def test_speed_verdict_calls_a_spread_across_one_no_difference():
    assert charts.speed_verdict(0.8, 0.7, 0.9) == "1.25× faster"
    assert charts.speed_verdict(0.8, 0.7, 1.05) == "no measurable difference"
    assert charts.speed_verdict(1.5, 1.2, 1.8) == "1.50× SLOWER"
    assert charts.speed_verdict(1.5) == "1.50× SLOWER"  # no spread recorded: the median alone
    assert charts.speed_verdict(float("nan")) == "not measured"
    with pytest.raises(ValueError, match="-0.5"):
        charts.speed_verdict(-0.5)


def test_runs_frame_carries_the_deployment_measurements():
    df = charts.runs_frame([_job(1, {"method": "saten", "target_ratio": 0.6}, result_json=_deployed_result())])
    row = df.iloc[0]
    assert (row["dtype"], row["ratio_reference"], row["ratio_rounds"]) == ("bfloat16", "float32", 5)
    assert (row["resident_bytes"], row["resident_bytes_original"]) == (2**21, 3 * 2**20)
    assert (row["peak_memory_bytes"], row["memory_growth_bytes_original"]) == (5 * 2**20, 2**21)
    assert (row["decode_ratio"], row["decode_ratio_min"], row["decode_ratio_max"], row["prefill_ratio"]) == (
        0.8, 0.7, 0.9, 1.1)
    assert (row["macs_per_token_before"], row["macs_per_token_after"]) == (1000, 400)
    old = charts.runs_frame([_job(2, {"method": "svd"})]).iloc[0]
    assert all(charts.is_missing(old[c]) for c in charts.DEPLOY_COLUMNS)


def test_slower_comes_from_the_side_by_side_spread_before_the_reference_job():
    """The reference job decodes at 10 ms; a run timed at 12 ms in another job is not slower if side by side
    its spread spans 1, and a run timed at 8 ms is slower if its whole spread is above 1."""
    ref = _job(1, {"exclude": ["*"], "method": "saten"}, bytes_before=0, bytes_after=0, decode_ms_per_token=10.0)
    noisy = _job(2, {"method": "saten", "target_ratio": 0.8}, decode_ms_per_token=12.0,
                 result_json=_deployed_result(decode_ratio=1.1, decode_ratio_min=0.95, decode_ratio_max=1.2))
    slow = _job(3, {"method": "saten", "target_ratio": 0.7}, decode_ms_per_token=8.0,
                result_json=_deployed_result(decode_ratio=1.3, decode_ratio_min=1.1, decode_ratio_max=1.4))
    old = _job(4, {"method": "svd", "target_ratio": 0.7}, decode_ms_per_token=12.0)  # no ratio: vs reference
    df = charts.runs_frame([ref, noisy, slow, old])
    assert list(df["slower"]) == [False, False, True, True]
    speed = charts.results_table(df)["speed"].tolist()
    assert speed[0] == "" and speed[1] == "no measurable difference (vs float32 original)"
    assert speed[2].startswith("1.30× SLOWER") and speed[3] == "1.20× SLOWER (vs reference job, timed apart)"


def test_results_table_shows_memory_in_mib_and_leaves_out_what_nobody_measured():
    df = charts.runs_frame([_job(1, {"method": "saten", "target_ratio": 0.6}, result_json=_deployed_result())])
    table = charts.results_table(df)
    assert (table["resident (MiB)"].iloc[0], table["resident, original (MiB)"].iloc[0]) == (2.0, 3.0)
    assert (table["peak memory (MiB)"].iloc[0], table["peak memory, original (MiB)"].iloc[0]) == (5.0, 6.0)
    assert table["speed"].iloc[0] == "1.25× faster (vs float32 original)"
    assert "resident_bytes" not in table and "model" not in table
    old = charts.results_table(charts.runs_frame([_job(2, {"method": "svd"})]))
    assert "resident (MiB)" not in old and "decode_ratio" not in old and "ppl" in old


def test_a_float32_original_gets_its_free_bf16_cast_drawn_at_half_the_bytes():
    jobs = [_job(1, {"method": "saten", "target_ratio": 0.6}, bytes_after=60, result_json=_deployed_result("float32"))]
    df, column, _ = charts.with_size_mib(charts.runs_frame(jobs))
    ref = charts.reference_point(df, "m")
    cast = charts.sized(charts.free_cast_point(ref), column)
    assert cast["label"] == charts.CAST_LABEL and cast["size (MiB)"] == 1.5 and cast["ppl"] == 15.0
    fig = charts.tradeoff_chart(df, "size (MiB)", "ppl", charts.sized(ref, column), extra=[cast])
    assert [t.name for t in fig.data][-2:] == [charts.ORIGINAL_LABEL, charts.CAST_LABEL]
    assert list(fig.data[-1].x) == [1.5] and list(fig.data[-2].x) == [3.0]
    bf16 = charts.runs_frame([{**jobs[0], "result_json": _deployed_result("bfloat16")}])
    assert charts.free_cast_point(charts.reference_point(bf16, "m")) is None
    assert charts.free_cast_point(None) is None


def test_plan_summary_names_quantized_parts():
    label, _ = charts._plan_summary({"method": "saten-aw", "target_ratio": 0.25, "value_bits": 8, "core_bits": 16})
    assert label == "saten-aw (values 8-bit) 25% bytes"
    label, _ = charts._plan_summary({"method": "saten", "target_ratio": 0.25, "value_bits": 16, "core_bits": 16})
    assert label == "saten 25% bytes"


def test_plan_summary_names_a_quantization_grid():
    label, ref = charts._plan_summary({"method": "rtn", "bits": 4, "quant_group": 64, "symmetric": True})
    assert label == "rtn int4 g64 sym" and not ref
    label, _ = charts._plan_summary({"method": "saten-q", "target_ratio": 0.25, "bits": 3, "quant_group": 0})
    assert label == "saten-q int3 per-row asym 25% bytes"
