"""The configuration of the CPU-scale Birdie comparison (:mod:`ssmkit.experiments.birdie`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ssmkit._dataclass_dict import dataclass_from_dict, dataclass_to_dict

#: run name -> (mixture, model kind): "ssm" uses ``mixer`` (PrefixLM when the mixture is prefix-bidirectional,
#: else CausalLM); "transformer" is a causal attention model of the same width and depth
RUNS: dict[str, tuple[str, str]] = {
    "ntp": ("ntp", "ssm"),
    "ul2": ("ul2", "ssm"),
    "fixed": ("fixed", "ssm"),
    "birdie": ("birdie", "ssm"),
    "birdie-causal": ("birdie-causal", "ssm"),
    "transformer-ntp": ("ntp", "transformer"),
}

#: evaluation -> the config fields it depends on (a finished run re-evaluates when they change)
EVALS: dict[str, tuple[str, ...]] = {
    "infilling": ("infill_rows",),
    "phonebook": ("phonebook_entries", "phonebook_queries", "phonebook_steps", "phonebook_batch", "phonebook_lr",
                  "phonebook_examples", "phonebook_digits", "phonebook_name_parts"),
    "mqar": ("mqar_pairs", "mqar_steps", "mqar_batch", "mqar_lr", "mqar_examples", "mqar_keys", "mqar_layout",
             "mqar_query_fraction", "mqar_train_pairs"),
}

#: where the MQAR queries go (see BirdieConfig.mqar_layout)
MQAR_LAYOUTS = ("after", "interleaved", "aligned")


@dataclass(frozen=True)
class BirdieConfig:
    """Everything that defines the comparison; every run uses the same data, budget and model size.

    Args:
        text: UTF-8 text file to pretrain on (byte-level); the last ``val_fraction`` is held out.
        runs: which runs (keys of :data:`RUNS`).
        tokens: training token budget of every run (packed positions, padding included) -> ``steps``.
        seq_len, batch_size: packed row length and rows per step.
        prefix_layers: give the prefix-bidirectional mixtures (ul2, fixed, birdie) a PrefixLM (the paper's
            bidirectional prefix; needs a mixer with a prefix form); False trains them on a causal model.
        mixer, d_model, n_layers, mlp_ratio: the SSM (SwiGLU MLP after every mixer); the Transformer uses
            ``transformer_heads`` rotary attention heads with the same width, depth and MLP.
        lr, warmup_steps: AdamW peak learning rate (cosine to 10%) and warm-up (a run shorter than
            warmup_steps warms up over all its steps).
        length_scale: scales every objective's text lengths (paper lengths are for 2k-token rows).
        num_placeholders: infilling sentinels reserved in the vocabulary.
        controller_scale: multiplies the controller's step schedule (warm-up 250, evaluations at 10, 50, 250,
            ...) for short runs; ``explore_decay_steps`` is the length of the exploration decay (0.5 -> 0.2;
            None: the whole run). reward_hidden / reward_layers / reward_fit_steps size the reward model.
        val_rows: rows per arm in the controller's fixed validation set.
        eval_every: perplexity evaluations during training (steps). eval_rows: held-out rows per evaluation.
        infill_rows: rows of the infilling evaluation (15% masked, mean span 3).
        phonebook_entries, phonebook_queries: book size and the query counts evaluated.
        phonebook_steps, phonebook_batch, phonebook_lr: the fine-tune on phone books before the evaluation.
        phonebook_examples: evaluated books per query count.
        phonebook_digits, phonebook_name_parts: digits per number (10: the paper's ``XXX-XXX-XXXX``) and words
            per name (2: the paper's "First Last"; 1 makes books shorter).
        mqar_pairs, mqar_steps, mqar_batch, mqar_lr, mqar_examples: MQAR (every key queried) after a fine-tune
            on 2..max(mqar_pairs) pairs; accuracy per number of pairs. mqar_keys: distinct keys (and values;
            None: 130, half the byte vocabulary). mqar_layout: where the queries go; "after": all queried keys
            at the end of the input, their values as the label; "interleaved": ``q1 v1 q2 v2 ...`` as the label
            (each value right after its key and fed back); "aligned": the queries as the causal suffix, each
            scored on its value, which is not fed back (:mod:`~ssmkit.experiments.aligned_recall`; keys and
            values are letters, at most 26, None: 26; the one the attention control learns).
            mqar_query_fraction: share of the keys queried (below 1 removes answering by elimination in
            "interleaved"). mqar_train_pairs: the fine-tune's largest number of pairs (None: max(mqar_pairs));
            larger evaluated counts test generalisation.
        evals: which evaluations (keys of :data:`EVALS`) run after training.
        threads: torch threads per run (1, as train.threads: fast beside other work and bitwise reproducible).
    """

    text: str
    runs: tuple[str, ...] = tuple(RUNS)
    tokens: int = 1_500_000
    seq_len: int = 384
    batch_size: int = 16
    mixer: str = "gated"
    prefix_layers: bool = True
    d_model: int = 192
    n_layers: int = 4
    mlp_ratio: float = 2.0
    transformer_heads: int = 4
    lr: float = 2e-3
    warmup_steps: int = 20
    length_scale: float = 0.25
    num_placeholders: int = 64
    controller_scale: float = 0.0625
    explore_decay_steps: int | None = None
    reward_hidden: int = 64
    reward_layers: int = 2
    reward_fit_steps: int = 200
    val_rows: int = 2
    val_fraction: float = 0.05
    eval_every: int = 50
    eval_rows: int = 64
    infill_rows: int = 64
    phonebook_entries: int = 16
    phonebook_queries: tuple[int, ...] = (1, 2, 4, 8, 16)
    phonebook_steps: int = 100
    phonebook_batch: int = 8
    phonebook_lr: float = 1e-3
    phonebook_examples: int = 32
    phonebook_digits: int = 10
    phonebook_name_parts: int = 2
    mqar_pairs: tuple[int, ...] = (8, 16, 32, 64)
    mqar_steps: int = 150
    mqar_batch: int = 16
    mqar_lr: float = 1e-3
    mqar_examples: int = 64
    mqar_keys: int | None = None
    mqar_layout: str = "after"
    mqar_query_fraction: float = 1.0
    mqar_train_pairs: int | None = None
    seed: int = 0
    evals: tuple[str, ...] = tuple(EVALS)
    threads: int | None = 1

    def __post_init__(self) -> None:
        def fail(name: str, want: str) -> None:
            raise ValueError(f"BirdieConfig: {name} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.text, str) or not self.text:
            fail("text", "a path to a text file")
        if not isinstance(self.runs, tuple) or not self.runs or any(r not in RUNS for r in self.runs) or len(
                set(self.runs)) != len(self.runs):
            fail("runs", f"a non-empty tuple of distinct names from {list(RUNS)}")
        ints = {"tokens": 1, "seq_len": 16, "batch_size": 1, "d_model": 8, "n_layers": 1, "transformer_heads": 1,
                "warmup_steps": 0, "num_placeholders": 1, "reward_hidden": 1, "reward_layers": 1,
                "reward_fit_steps": 0, "val_rows": 1, "eval_every": 1, "eval_rows": 1, "infill_rows": 1,
                "phonebook_entries": 1, "phonebook_steps": 0, "phonebook_batch": 1, "phonebook_examples": 1,
                "phonebook_digits": 1, "phonebook_name_parts": 1,
                "mqar_steps": 0, "mqar_batch": 1, "mqar_examples": 1, "seed": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                fail(name, f"an int >= {lo}")
        for name in ("mlp_ratio", "lr", "length_scale", "controller_scale", "phonebook_lr", "mqar_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                fail(name, "a positive number")
        if not 0 < self.val_fraction < 1:
            fail("val_fraction", "in (0, 1)")
        q = self.phonebook_queries
        if (not isinstance(q, tuple) or not q or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in q)
                or max(q) > self.phonebook_entries):
            fail("phonebook_queries", f"a non-empty tuple of ints in [1, phonebook_entries={self.phonebook_entries}]")
        q = self.mqar_pairs
        if (not isinstance(q, tuple) or not q or any(isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 128
                                                     for k in q)):
            fail("mqar_pairs", "a non-empty tuple of ints in [2, 128] (keys are distinct byte ids below 128)")
        if not 1 <= self.phonebook_digits <= 10 or 10 ** self.phonebook_digits < self.phonebook_entries:
            fail("phonebook_digits", f"an int in [1, 10] with 10**digits >= phonebook_entries={self.phonebook_entries}")
        if self.phonebook_name_parts not in (1, 2):
            fail("phonebook_name_parts", "1 or 2")
        if (not isinstance(self.evals, tuple) or any(e not in EVALS for e in self.evals)
                or len(set(self.evals)) != len(self.evals)):
            fail("evals", f"a tuple of distinct names from {list(EVALS)}")
        if self.mqar_keys is not None and (isinstance(self.mqar_keys, bool) or not isinstance(self.mqar_keys, int)
                                           or not max(self.mqar_pairs) <= self.mqar_keys <= 128):
            fail("mqar_keys", f"None or an int in [max(mqar_pairs)={max(self.mqar_pairs)}, 128]")
        t = self.mqar_train_pairs
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 2 <= t <= max(self.mqar_pairs)):
            fail("mqar_train_pairs", f"None or an int in [2, max(mqar_pairs)={max(self.mqar_pairs)}]")
        if self.mqar_layout == "aligned" and max(self.mqar_keys or 26, *self.mqar_pairs) > 26:
            fail("mqar_keys", "None or at most 26 (the letters), with mqar_pairs at most 26, for "
                 "mqar_layout='aligned'")
        f = self.mqar_query_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            fail("mqar_query_fraction", "a number in (0, 1]")
        if self.mqar_layout not in MQAR_LAYOUTS:
            fail("mqar_layout", f"one of {', '.join(MQAR_LAYOUTS)}")
        from ssmkit.models.registry import PREFIXABLE

        if not isinstance(self.prefix_layers, bool):
            fail("prefix_layers", "a bool")
        if self.prefix_layers and self.mixer not in PREFIXABLE:
            fail("prefix_layers", f"False for mixer {self.mixer!r}, which has no prefix-bidirectional form (those "
                 f"with one: {', '.join(PREFIXABLE)})")
        if self.d_model % self.transformer_heads:
            fail("transformer_heads", f"a divisor of d_model={self.d_model}")
        if self.explore_decay_steps is not None and (isinstance(self.explore_decay_steps, bool) or not isinstance(
                self.explore_decay_steps, int) or self.explore_decay_steps < 1):
            fail("explore_decay_steps", "None or an int >= 1")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            fail("threads", "None or an int >= 1")

    @property
    def steps(self) -> int:
        """Optimizer steps of every run: the token budget over the tokens per step (rounded up)."""
        return -(-self.tokens // (self.batch_size * self.seq_len))

    def identity(self) -> dict[str, Any]:
        """The settings a run's training depends on (not which runs are requested, the thread count or the
        evaluation settings)."""
        d = self.to_dict()
        for k in ("runs", "threads", "evals", *(f for fs in EVALS.values() for f in fs)):
            del d[k]
        return d

    def eval_settings(self, name: str) -> dict[str, Any]:
        """The settings evaluation ``name`` (a key of :data:`EVALS`) depends on."""
        d = self.to_dict()
        return {k: d[k] for k in EVALS[name]}

    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BirdieConfig:
        return dataclass_from_dict(cls, d)


#: a tiny configuration for smoke tests (a few minutes for all runs on 2 cores)
QUICK: dict[str, Any] = {
    "tokens": 60 * 4 * 128, "seq_len": 128, "batch_size": 4, "d_model": 32, "n_layers": 2, "eval_every": 30,
    "eval_rows": 8, "infill_rows": 8, "length_scale": 0.1, "controller_scale": 0.02, "reward_hidden": 16,
    "reward_fit_steps": 10, "val_rows": 1, "phonebook_entries": 4, "phonebook_queries": (1, 2, 4),
    "phonebook_steps": 4, "phonebook_batch": 2, "phonebook_examples": 4, "mqar_pairs": (4, 8), "mqar_steps": 4,
    "mqar_batch": 4, "mqar_examples": 8,
}
