"""A seed gives bitwise-identical training whatever the state of numba's on-disk cache: one run compiles every kernel
into an empty NUMBA_CACHE_DIR, the next loads them from it, and both must produce the same losses and weights.
(Kernels built with reordering fast-math flags once gave different last bits when loaded from the cache, and
the demo's accuracy changed between the first run of a fresh clone and later runs.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from ssmkit.ops import _numba_kernels as K
    from ssmkit.train import Trainer, resolve_run

    cfg = resolve_run({
        "task": {"name": "selective_copy", "vocab_size": 10, "seq_len": 24, "num_tokens": 4, "num_train": 256},
        "model": {"preset": "mamba", "d_model": 32, "n_layers": 2},
        "train": {"steps": 6, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "save_every": 0,
                  "threads": int(sys.argv[2]), "log_every": 1, "seed": 7}})
    trainer = Trainer(cfg, sys.argv[1])
    losses = []
    step = trainer.train_step
    trainer.train_step = lambda batch: losses.append(step(batch)) or losses[-1]
    trainer.train()
    digest = hashlib.sha256()
    for name, value in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode() + value.numpy().tobytes())
    loaded = sum(sum(f.stats.cache_hits.values()) for f in (K.selective_fwd, K.selective_bwd))
    print(json.dumps({"losses": [x.hex() for x, _ in losses], "weights": digest.hexdigest(), "loaded": loaded}))
""")


def _train(tmp_path, name: str, cache_dir, threads: int = 1) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / name), str(threads)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_and_cached_kernels_train_bitwise_alike(tmp_path):
    cache = tmp_path / "numba-cache"
    fresh = _train(tmp_path, "fresh", cache)  # compiles every kernel (the cache directory is empty)
    assert fresh["loaded"] == 0 and any(cache.rglob("*.nbi"))
    warm = _train(tmp_path, "warm", cache)  # loads them from the cache
    assert warm["loaded"] > 0
    assert warm["losses"] == fresh["losses"]
    assert warm["weights"] == fresh["weights"]
