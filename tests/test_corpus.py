"""Bundled corpus, its calibration / held-out split and user text files.

Run: .venv/bin/python -m pytest -q tests/test_corpus.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saten_core import corpus
from saten_core.corpus import read_text_file


def test_default_text_is_deterministic_and_large():
    a, b = corpus.default_text(), corpus.default_text()
    assert a == b
    assert len(a) > 100_000


def test_split_is_disjoint_fixed_and_covers_text():
    text = corpus.default_text()
    cal, held = corpus.split_text(text)
    assert (cal, held) == corpus.split_text(text)
    assert cal and held
    cut = text.index(held)
    assert text[:cut].strip() == cal  # calibration is exactly what precedes the held-out part
    assert held not in cal and cal not in held
    assert 0.4 < len(cal) / len(text) < 0.6


def test_split_cuts_at_paragraph_boundary():
    text = "alpha one\n\nbeta two\n\ngamma three\n\ndelta four"
    cal, held = corpus.split_text(text)
    assert cal + "\n\n" + held == text


@pytest.mark.parametrize("text", ["", "   \n\n  "])
def test_split_rejects_empty(text: str):
    with pytest.raises(ValueError):
        corpus.split_text(text)


def test_read_text_file_roundtrip(tmp_path: Path):
    f = tmp_path / "t.txt"
    f.write_bytes("\ufeffhéllo world".encode())
    assert corpus.read_text_file(f) == "héllo world"


def test_read_text_file_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        corpus.read_text_file(tmp_path / "nope.txt")


def test_read_text_file_non_utf8_names_offset(tmp_path: Path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match="byte offset 3"):
        corpus.read_text_file(f)


def test_read_text_file_empty(tmp_path: Path):
    f = tmp_path / "empty.txt"
    f.write_text(" \n\t")
    with pytest.raises(ValueError, match="empty"):
        corpus.read_text_file(f)


def test_save_user_text_keeps_one_copy_under_saten_home(tmp_path: Path, monkeypatch):
    from saten_core.corpus import save_user_text

    monkeypatch.setenv("SATEN_HOME", str(tmp_path))
    first = save_user_text("\ufeffsome calibration text\n".encode(), "my notes.txt")
    assert first.parent == tmp_path / "texts" and first.name.startswith("my_notes-")
    assert read_text_file(first) == "some calibration text\n"
    assert save_user_text(b"some calibration text\n", "other.txt").read_text() == first.read_text()
    assert save_user_text("\ufeffsome calibration text\n".encode(), "my notes.txt") == first


@pytest.mark.parametrize(("data", "message"), [(b"ok \xff", "not UTF-8: invalid byte 0xff at byte offset 3"),
                                               (b"  \n", "is empty")])
def test_save_user_text_rejects_bad_uploads(tmp_path: Path, monkeypatch, data: bytes, message: str):
    from saten_core.corpus import save_user_text

    monkeypatch.setenv("SATEN_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        save_user_text(data, "bad.txt")
    assert not (tmp_path / "texts").exists()
