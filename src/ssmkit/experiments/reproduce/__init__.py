"""Reproductions of the seed papers' claims at CPU scale, one command each (``ssmkit reproduce NAME``).

    ssmkit reproduce --list                                   # each reproduction, its runtime, its last result
    ssmkit reproduce selective-copy --quick --out /tmp/sc    # pipeline check (seconds)
    ssmkit reproduce selective-copy --seeds 3                # the full budget -> docs/reproductions/selective-copy.md

From Python::

    from ssmkit.experiments.reproduce import get_reproduction, run_reproduction
    summary = run_reproduction(get_reproduction("selective-copy"), "runs/reproduce/selective-copy", quick=True)

Adding a reproduction = adding one module to this package that defines ``REPRODUCTION``; the registry finds
it (:func:`registry.reproductions` imports every module here except the infrastructure ones)::

    from ssmkit.experiments.reproduce.registry import Budget, Reproduction, Setting

    def _settings(steps):
        return tuple(Setting(f"{m}", {"task": {"name": "listops", "max_length": 128},
                                      "model": {"preset": m}, "train": {"steps": steps, "lr": 1e-3}},
                             meta={"model": m}) for m in ("s4d", "attn"))

    REPRODUCTION = Reproduction(
        name="my-claim", title="one line", claim="what the paper says (markdown)",
        paper="| the paper's table | ... |",
        quick=lambda: Budget(_settings(3), seeds=1, minutes=0.1, note="pipeline check"),
        full=lambda: Budget(_settings(2000), seeds=3, minutes=60, note="where we shrank the paper's setting"),
        evaluate=None,   # optional: evaluate(model, setup, setting, quick) -> dict stored as record["extra"]
        run_one=None,    # optional: run_one(repro, setting, seed, run_dir, quick) -> record dict (multi-stage runs)
        report=None)     # optional: report(ctx, directory) -> markdown section (save plots into directory)

The runner (:mod:`.runner`) trains every (setting, seed) with the library's :class:`~ssmkit.train.Trainer` in
``OUT/<setting>/seed<k>``: finished runs (``record.json``) are skipped, unfinished ones resume exactly from
their checkpoint. A custom ``run_one`` returns at least ``{"metric", "value", "chance", "final", "extra",
"wall_s"}`` (see :func:`.runner.train_one`; :func:`.runner.train_sections` trains one stage resumably, e.g.
into ``run_dir / "pretrain"`` then ``run_dir / "finetune"``). Seeds are aggregated as mean ± sd; the report
(:mod:`.report`) writes ``NAME.md`` with the paper's claim and table beside ours, the reproduction's own
section and plots, the exact command, wall time and machine, and the hand-written observations of
``NAME.notes.md`` in the same directory when that file exists (so a regenerated page keeps them).
"""

from .registry import Budget, Reproduction, Setting, get_reproduction, reproductions
from .runner import run_reproduction, train_one, train_sections

__all__ = ["Budget", "Reproduction", "Setting", "get_reproduction", "reproductions", "run_reproduction",
           "train_one", "train_sections"]
