"""Where Saten Studio keeps its files (SATEN_HOME) and how it writes them atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def saten_home() -> Path:
    """Root folder for caches, jobs and results: $SATEN_HOME, default ~/.cache/saten-studio."""
    home = Path(os.environ.get("SATEN_HOME", Path.home() / ".cache" / "saten-studio")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def shared_studio() -> bool:
    """True when this studio serves several people (SATEN_SHARED=1): jobs may then read texts only from
    allowed_text_dirs(), never any path a plan names (a plan is user input, the worker reads with our rights)."""
    return os.environ.get("SATEN_SHARED", "").strip().lower() in ("1", "true", "yes")


def allowed_text_dirs() -> list[Path]:
    """Folders a shared studio's jobs may read calibration texts from: the uploads (SATEN_HOME/texts) and any
    folders listed in SATEN_TEXT_DIRS (os.pathsep-separated)."""
    extra = [Path(p).expanduser().resolve() for p in os.environ.get("SATEN_TEXT_DIRS", "").split(os.pathsep) if p]
    return [(saten_home() / "texts").resolve(), *extra]


def check_text_path(path: str) -> None:
    """ValueError naming the path when a shared studio may not read it (see shared_studio); else nothing."""
    if not shared_studio():
        return
    resolved = Path(path).expanduser().resolve()  # symlinks and .. resolved before the check
    allowed = allowed_text_dirs()
    if not any(resolved.is_relative_to(d) for d in allowed):
        raise ValueError(f"calibration text {path} is outside the folders this shared studio reads texts from "
                         f"({', '.join(map(str, allowed))}): upload it instead")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text flavour of atomic_write_bytes (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp sibling folder; rename it to `path` only if the block succeeds.

    On any exception the temp folder is removed, so a failed run never leaves a half-written DIR.
    """
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise ValueError(f"output folder already exists and is not empty: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
