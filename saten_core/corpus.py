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


def read_text_file(path: str | os.PathLike) -> str:
    """A user's UTF-8 text file; names the byte offset of the first invalid byte so it can be fixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM is metadata, not text
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8: invalid byte 0x{data[exc.start]:02x} "
                         f"at byte offset {exc.start}") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def save_user_text(data: bytes, name: str) -> Path:
    """Keep an uploaded text under SATEN_HOME/texts/ so a queued job (another process) can read it later.

    The file name carries a content hash, so the same upload is stored once and a plan naming it stays valid.
    Raises ValueError (via read_text_file) for non-UTF-8 or empty content; nothing is kept then.
    """
    import hashlib

    from saten_core.files import atomic_write_text, saten_home

    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:40] or "text"
    path = saten_home() / "texts" / f"{stem}-{hashlib.sha256(data).hexdigest()[:12]}.txt"
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8: invalid byte 0x{data[exc.start]:02x} at byte offset {exc.start}") \
            from None
    if not text.strip():
        raise ValueError(f"text file {name} is empty")
    if not path.is_file():
        atomic_write_text(path, text)
    return path
