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
    assert names == ["prune", "saten", "Pareto front", charts.ORIGINAL_LABEL]
    assert list(fig.data[2].x) == [1.0, 2.0]


def test_layer_error_and_loss_curve():
    fig = charts.layer_error_chart(pd.DataFrame({"name": ["a", "b"], "rel_error": [0.1, 0.2]}))
    assert list(fig.data[0].y) == [0.1, 0.2]
    loss = pd.DataFrame({"step": [0, 1, 0, 1], "loss": [2.0, 1.5, 2.1, 1.8], "split": ["train"] * 2 + ["held-out"] * 2})
    assert len(charts.loss_curve_chart(loss).data) == 2
