"""The bundled corpora: present in the installed package, the expected size, valid UTF-8."""

from __future__ import annotations

from pathlib import Path

import ssmkit
from ssmkit.data.corpora import tiny_shakespeare_path


def test_tiny_shakespeare_is_bundled_inside_the_package():
    path = tiny_shakespeare_path()
    assert isinstance(path, Path) and path.is_file()
    assert Path(ssmkit.__file__).resolve().parent in path.resolve().parents


def test_tiny_shakespeare_size_and_encoding():
    text = tiny_shakespeare_path().read_text(encoding="utf-8")
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert text.isascii()
