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


def _aged(path: Path, age_s: float, now: float) -> Path:
    path.mkdir(parents=True)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_prune_keeps_recent_and_current_and_deletes_old_digests(tmp_path):
    now = 1_000_000_000.0
    day = 24 * 3600.0
    current = _aged(tmp_path / ("c" * 16), 30 * day, now)  # current is kept whatever its age
    recent = [_aged(tmp_path / (f"{i:x}" * 16), (i + 1) * 60, now) for i in range(2)]
    fourth = _aged(tmp_path / ("a" * 16), 20 * day, now)  # 4th most recent sibling: keep=4 counts current too
    old = [_aged(tmp_path / (f"{i:x}" * 16), (21 + i) * day, now) for i in range(3, 6)]
    fresh = _aged(tmp_path / ("b" * 16), 2 * day, now)  # 3rd most recent sibling: kept
    other = _aged(tmp_path / "not-a-digest", 100 * day, now)
    foreign = _aged(tmp_path / ("ssmkit-" + "d" * 16), 100 * day, now)  # the other naming scheme: not ours here
    deleted = nc.prune_stale(current, keep=4, max_age_s=7 * day, now=now)
    assert sorted(deleted) == sorted(old + [fourth])
    for d in [current, *recent, fresh, other, foreign]:
        assert d.is_dir()
    for d in deleted:
        assert not d.exists()


def test_prune_without_siblings_is_a_no_op(tmp_path):
    assert nc.prune_stale(tmp_path / "missing" / ("e" * 16)) == []
    cur = tmp_path / ("e" * 16)
    cur.mkdir()
    assert nc.prune_stale(cur, now=0.0) == [] and cur.is_dir()


def test_prune_keeps_a_recent_folder_beyond_keep(tmp_path):
    now = 1_000_000_000.0
    cur = _aged(tmp_path / ("0" * 16), 0, now)
    young = [_aged(tmp_path / (f"{i:x}" * 16), i * 3600.0, now) for i in range(1, 6)]  # all within a week
    assert nc.prune_stale(cur, keep=2, now=now) == [] and all(d.is_dir() for d in young)
