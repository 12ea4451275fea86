"""Spectra: values match svdvals, energy/rank invariants, TT unfoldings, disk cache behaviour, CLI.

Run: .venv/bin/python -m pytest -q tests/test_spectrum.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from saten_core import spectrum as S


def _layers(seed: int = 0) -> list[tuple[str, nn.Linear]]:
    torch.manual_seed(seed)
    shapes = [(64, 128), (64, 128), (48, 96), (128, 64)]
    return [(f"model.layers.{i}.proj", nn.Linear(n_in, n_out, bias=False)) for i, (n_in, n_out) in enumerate(shapes)]


def test_singular_values_match_svdvals_on_random_layers():
    layers = _layers()
    data = S.compute_spectra(layers)
    for entry, (_, lin) in zip(data["layers"], layers, strict=True):
        ref = torch.linalg.svdvals(lin.weight.detach())
        got = torch.tensor(entry["singular_values"])
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
        assert entry["shape"] == list(lin.weight.shape)
        assert all(a >= b for a, b in zip(got, got[1:], strict=False))


def test_energy_curve_and_ranks():
    data = S.compute_spectra(_layers())
    for entry in data["layers"]:
        energy = entry["energy"]
        assert energy[-1] == 1.0 and all(a <= b for a, b in zip(energy, energy[1:], strict=False))
        ranks = [entry["rank_at_energy"][k] for k in ("0.9", "0.95", "0.99")]
        assert ranks == sorted(ranks) and 1 <= ranks[0] and ranks[-1] <= len(energy)
        k = ranks[0]
        assert energy[k - 1] >= 0.9 - 1e-12 and (k == 1 or energy[k - 2] < 0.9)
        s = np.asarray(entry["singular_values"])
        assert entry["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2)
        assert 1.0 <= entry["effective_rank"] <= len(s)


def test_effective_and_stable_rank_of_flat_and_rank_one_spectra():
    assert S.effective_rank(np.ones(10)) == pytest.approx(10.0)
    assert S.stable_rank(np.ones(10)) == pytest.approx(10.0)
    assert S.effective_rank(np.array([3.0, 0, 0])) == pytest.approx(1.0)
    assert S.rank_at_energy(S.energy_curve(np.array([3.0, 0, 0])), 0.99) == 1
    with pytest.raises(ValueError, match="1.5"):
        S.rank_at_energy(S.energy_curve(np.ones(3)), 1.5)


def test_tt_unfoldings_are_reshapes_of_wt():
    layers = _layers()
    data = S.compute_spectra(layers)
    entry, (_, lin) = data["layers"][0], layers[0]
    in_modes, out_modes = entry["tt_modes"]
    modes = in_modes + out_modes
    wt = lin.weight.detach().T.contiguous()
    assert len(entry["tt_unfoldings"]) == len(modes) - 1
    for k, vals in enumerate(entry["tt_unfoldings"]):
        ref = torch.linalg.svdvals(wt.reshape(math.prod(modes[: k + 1]), -1))
        assert torch.allclose(torch.tensor(vals), ref, rtol=1e-4, atol=1e-5)


def test_powerlaw_alpha_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    eigs = (1.0 - rng.random(4000)) ** (-1.0 / (3.0 - 1.0))  # Pareto with density exponent alpha = 3
    alpha = S.powerlaw_alpha(np.sqrt(eigs))
    assert alpha == pytest.approx(3.0, abs=0.3)
    assert S.powerlaw_alpha(np.ones(3)) is None


def test_real_tiny_llama_layer_and_cache(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SATEN_HOME", str(tmp_path))  # a cache of its own: other tests spectra the same model
    from saten_core.models import linear_layers, load_model

    model = load_model(str(tiny_llama_dir)).model
    layers = linear_layers(model)
    stages = []
    first = S.model_spectra(model, device="cpu", progress=lambda s, f, m: stages.append((s, f)))
    assert not first["cached"] and len(first["layers"]) == len(layers)
    assert stages and stages[-1][1] == 1.0
    for entry, (name, lin) in zip(first["layers"], layers, strict=True):
        assert entry["name"] == name
        ref = torch.linalg.svdvals(lin.weight.detach())
        assert torch.allclose(torch.tensor(entry["singular_values"]), ref, rtol=1e-5, atol=1e-6)
    second = S.model_spectra(model, device="cpu")
    assert second["cached"]
    assert second["layers"] == first["layers"] and second["fingerprint"] == first["fingerprint"]

    path = S.cache_path(first["fingerprint"])
    path.write_text(path.read_text()[:-40] + "0" * 40)  # corrupt the cached entry
    third = S.model_spectra(model, device="cpu")
    assert not third["cached"] and third["layers"] == first["layers"]
    assert S.load_cached(first["fingerprint"]) is not None  # rewritten, valid again

    with torch.no_grad():
        layers[3][1].weight[5, 7] += 0.25  # one weight: the strided sample may skip it, the sums do not
    changed = S.model_spectra(model, device="cpu")
    assert not changed["cached"] and changed["fingerprint"] != first["fingerprint"]
    assert changed["layers"][3]["singular_values"] != first["layers"][3]["singular_values"]


def test_corrupt_json_with_valid_header_is_not_trusted():
    from saten_core.files import atomic_write_text

    fp = "f" * 32
    payload = "{not json"
    import hashlib

    atomic_write_text(S.cache_path(fp), hashlib.sha256(payload.encode()).hexdigest() + "\n" + payload)
    assert S.load_cached(fp) is None
    S.save_cached(fp, {"version": S.CACHE_VERSION, "fingerprint": "other", "layers": []})
    assert S.load_cached(fp) is None  # an entry for other weights is never returned


def test_cli_writes_layers_json(tiny_llama_dir, tmp_path):
    from saten_core.__main__ import main

    out = tmp_path / "spec.json"
    assert main(["spectrum", "--model", str(tiny_llama_dir), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    entry = data["layers"][0]
    for key in ("name", "shape", "singular_values", "effective_rank", "stable_rank", "rank_at_energy",
                "tt_unfoldings"):
        assert key in entry
    assert set(entry["rank_at_energy"]) == {"0.9", "0.95", "0.99"}
    assert entry["dtype"] == "bfloat16"  # the deploy dtype the pages read: one cache entry, half of fp32's memory


def test_cli_dtype_is_the_weights_dtype_and_checked(tiny_llama_dir, tmp_path, capsys):
    from saten_core.__main__ import main

    out = tmp_path / "spec.json"
    assert main(["spectrum", "--model", str(tiny_llama_dir), "--json", str(out), "--dtype", "float32"]) == 0
    assert {layer["dtype"] for layer in json.loads(out.read_text())["layers"]} == {"float32"}
    assert main(["spectrum", "--model", str(tiny_llama_dir), "--json", str(out), "--dtype", "int4"]) == 2
    assert "int4" in capsys.readouterr().err


def test_cli_bad_model_and_unwritable_out_exit_2(tiny_llama_dir, tmp_path, capsys):
    from saten_core.__main__ import main

    assert main(["spectrum", "--model", str(tmp_path / "nope"), "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    bad_out = tmp_path / "missing" / "o.json"
    assert main(["spectrum", "--model", str(tiny_llama_dir), "--json", str(bad_out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on a lent GPU machine)")
def test_entry_energy_profile_of_a_cuda_weight_matches_cpu():
    """Found by bench/gpu_check.sh on an H200: allocation on CUDA called numpy() on a device tensor."""
    w = torch.randn(96, 64)
    cpu, cuda = S.entry_energy_profile(w), S.entry_energy_profile(w.cuda())
    np.testing.assert_allclose(cuda["entry_energy"], cpu["entry_energy"], rtol=1e-6)
    assert cuda["entry_energy_2to4"] == pytest.approx(cpu["entry_energy_2to4"], rel=1e-6)
