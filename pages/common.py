"""Streamlit glue shared by the pages: the current model, cached loaders and friendly error display."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import streamlit as st

DEFAULT_MODEL = "smollm2-135m"
MODEL_KEY = "model_ref"  # plain session value (not a widget key), so it survives page switches
PLAN_KEY = "plan_json"


def model_ref() -> str:
    """The model every page works on, chosen on the Model page (embedded SmolLM2 until then)."""
    return st.session_state.get(MODEL_KEY, DEFAULT_MODEL)


@st.cache_resource(show_spinner="Loading model ...", max_entries=2)
def _load(ref: str) -> Any:
    from saten_core.models import load_model

    return load_model(ref)


def loaded_model(ref: str | None = None) -> Any | None:
    """The cached LoadedModel, or None after showing the one-line reason (bad path, offline hub ...)."""
    ref = ref or model_ref()
    try:
        return _load(ref)
    except (ValueError, OSError) as exc:
        st.error(f"Cannot load model: {exc}")
        return None


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
