"""numba's kernel cache is keyed by the sources of every jitted file (ssmkit.ops._numba_cache)."""

import os
import subprocess
import sys
from pathlib import Path

import numba

from ssmkit.ops import _numba_cache as nc


def test_cache_dir_is_keyed_by_the_current_sources():
    sources = nc.jitted_sources()
    names = {p.name for p in sources}
    assert {"_numba_decode.py", "_numba_q8.py", "_numba_atomics.py", "_numba_spec.py", "_numba_spec_stages.py",
            "short_conv.py"} <= names
    digest = nc.source_digest(sources)
    assert Path(numba.config.CACHE_DIR) == nc.cache_dir(digest) == nc.CACHE_DIR
    assert digest in numba.config.CACHE_DIR


def test_digest_changes_with_any_file_and_its_name(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    d0 = nc.source_digest([a, b], tmp_path)
    b.write_text("y = 3\n")  # only the callee's file changes: the key must change too
    d1 = nc.source_digest([a, b], tmp_path)
    c = tmp_path / "c.py"
    b.rename(c)
    d2 = nc.source_digest([a, c], tmp_path)
    assert len({d0, d1, d2}) == 3


def test_editing_only_a_callee_file_moves_the_cache(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "ops" / "kernel.py").write_text("import numba as nb\nfrom .helper import f\n")
    (pkg / "ops" / "helper.py").write_text("from numba.extending import intrinsic\nf = 1\n")
    (pkg / "ops" / "plain.py").write_text("x = 1\n")
    before = nc.source_digest(nc.jitted_sources(pkg), pkg)
    assert [p.name for p in nc.jitted_sources(pkg)] == ["helper.py", "kernel.py"]
    (pkg / "ops" / "plain.py").write_text("x = 2\n")  # no jitted code: the cache stays
    assert nc.source_digest(nc.jitted_sources(pkg), pkg) == before
    (pkg / "ops" / "helper.py").write_text("from numba.extending import intrinsic\nf = 2\n")
    assert nc.source_digest(nc.jitted_sources(pkg), pkg) != before


def test_user_cache_dir_is_the_base(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "import numba, ssmkit.ops; print(numba.config.CACHE_DIR)"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert Path(out).parent == tmp_path and Path(out).name.startswith("ssmkit-")
