"""Text for calibration and evaluation: the bundled Python docs corpus, its fixed split, and user text files."""

from __future__ import annotations

import os
from pathlib import Path


def default_text() -> str:
    """Python's bundled pydoc topics (ships with every CPython, so it works offline), in sorted key order.

    Example:
        text = default_text()
        calibration, held_out = split_text(text)
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def split_text(text: str) -> tuple[str, str]:
    """(calibration, held_out): first half / second half, cut at the paragraph boundary nearest the middle.

    Fixed and disjoint, so statistics gathered on calibration never leak into the held-out perplexity.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"cannot split an empty text (got {len(text) if isinstance(text, str) else text!r})")
    middle = len(text) // 2
    before, after = text.rfind("\n\n", 0, middle), text.find("\n\n", middle)
    candidates = [c for c in (before, after) if c > 0]
    cut = min(candidates, key=lambda c: abs(c - middle)) if candidates else middle
    calibration, held_out = text[:cut].strip(), text[cut:].strip()
    if not calibration or not held_out:
        raise ValueError(f"text of {len(text)} characters is too short to split into two parts")
    return calibration, held_out


# Largest text a user may upload or point a plan at: the dashboard's server.maxUploadSize (.streamlit/config.toml)
# is the same number, so the browser refuses a bigger file before it is sent. 50 MB is ~12M tokens of English,
# far above any calibration or evaluation length.
MAX_TEXT_MB = 50


def read_text_file(path: str | os.PathLike) -> str:
    """A user's UTF-8 text file; names the byte offset of the first invalid byte so it can be fixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    check_text_size(path.stat().st_size, str(path))
    return decode_text(path.read_bytes(), str(path))


def check_text_size(size: int, name: str) -> None:
    """Refuse a text over MAX_TEXT_MB before reading it (an upload or a file named by a plan)."""
    if size > MAX_TEXT_MB * 10**6:
        raise ValueError(f"text file {name} is {size / 1e6:.0f} MB, over the {MAX_TEXT_MB} MB limit for texts")


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text of `data`; ValueError naming the first invalid byte, a NUL byte (a binary file) or emptiness."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM is metadata, not text
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8: invalid byte 0x{data[exc.start]:02x} "
                         f"at byte offset {exc.start}") from None
    if "\x00" in text:
        raise ValueError(f"{name} looks binary, not text: NUL byte at character {text.index(chr(0))}")
    if not text.strip():
        raise ValueError(f"text file {name} is empty")
    return text


def save_user_text(data: bytes, name: str) -> Path:
    """Keep an uploaded text under SATEN_HOME/texts/ so a queued job (another process) can read it later.

    The file name carries a content hash, so the same upload is stored once and a plan naming it stays valid.
    Raises ValueError for content over MAX_TEXT_MB, non-UTF-8, binary or empty; nothing is kept then.
    """
    import hashlib

    from saten_core.files import atomic_write_text, saten_home

    check_text_size(len(data), name)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40] or "text"
    path = saten_home() / "texts" / f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}.txt"
    text = decode_text(data, name)
    if not path.is_file():
        atomic_write_text(path, text)
    return path
