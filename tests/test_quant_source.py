"""GGUF source types of GGUF-derived models, the source's size line on trade-off charts, grid-artefact warnings.

Run: .venv/bin/python -m pytest -q tests/test_quant_source.py        (slow ones read the embedded SmolLM2 GGUF)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from saten_core import charts
from saten_core.plan import Plan
from saten_core.quant import source as src

APP = str(Path(__file__).resolve().parents[1] / "app.py")
MIB = 2**20
Q4_1_SOURCE = {"block_linear_types": {"Q4_1": 210}, "block_linear_params": 1000, "bits_per_weight": 5.0,
               "grid": {"bits": 4, "group": 32, "symmetric": False}, "types": {"Q4_1": 210, "F32": 61}}


def write_gguf(path: Path, linears: dict[str, tuple[str, int, int]]) -> Path:
    """A tiny GGUF (zero weights) with the given block linears {name: (GGML type, out, in)} and one F32 norm."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for name, (kind, rows, cols) in linears.items():
        qtype = GGMLQuantizationType[kind]
        block, size = GGML_QUANT_SIZES[qtype]
        writer.add_tensor(name, np.zeros((rows, cols // block * size), dtype=np.uint8), raw_dtype=qtype)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def gguf_dir(tmp_path, monkeypatch) -> Path:
    """A folder holding one tiny all-Q4_1 GGUF and no safetensors (its tensor-table cache in tmp_path too)."""
    monkeypatch.setenv("SATEN_MODEL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "gguf_model"
    folder.mkdir()
    write_gguf(folder / "tiny.Q4_1.gguf", {"blk.0.attn_q.weight": ("Q4_1", 64, 64),
                                           "blk.0.ffn_down.weight": ("Q4_1", 64, 128)})
    return folder


# ---------------------------------------------------------------- type table

@pytest.mark.parametrize(("name", "bits"), [("Q4_0", 4.5), ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0),
                                            ("Q8_0", 8.5), ("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.5625),
                                            ("F16", 16.0), ("BF16", 16.0), ("F32", 32.0)])
def test_bits_per_weight_follow_the_block_layout(name, bits):
    assert src.ggml_type(name).bits_per_weight == bits


def test_grids_of_the_uniform_types():
    assert src.ggml_type("Q4_1").grid() == {"bits": 4, "group": 32, "symmetric": False}
    assert src.ggml_type("Q4_0").grid() == {"bits": 4, "group": 32, "symmetric": True}
    assert src.ggml_type("Q8_0").grid() == {"bits": 8, "group": 32, "symmetric": True}
    assert src.ggml_type("Q4_K").grid() == {"bits": 4, "group": 32, "symmetric": False}  # sub-blocks of 32
    assert src.ggml_type("Q6_K").grid() == {"bits": 6, "group": 16, "symmetric": True}  # sub-blocks of 16
    assert src.ggml_type("Q4_K").block_size == 256 and "superblocks of 256" in src.ggml_type("Q4_K").description
    assert src.ggml_type("F16").grid() is None and src.ggml_type("IQ4_XS").grid() is None
    assert src.ggml_type("Q6_K").code_bits == 6 and src.ggml_type("IQ4_XS").code_bits == 4


def test_fallback_sizes_match_the_gguf_package():
    from gguf import GGML_QUANT_SIZES

    sizes = {t.name: tuple(v) for t, v in GGML_QUANT_SIZES.items()}
    assert all(sizes[name] == value for name, value in src.FALLBACK_SIZES.items())


def test_unknown_type_is_named():
    with pytest.raises(ValueError, match="'Q9_9'"):
        src.ggml_type("Q9_9")


# ---------------------------------------------------------------- reading GGUFs

def test_tiny_gguf_types_summary_and_memo(gguf_dir, monkeypatch):
    path = gguf_dir / "tiny.Q4_1.gguf"
    assert src.gguf_tensor_types(path) == {"blk.0.attn_q.weight": "Q4_1", "blk.0.ffn_down.weight": "Q4_1",
                                           "blk.0.attn_norm.weight": "F32"}
    summary = src.source_quantization(str(gguf_dir))  # a folder with one GGUF and no safetensors
    assert summary == src.source_quantization(str(path))
    assert summary["types"] == {"Q4_1": 2, "F32": 1} and summary["block_linear_types"] == {"Q4_1": 2}
    assert summary["block_linear_params"] == 64 * 64 + 64 * 128 and summary["bits_per_weight"] == 5.0
    assert summary["grid"] == {"bits": 4, "group": 32, "symmetric": False}
    src._tensor_table_json.cache_clear()
    monkeypatch.setattr(src, "_read_tensor_table", lambda p: pytest.fail("read again despite the disk cache"))
    assert src.gguf_tensor_types(path)["blk.0.attn_q.weight"] == "Q4_1"


def test_mixed_block_linear_types_weigh_by_parameters_and_have_no_single_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("SATEN_MODEL_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "mixed.gguf", {"blk.0.attn_q.weight": ("Q4_K", 64, 256),
                                                "blk.0.ffn_down.weight": ("Q6_K", 64, 256)})
    summary = src.source_quantization(str(path))
    assert summary["bits_per_weight"] == pytest.approx((4.5 + 6.5625) / 2) and summary["grid"] is None
    assert src.grid_artefact(summary, 4, 32, False).endswith("than on a 16-bit checkpoint")  # lowest: 4 bits
    assert src.grid_artefact(summary, 3, 32, False) is None


def test_not_a_gguf_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        src.gguf_tensor_types(bad)
    with pytest.raises(ValueError, match="nope.gguf"):
        src.gguf_tensor_types(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="non-empty"):
        src.source_quantization("")


def test_float_checkpoints_have_no_source(tiny_llama_dir, tiny_bert_dir, tmp_path):
    assert src.source_quantization("minilm-l6") is None  # registry entry with safetensors: nothing is read
    assert src.source_quantization(str(tiny_llama_dir)) is None
    assert src.source_quantization(str(tiny_bert_dir)) is None
    assert src.source_quantization("HuggingFaceTB/SmolLM2-135M") is None  # hub id: no local file to read
    assert src.source_quantization(str(tmp_path / "gone")) is None


@pytest.mark.slow
def test_embedded_smollm2_block_linears_are_all_q4_1():
    types = src.gguf_tensor_types(src.gguf_file("smollm2-135m"))
    linears = {n: t for n, t in types.items() if src.BLOCK_LINEAR.match(n)}
    assert len(linears) == 210 and set(linears.values()) == {"Q4_1"}
    assert types == {n: t for n, (t, _) in src._read_tensor_table(src.gguf_file("smollm2-135m")).items()}


@pytest.mark.slow
def test_smollm2_source_is_q4_1_at_five_bits_per_weight():
    from saten_core.models import list_models, model_cache_dir

    summary = src.source_quantization("smollm2-135m")
    assert summary["bits_per_weight"] == 5.0 and summary["block_linear_types"] == {"Q4_1": 210}
    assert summary["grid"] == {"bits": 4, "group": 32, "symmetric": False}
    assert summary["block_linear_params"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert src.source_quantization(str(model_cache_dir() / "smollm2-135m-bfloat16")) == summary  # its cast copy
    rows = {r["name"]: r for r in list_models()}
    assert rows["smollm2-135m"]["source_quantization"] == summary
    assert rows["minilm-l6"]["source_quantization"] is None


# ---------------------------------------------------------------- grid alignment

@pytest.mark.parametrize(("bits", "group", "symmetric", "expected"), [
    (4, 32, False, "int4 g32 asym on a Q4_1 source: an artefact (the weights already sit on this grid)"),
    (4, 16, False, "int4 g16 asym on a Q4_1 source: an artefact"),  # nests inside the blocks of 32
    (8, 32, False, "int8 g32 asym on a Q4_1 source: an artefact"),  # more bits over the same blocks
    (4, 64, True, "quantization at >= 4 bits looks better on a 4-bit source"),  # groups do not nest
    (4, 32, True, "quantization at >= 4 bits looks better on a 4-bit source"),  # sym cannot hold an asym grid
    (4, 0, False, "int4 per-row asym on a Q4_1 source: quantization at >= 4 bits"),  # per-row never aligned
    (3, 32, False, None),
    (2, 32, False, None),
])
def test_grid_artefact_on_a_q4_1_source(bits, group, symmetric, expected):
    note = src.grid_artefact(Q4_1_SOURCE, bits, group, symmetric)
    assert note is None if expected is None else note.startswith(expected) or expected in note, note


def test_grid_artefact_on_a_symmetric_source_accepts_asymmetric_configs():
    q4_0 = {**Q4_1_SOURCE, "block_linear_types": {"Q4_0": 210}, "grid": src.ggml_type("Q4_0").grid()}
    assert "an artefact" in src.grid_artefact(q4_0, 4, 32, False)
    assert "an artefact" in src.grid_artefact(q4_0, 4, 32, True)


def test_grid_artefact_needs_a_source_and_names_bad_values():
    assert src.grid_artefact(None, 4, 32, False) is None
    for bad in ({"bits": 0}, {"bits": True}, {"group": -1}, {"group": 3.0}, {"symmetric": "no"}):
        args = {"bits": 4, "group": 32, "symmetric": False, **bad}
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            src.grid_artefact(Q4_1_SOURCE, **args)


# ---------------------------------------------------------------- the source's size on charts

def test_source_model_bytes_swaps_the_block_linears_for_the_source_bits():
    assert src.source_model_bytes(1000, 800, 5.0) == 200 + 250  # 16-bit block linears at 5 bits/weight
    assert src.source_model_bytes(1000, 800, 5.0, dtype_bits=32) == 325
    with pytest.raises(ValueError, match="1200"):
        src.source_model_bytes(1000, 1200, 5.0)
    with pytest.raises(ValueError, match="-1"):
        src.source_model_bytes(1000, 800, -1)


def _runs(dtype: str = "bfloat16", whole: bool = True) -> pd.DataFrame:
    """A finished reference run and one compressed run of model 'm' (crafted numbers, as the worker records)."""
    totals = {"dtype": dtype, **({"model_bytes_before": 3000 * MIB, "model_bytes_after": 2000 * MIB} if whole else {})}
    base = {"model_ref": "m", "device_used": "cpu", "ppl": 16.0, "kl": None, "top1_agreement": None,
            "decode_ms_per_token": None, "prefill_ms": None, "seconds": 1.0}
    jobs = [{**base, "id": 1, "plan_json": Plan(exclude=["*"]).to_json(), "bytes_before": 0, "bytes_after": 0,
             "result_json": json.dumps({"eval": {"ppl_original": 15.0}, "totals": totals})},
            {**base, "id": 2, "plan_json": Plan(method="saten", target_ratio=0.6).to_json(),
             "bytes_before": 1600 * MIB, "bytes_after": 1000 * MIB,
             "result_json": json.dumps({"eval": {"ppl_original": 15.0}, "totals": totals})}]
    return charts.runs_frame(jobs)


def test_source_line_on_the_whole_model_axis():
    df, column, _ = charts.with_size_mib(_runs())
    ref = charts.reference_point(df, "m")
    source = {**Q4_1_SOURCE, "block_linear_params": 800 * MIB}  # 1600 MiB at bf16 of the 3000
    line = charts.source_line(ref, source, column)
    assert column == "model_bytes_after" and line["label"] == "Q4_1 source (5.0 bits/weight)"
    assert line["size (MiB)"] == 1400 + 1600 * 5 / 16
    assert charts.source_line(ref, None, column) is None
    assert charts.source_line(ref, {**source, "block_linear_params": 4000 * MIB}, column) is None  # not this model


def test_source_line_on_the_changed_layers_axis_and_at_float32():
    df, column, _ = charts.with_size_mib(_runs(dtype="float32", whole=False))
    line = charts.source_line(charts.reference_point(df, "m"), Q4_1_SOURCE, column)
    assert column == "bytes_after" and line["size (MiB)"] == 1600 * 5 / 32


def test_tradeoff_chart_draws_the_source_line_only_when_given():
    df, column, _ = charts.with_size_mib(_runs())
    line = charts.source_line(charts.reference_point(df, "m"), {**Q4_1_SOURCE, "block_linear_params": 800 * MIB},
                              column)
    fig = charts.tradeoff_chart(df[~df["baseline"]], "size (MiB)", "ppl", lines=[line])
    assert [s.x0 for s in fig.layout.shapes] == [line["size (MiB)"]]
    assert [a.text for a in fig.layout.annotations] == ["Q4_1 source (5.0 bits/weight)"]
    plain = charts.tradeoff_chart(df[~df["baseline"]], "size (MiB)", "ppl")
    assert plain.layout.shapes == () and plain.layout.annotations == ()


def _quant_job(id_: int, *specs: dict) -> dict:
    layers = [{"name": f"model.layers.{i}.mlp.up_proj", "spec": spec} for i, spec in enumerate(specs)]
    return {"id": id_, "result_json": json.dumps({"layers": layers})}


def test_grid_artefacts_read_the_grids_the_layers_were_given():
    rtn = {"method": "rtn", "bits": 4, "qgroup": 32, "symmetric": False}
    jobs = [_quant_job(1, rtn), _quant_job(2, {**rtn, "bits": 3}), _quant_job(3, {"method": "saten", "rank": 8}),
            _quant_job(4, {**rtn, "method": "saten-q", "qgroup": 64}, {**rtn, "method": "saten-q"}),
            {"id": 5, "result_json": None}]
    notes = charts.grid_artefacts(jobs, Q4_1_SOURCE)
    assert set(notes) == {1, 4} and notes[1].startswith("int4 g32 asym on a Q4_1 source: an artefact")
    assert "int4 g64 asym" in notes[4] and "int4 g32 asym" in notes[4]  # two grids, two notes
    assert charts.grid_artefacts(jobs, None) == {}


# ---------------------------------------------------------------- pages

def page(path: str, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    return at.switch_page(path).run()


def gguf_runs(monkeypatch, tmp_path, model: str, layers: list[dict] | None = None) -> list[int]:
    """A fresh job store with a reference job and an evaluated compressed run of `model` (crafted numbers; the
    run's report holds `layers`)."""
    from saten_core.jobs import store

    monkeypatch.setenv("SATEN_HOME", str(tmp_path / "home"))
    totals = {"dtype": "bfloat16", "bytes_before": 800 * MIB, "model_bytes_before": 1000 * MIB,
              "model_bytes_after": 600 * MIB, "macs_per_token_before": 400 * MIB, "macs_per_token_after": 150 * MIB}
    evaluated = {"ppl_original": 15.0, "resident_bytes": 700 * MIB, "resident_bytes_original": 1000 * MIB,
                 "decode_ratio": 0.9, "decode_ratio_min": 0.85, "decode_ratio_max": 0.95, "ratio_reference": "bfloat16",
                 "latency": {"decode_ms_per_token": 9.0, "side_by_side": {"rounds": 5}}}
    jobs = [(Plan(exclude=["*"]), {"bytes_before": 0, "bytes_after": 0, "ppl": 15.0, "decode_ms_per_token": 10.0},
             {"eval": {"ppl_original": 15.0}, "totals": {"dtype": "bfloat16"}}),
            (Plan(method="saten", target_ratio=0.6), {"bytes_before": 800 * MIB, "bytes_after": 400 * MIB,
                                                      "ppl": 15.3, "decode_ms_per_token": 9.0},
             {"eval": evaluated, "totals": totals, "layers": layers or []})]
    ids = []
    for plan, columns, result in jobs:
        job_id = store.insert_job(model, plan.to_json(), eval_settings={"evaluate": True}, device="cpu")
        assert store.claim_next(pid=1).id == job_id
        assert store.update_running(job_id, 1, status="succeeded", device_used="cpu", finished_at=1.0,
                                    result_json=json.dumps(result), **columns)
        ids.append(job_id)
    return ids


def test_results_and_roi_pages_draw_and_name_the_gguf_source(gguf_dir, monkeypatch, tmp_path):
    spec = {"method": "rtn", "bits": 4, "qgroup": 32, "symmetric": False}
    ids = gguf_runs(monkeypatch, tmp_path, str(gguf_dir), layers=[{"name": "model.layers.0.mlp.up_proj",
                                                                    "spec": spec, "rel_error": 0.01}])
    at = page("app_pages/results.py")
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"run #{ids[1]}: int4 g32 asym on a Q4_1 source: an artefact" in w.value for w in at.warning)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)  # plotly's JSON escapes "/"
    assert [a["text"] for a in spec["layout"]["annotations"]] == ["Q4_1 source (5.0 bits/weight)"]
    assert any("Q4_1 source (5.0 bits/weight)" in c.value for c in at.caption)
    at = page("app_pages/roi.py")
    assert not at.exception, [e.value for e in at.exception]
    assert any("dequantised from a GGUF (Q4_1 source" in i.value for i in at.info)


def test_results_page_of_a_float_model_has_no_source_line(monkeypatch, tmp_path, tiny_llama_dir):
    gguf_runs(monkeypatch, tmp_path, str(tiny_llama_dir))
    at = page("app_pages/results.py")
    assert not at.exception, [e.value for e in at.exception]
    assert "annotations" not in json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]
    assert not any("GGUF" in w.value for w in at.warning)


def test_model_page_of_a_float_folder_shows_no_source(tiny_llama_dir):
    at = page("app_pages/model.py", model_ref=str(tiny_llama_dir), model_source="Local folder or hub id",
              model_path=str(tiny_llama_dir))
    assert not at.exception, [e.value for e in at.exception]
    assert "Source weights" not in [h.value for h in at.subheader]


@pytest.mark.slow
def test_model_page_shows_the_q4_1_source_of_smollm2():
    at = page("app_pages/model.py", model_ref="smollm2-135m")
    assert not at.exception, [e.value for e in at.exception]
    assert "Source weights" in [h.value for h in at.subheader]
    assert next(m.value for m in at.metric if m.label.startswith("Block linears as stored")) == \
        "5.0 bits/weight (Q4_1)"
    types = next(d.value for d in at.dataframe if "bits/weight" in d.value.columns).set_index("type")
    assert types.loc["Q4_1", "block linears"] == 210 and types.loc["Q4_1", "bits/weight"] == 5.0
    assert any("an artefact" in c.value and "groups of 32" in c.value for c in at.caption)
