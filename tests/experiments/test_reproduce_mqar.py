"""MQAR reproduction: the Mamba-3 rows (issue 17) run two Mamba-3 layers at Mamba-2's preset d_state and headdim,
in the full grid, the small setting and --quick, and their state is counted from the model."""

from __future__ import annotations

from ssmkit.experiments.reproduce.mqar import TRAIN, full, quick, setting, state_size
from ssmkit.train import resolve_run


def test_mamba3_runs_two_layers_at_mamba2s_state_size():
    m2 = resolve_run(dict(setting("mamba2", 64, "L64-kv8", TRAIN).sections)).model.config
    m3 = resolve_run(dict(setting("mamba3", 64, "L64-kv8", TRAIN).sections)).model.config
    assert m3.n_layers == m2.n_layers == 2 and m3.d_model == m2.d_model == 64
    assert m3.mixer_options["mamba3"] == {k: m2.mixer_options["mamba2"][k] for k in ("d_state", "headdim")}
    # a d_state override keeps the headdim
    n8 = resolve_run(dict(setting("mamba3", 64, "L64-kv8", TRAIN, d_state=8).sections)).model.config
    assert n8.mixer_options["mamba3"] == {"d_state": 8, "headdim": 16}


def test_mamba3_state_is_counted_per_layer():
    setup = resolve_run({"task": {"name": "mqar", "vocab_size": 64, "seq_len": 32, "num_pairs": 4},
                         "model": dict(setting("mamba3", 16, "L32-kv4", TRAIN).sections["model"])})
    # d_inner 32 = 2 heads of 16; per head: angles (half of d_state 32 rotated, in pairs: 8), the state 16 x 32,
    # the last rotated key (32) and the last input (16)
    assert state_size(setup.build_model(), 32) == 2 * 2 * (8 + 16 * 32 + 32 + 16)


def test_mamba3_is_in_every_part_of_the_budget():
    names = [s.name for s in full().settings]
    assert len(names) == len(set(names)) == 30
    assert {n for n in names if n.startswith("mamba3-")} == {"mamba3-w64-L64-kv8", "mamba3-w128-L64-kv8",
                                                               "mamba3-w128-L32-kv4"}
    assert "mamba3-w16-L16-kv2" in [s.name for s in quick().settings]
