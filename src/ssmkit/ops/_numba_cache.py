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

Each change of the sources leaves the previous digest's folder behind. :func:`prune_stale` deletes sibling
folders that are neither among the few most recently used nor used within a week; the current folder's
modification time is refreshed at every import, so a folder in use is never the oldest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
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


_DIGEST_DIR = re.compile(r"(ssmkit-)?[0-9a-f]{16}")
KEEP_RECENT = 4  # digest folders always kept, most recently used first
MAX_AGE_S = 7 * 24 * 3600.0  # older folders beyond those are deleted


def prune_stale(current: Path, keep: int = KEEP_RECENT, max_age_s: float = MAX_AGE_S,
                now: float | None = None) -> list[Path]:
    """Delete sibling digest folders of ``current`` (same naming as :func:`cache_dir`) that are not among the
    ``keep`` most recently modified and were last modified more than ``max_age_s`` seconds before ``now``.
    ``current`` is never deleted; other names in the base folder are left alone. Returns the deleted folders.
    Errors (a folder removed by another process, no permission) are ignored: pruning is housekeeping."""
    base = current.parent
    if not base.is_dir():
        return []
    now = time.time() if now is None else now
    prefix = "ssmkit-" if current.name.startswith("ssmkit-") else ""
    dirs = []
    for d in base.iterdir():
        m = _DIGEST_DIR.fullmatch(d.name)
        if m and (m.group(1) or "") == prefix and d.is_dir() and d != current:
            try:
                dirs.append((d.stat().st_mtime, d))
            except OSError:
                continue
    dirs.sort(reverse=True)
    stale = [d for mtime, d in dirs[max(keep - 1, 0):] if now - mtime > max_age_s]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def key_cache_by_sources() -> Path:
    """Set ``numba.config.CACHE_DIR`` to :func:`cache_dir` of the current sources, mark it used and prune stale
    siblings (:func:`prune_stale`); returns it. If the directory cannot be created, numba falls back to its own
    locations (next to each source file or the user's cache)."""
    path = cache_dir(source_digest(jitted_sources()))
    numba.config.CACHE_DIR = str(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.utime(path)
    except OSError:
        return path
    prune_stale(path)
    return path


CACHE_DIR = key_cache_by_sources()
