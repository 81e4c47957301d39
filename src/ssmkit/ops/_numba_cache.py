"""Key numba's on-disk kernel cache by the sources of every jitted file, so an edited kernel is never served stale.

numba's ``cache=True`` checks only the timestamp of the file that defines a kernel. A kernel that calls jitted
functions from another file (``_numba_decode`` calls ``_numba_q8``, ``infer._numba_spec`` calls
``_numba_spec_stages`` and ``_numba_decode``) keeps its cached machine code when only that other file changes,
e.g. after a ``git pull`` that touched one file. Importing :mod:`ssmkit.ops` therefore points
``numba.config.CACHE_DIR`` at a directory named by a digest of all of ssmkit's files that hold jitted code: any
change to any of them starts a fresh cache. The base directory is ``$NUMBA_CACHE_DIR`` when the user set it, else
the package's own ``__pycache__/numba``. This must run before the first ``njit(cache=True)`` is decorated, so
:mod:`ssmkit.ops` imports this module first (every jitted module imports :mod:`ssmkit.ops` before it defines a
kernel).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numba

PACKAGE = Path(__file__).resolve().parent.parent  # src/ssmkit
JIT_MARK = "numba"  # a file whose text names numba may hold jitted code (njit, @intrinsic, @overload)


def jitted_sources(package: Path = PACKAGE) -> list[Path]:
    """Every ``.py`` file below ``package`` whose text contains :data:`JIT_MARK`, sorted."""
    return sorted(p for p in package.rglob("*.py") if JIT_MARK in p.read_text(encoding="utf-8"))


def source_digest(paths: Iterable[Path], root: Path = PACKAGE) -> str:
    """sha256 (first 16 hex digits) over each file's path relative to ``root`` and its bytes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root)).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_dir(digest: str) -> Path:
    """``$NUMBA_CACHE_DIR/ssmkit-<digest>`` when the user set that variable, else
    ``<package>/__pycache__/numba/<digest>``."""
    base = os.environ.get("NUMBA_CACHE_DIR")
    return Path(base) / f"ssmkit-{digest}" if base else PACKAGE / "__pycache__" / "numba" / digest


def key_cache_by_sources() -> Path:
    """Set ``numba.config.CACHE_DIR`` to :func:`cache_dir` of the current sources; returns it. If the directory
    cannot be created, numba falls back to its own locations (next to each source file or the user's cache)."""
    path = cache_dir(source_digest(jitted_sources()))
    numba.config.CACHE_DIR = str(path)
    return path


CACHE_DIR = key_cache_by_sources()
