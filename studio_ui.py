"""Streamlit glue shared by the dashboard pages: the current model, cached loaders and friendly error display.

It lives outside app_pages/ so Streamlit never mistakes it for a page.
Imports go one way: app_pages -> studio_ui -> saten_core (which never imports streamlit).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import streamlit as st

DEFAULT_MODEL = "smollm2-135m"
MODEL_KEY = "model_ref"  # plain session value (not a widget key), so it survives page switches
PLAN_KEY = "plan_json"
DTYPE_KEY = "deploy_dtype"  # plain session value: the dtype the model is served in, chosen on the Model page
# Above this many bytes of safetensors the page process holds only the model's structure (saten_core.lazy): the
# pages need names and shapes; spectra come from a background job and single layers are read from disk.
PAGE_LOAD_BYTES = int(os.environ.get("SATEN_PAGE_LOAD_BYTES", 2**30))
# Human names for saten_core.spec.METHODS; a method added there and not here shows under its code name.
METHOD_LABELS = {
    "saten": "Saten: tensor train + sparse residual",
    "saten-aw": "Saten, activation-aware (calibrated)",
    "tt": "Tensor train only",
    "svd": "Truncated SVD (baseline)",
    "svd-w": "Whitened SVD, activation-aware (baseline)",
    "prune": "Magnitude pruning (baseline)",
    "wanda": "Wanda pruning, activation-aware (baseline)",
    "rtn": "Round-to-nearest quantization (baseline)",
    "gptq": "GPTQ quantization, activation-aware (baseline)",
    "sparsegpt": "SparseGPT pruning, activation-aware (baseline)",
    "saten-q": "Saten repairing quantization: int codes + TT + sparse",
}


def method_label(method: str) -> str:
    """'saten-aw' -> 'Saten, activation-aware (calibrated)'; unknown methods keep their code name."""
    return METHOD_LABELS.get(method, method)


def model_ref() -> str:
    """The model every page works on, chosen on the Model page (embedded SmolLM2 until then)."""
    return st.session_state.get(MODEL_KEY, DEFAULT_MODEL)


def deploy_dtype() -> str:
    """The deploy dtype every page counts bytes at and plans carry (bfloat16 until changed on the Model page)."""
    from saten_core.deploy.dtype import DEFAULT_DTYPE

    return st.session_state.get(DTYPE_KEY, DEFAULT_DTYPE)


@st.cache_resource(show_spinner="Loading model ...", max_entries=2)
def _load_at(ref: str, dtype: str) -> Any:
    """The model at `dtype`; over PAGE_LOAD_BYTES on disk its structure only (device "meta", see is_lazy)."""
    from saten_core.deploy.dtype import torch_dtype
    from saten_core.lazy import skeleton
    from saten_core.models import load_model, resolve_ref

    _, folder = resolve_ref(ref, dtype)
    on_disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return (skeleton if on_disk > PAGE_LOAD_BYTES else load_model)(ref, dtype=torch_dtype(dtype))


def is_lazy(lm: Any) -> bool:
    """True when the page holds the model's structure only (a model over PAGE_LOAD_BYTES)."""
    return getattr(lm, "device", None) == "meta"


def _folder_spectra(lm: Any) -> dict | None:
    from saten_core.lazy import folder_key
    from saten_core.spectrum import cached_for_source

    return cached_for_source(folder_key(lm.source_dir, lm.dtype))


def _load(ref: str) -> Any:
    """The model at the session's deploy dtype (cached per model and dtype)."""
    return _load_at(ref, deploy_dtype())


def loaded_model(ref: str | None = None) -> Any | None:
    """The cached LoadedModel at the deploy dtype, or None after showing the one-line reason (bad path ...)."""
    ref = ref or model_ref()
    try:
        return _load(ref)
    except (ValueError, OSError) as exc:
        st.error(f"Cannot load model: {exc}")
        return None


@st.cache_data(show_spinner="Reading the cached spectra of every layer ...", max_entries=4)
def spectra(ref: str) -> dict:
    """All-layer spectra from saten_core.spectrum's disk cache (call only when _spectra_on_disk says they exist)."""
    from saten_core.spectrum import model_spectra

    lm = _load(ref)
    if is_lazy(lm):
        return _folder_spectra(lm) or {}
    return model_spectra(lm.model)


@st.cache_data(show_spinner=False, max_entries=8)
def _spectra_on_disk(ref: str) -> bool:
    from saten_core.models import linear_layers
    from saten_core.spectrum import cache_path, weights_fingerprint

    lm = _load(ref)
    if is_lazy(lm):  # found by the folder's files, without reading its weights (or parsing the spectra)
        from saten_core.lazy import folder_key
        from saten_core.spectrum import source_fingerprint

        fingerprint = source_fingerprint(folder_key(lm.source_dir, lm.dtype))
        return fingerprint is not None and cache_path(fingerprint).exists()
    return cache_path(weights_fingerprint(linear_layers(lm.model), extra="order=2")).exists()


def spectra_if_ready(ref: str) -> dict | None:
    """All-layer spectra when already computed for these weights, else None (never starts the long computation:
    that is a background job, see spectrum_job)."""
    return spectra(ref) if _spectra_on_disk(ref) else None


def spectrum_job(ref: str) -> Any | None:
    """The newest all-layer spectrum job of this model (any status), or None."""
    from saten_core import jobs
    from saten_core.jobs.store import check_model_ref

    try:
        target = check_model_ref(ref)
    except ValueError:
        return None
    return next((j for j in jobs.list_jobs(limit=200) if j.task == "spectrum" and j.model_ref == target), None)


def spectra_landed(ref: str) -> bool:
    """After a spectrum job succeeded: forget the cached 'not on disk' answer and check again."""
    _spectra_on_disk.clear(ref)
    return _spectra_on_disk(ref)


@st.cache_data(show_spinner="Computing this layer's spectrum ...", max_entries=64)
def layer_spectrum(ref: str, name: str) -> dict:
    """Spectrum of one layer: about a second, so the Spectrum page is usable before the full scan exists."""
    from saten_core.models import linear_layers
    from saten_core.spectrum import compute_spectra

    lm = _load(ref)
    if is_lazy(lm):  # one layer read from disk, not the model
        from saten_core.lazy import read_linear

        return compute_spectra([(name, read_linear(lm.source_dir, name, lm.dtype))])["layers"][0]
    layers = dict(linear_layers(lm.model))
    return compute_spectra([(name, layers[name])])["layers"][0]


@st.cache_data(show_spinner=False, max_entries=8)
def layer_names(ref: str) -> list[str]:
    from saten_core.models import linear_layers

    return [name for name, _ in linear_layers(_load(ref).model)]


@st.cache_data(show_spinner=False, max_entries=16)
def gguf_source(ref: str) -> dict | None:
    """What a GGUF-derived model was stored as (saten_core.quant.source.source_quantization), or None: float
    weights, or a source that cannot be read (then nothing is claimed about it)."""
    from saten_core.quant.source import source_quantization

    try:
        return source_quantization(ref)
    except (ValueError, OSError):
        return None


def show_source(ref: str) -> None:
    """The Model page's 'Source weights' section: the GGUF tensor types and what they mean (nothing for float
    checkpoints)."""
    import pandas as pd

    from saten_core.quant.source import source_note, source_table

    source = gguf_source(ref)
    if source is None:
        return
    st.subheader("Source weights")
    kinds = ", ".join(source["block_linear_types"])
    st.metric("Block linears as stored in the source", f"{source['bits_per_weight']:.1f} bits/weight ({kinds})")
    st.dataframe(pd.DataFrame(source_table(source)), hide_index=True, key="model_source_types")
    st.caption(source_note(source))


def library(name: str, what: str) -> ModuleType | None:
    """Import saten_core.<name>, or say the feature is still being built (never fake its result)."""
    try:
        return importlib.import_module(f"saten_core.{name}")
    except ImportError as exc:
        st.info(f"{what} is coming: `saten_core.{name}` is not available yet ({exc}).", icon=":material/construction:")
        return None


def show_error(exc: Exception) -> None:
    """Bad input or a missing file is the user's to fix: one line, no traceback."""
    st.error(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:,.2f} GiB"


def model_caption() -> None:
    """Remind the user which model the page is about."""
    st.caption(f"Model: `{model_ref()}` — change it on the Model page.")


def grid_note(ref: str, rows: list[dict]) -> str | None:
    """The grid-artefact warning for a plan's quantized layers on a GGUF-derived model, or None (first grid seen)."""
    from saten_core.quant.source import grid_artefact

    spec = next((r["spec"] for r in rows if r.get("spec") and r["spec"].get("bits")), None)
    if spec is None:
        return None
    return grid_artefact(gguf_source(ref), spec["bits"], spec["qgroup"], spec["symmetric"])


def number_list(text: str, kind: type) -> list:
    """A comma-separated list typed in a text box ("0.5, 0.8") as numbers; ValueError naming the bad entry."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(kind(part))
        except ValueError:
            raise ValueError(f"{part!r} is not a{'n integer' if kind is int else ' number'} (in {text!r})") from None
    if not out:
        raise ValueError(f"no values in {text!r}: type a comma-separated list")
    return out


def sign_in_required() -> bool:
    """Sign-in is on when .streamlit/secrets.toml has an [auth] section (Streamlit's built-in OIDC, st.login).

    Off by default: a studio on 127.0.0.1 serves one person. A shared deployment configures a provider there.
    """
    try:
        return "auth" in st.secrets
    except (FileNotFoundError, KeyError):
        return False


def signed_in_gate() -> bool:
    """True when this visitor may use the studio (sign-in off, or signed in); else it shows the sign-in box.

    app.py stops before any page runs when this is False, so a signed-out visitor can neither read results nor
    submit, cancel or delete anything.
    """
    if not sign_in_required():
        return True
    if st.user.get("is_logged_in"):  # a mapping: AppTest and signed-out sessions may lack the key
        who = st.user.get("email") or st.user.get("name") or "signed in"
        st.sidebar.caption(f"Signed in: {who}")
        st.sidebar.button("Sign out", on_click=st.logout, key="sign_out")
        return True
    st.title("Saten Studio")
    st.info("This studio is shared: sign in to plan, run and compare compressions.", icon=":material/lock:")
    st.button("Sign in", on_click=st.login, type="primary", key="sign_in", icon=":material/login:")
    return False
