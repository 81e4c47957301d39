"""Small text corpora shipped inside the package, so nothing is downloaded or read from outside the install.

``tinyshakespeare.txt``: Tiny Shakespeare, 1,115,394 characters (1,115,394 bytes, plain ASCII) of lines from
Shakespeare's plays, public domain. It is the character-level language-modelling corpus distributed with
Andrej Karpathy's char-rnn project as ``data/tinyshakespeare/input.txt``, unchanged.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["tiny_shakespeare_path"]


def tiny_shakespeare_path() -> Path:
    """Filesystem path of the bundled Tiny Shakespeare text (UTF-8, 1,115,394 characters).

    The package is installed as plain files (editable or wheel), so the resource is a real file on disk.
    """
    path = resources.files(__name__).joinpath("tinyshakespeare.txt")
    if not isinstance(path, Path) or not path.is_file():
        raise FileNotFoundError(f"tiny_shakespeare_path: bundled corpus missing at {path}; reinstall ssmkit")
    return path
