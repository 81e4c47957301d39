"""Run configuration: ``task``, ``model`` and ``train`` sections from a YAML/JSON file and ``--set``.

File layout (YAML or JSON)::

    task:  {name: mqar, vocab_size: 128, seq_len: 64, num_pairs: 8}    # name + the task's parameters
    model: {preset: mamba, d_model: 128, mixer_options: {mamba: {d_state: 8}}}
    train: {steps: 2000, lr: 3.0e-3, batch_size: 32}

``model`` holds a ``preset`` (see :mod:`ssmkit.train.presets`; or a block pattern such as "mamba2*2,attn"), an
optional ``head`` and any :class:`~ssmkit.models.ModelConfig` field except the sizes the task decides
(vocab_size, d_input, num_classes, d_output). ``train`` holds :class:`TrainConfig` fields.

Overrides (``--set key=value``): dotted keys ``task.seq_len=128``, ``model.d_model=96``, ``train.lr=1e-3``,
``model.mixer_options.mamba.d_state=8``; a bare key (``lr=1e-3``) is accepted when exactly one section has it.
Values are parsed by the field's type (task parameters by the task's own parser); an unknown key raises
ValueError listing the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._annotations import NO_MATCH, allowed_types, match_type, type_name

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "float64")
AUTOCASTS = ("none", "bf16")
#: self-pretraining objectives (train.pretrain), see :mod:`ssmkit.train.pretrain`
PRETRAIN_OBJECTIVES = ("none", "ar", "denoise")
SECTIONS = ("task", "model", "train")
#: warm-up length when train.warmup_steps is not given (capped at train.steps)
DEFAULT_WARMUP_STEPS = 100
#: model-section keys that are not ModelConfig fields
MODEL_EXTRA_KEYS = ("preset", "head")
#: ModelConfig fields the task decides
TASK_SIZED_FIELDS = ("vocab_size", "d_input", "num_classes", "d_output")


def _fail(name: str, msg: str) -> ValueError:
    return ValueError(f"train.{name} {msg}")


@dataclass
class TrainConfig:
    """How to train. Validated on construction; every error names the field.

    Args:
        steps: optimizer steps in the whole run.
        batch_size: examples per optimizer step (split into ``grad_accum`` micro-batches).
        grad_accum: micro-batches per step; must divide ``batch_size``.
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine/linear schedules).
        warmup_steps: linear warm-up from lr/warmup_steps to lr, at most ``steps`` (equal: the peak lr is
            reached at the last step). None (the default): min(100, steps), see :attr:`warmup`.
        schedule: "cosine" | "linear" | "constant" after the warm-up.
        weight_decay: AdamW decoupled weight decay on matrices (never on norms, biases and SSM dynamics).
        beta1, beta2, eps: AdamW moments.
        grad_clip: clip the global gradient norm to this (0 = no clipping).
        seed: seeds model init, dropout and the training data.
        fresh_data: generated tasks draw new training examples every epoch (else one fixed set is revisited).
        eval_every: evaluate on the validation split every this many steps (0 = only at the end).
        eval_batches: evaluate on at most this many batches (0 = the whole split).
        eval_batch_size: batch size of evaluation (None = batch_size).
        log_every: append a training record to metrics.jsonl every this many steps.
        save_every: checkpoint every this many steps (0 = only at the end and on interruption).
        keep_checkpoints: how many step checkpoints to keep (the newest).
        dtype: parameter dtype, "float32" | "float64".
        autocast: "none" | "bf16" (``torch.autocast`` to bfloat16: projections in bf16, SSM cores in float32;
            parameters stay in ``dtype``).
        activation_checkpointing: recompute each block's activations in the backward pass.
        chunk_len: train long sequences in chunks of this length, passing state (exact gradients); None = off.
        sequence_parallel: split every sequence into this many contiguous shards on as many ranks of a
            torchrun job (exact; world size = data-parallel size x sequence_parallel); 1 = off.
        threads: torch intra-op threads (None = leave torch's setting as is). Default 1: on a machine where other
            processes are busy, threads that wait for each other at every parallel region collapse (2 threads beside
            one busy process trained 2-10x slower than 1), and PyTorch's CPU results depend on its thread count in
            the last bits, so a fixed default keeps a seed's training bitwise reproducible.
        plots: write loss.png and metric.png (at checkpoints and at the end).
        pretrain: self-pretraining on the task's own training inputs before the task ("Never Train from
            Scratch", Amos et al. 2023): "none", "ar" (next-input prediction; causal models only) or "denoise"
            (reconstruct corrupted inputs; any model). See :mod:`ssmkit.train.pretrain`.
        pretrain_steps: optimizer steps of self-pretraining, run before the ``steps`` task steps (the run has
            :attr:`total_steps` = pretrain_steps + steps); 0 with pretrain="none", >= 1 otherwise.
        pretrain_mask_rate: share of input positions corrupted by pretrain="denoise", in (0, 1).
    """

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    fresh_data: bool = True
    eval_every: int = 200
    eval_batches: int = 0
    eval_batch_size: int | None = None
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    dtype: str = "float32"
    autocast: str = "none"
    activation_checkpointing: bool = False
    chunk_len: int | None = None
    sequence_parallel: int = 1
    threads: int | None = 1
    plots: bool = True
    pretrain: str = "none"
    pretrain_steps: int = 0
    pretrain_mask_rate: float = 0.15

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce_value(f"train.{f.name}", getattr(self, f.name), hints[f.name]))
        for name, lo in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("sequence_parallel", 1), ("seed", 0),
                         ("eval_every", 0), ("eval_batches", 0), ("log_every", 1), ("save_every", 0),
                         ("keep_checkpoints", 1), ("pretrain_steps", 0)):
            if getattr(self, name) < lo:
                raise _fail(name, f"must be an int >= {lo}, got {getattr(self, name)}")
        for name in ("eval_batch_size", "chunk_len", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise _fail(name, f"must be None or an int >= 1, got {v}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} is invalid: must be None or an int in [0, "
                             f"steps={self.steps}] (more than steps never reaches the peak lr; None = min(100, steps))")
        if self.batch_size % self.grad_accum:
            raise _fail("grad_accum", f"={self.grad_accum} must divide batch_size={self.batch_size} (each "
                                      f"micro-batch holds batch_size / grad_accum examples)")
        for name, lo, hi, lo_open, hi_open in (("lr", 0.0, math.inf, True, True),
                                               ("min_lr_ratio", 0.0, 1.0, False, False),
                                               ("weight_decay", 0.0, math.inf, False, True),
                                               ("beta1", 0.0, 1.0, False, True),
                                               ("beta2", 0.0, 1.0, False, True),
                                               ("eps", 0.0, math.inf, True, True),
                                               ("grad_clip", 0.0, math.inf, False, True)):
            v = getattr(self, name)
            ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise _fail(name, f"must be a number in {interval}, got {v!r}")
        for name, choices in (("schedule", SCHEDULES), ("dtype", DTYPES), ("autocast", AUTOCASTS),
                              ("pretrain", PRETRAIN_OBJECTIVES)):
            if getattr(self, name) not in choices:
                expected = ", ".join(map(repr, choices))
                raise _fail(name, f"got {getattr(self, name)!r}; expected one of {expected}")
        if self.autocast == "bf16" and self.dtype != "float32":
            raise _fail("autocast", f"='bf16' needs dtype='float32', got dtype={self.dtype!r}")
        self._check_pretrain()

    def _check_pretrain(self) -> None:
        if not 0.0 < self.pretrain_mask_rate < 1.0:
            raise _fail("pretrain_mask_rate", f"must be a number in (0, 1), got {self.pretrain_mask_rate!r}")
        if self.pretrain == "none":
            if self.pretrain_steps != 0:
                raise _fail("pretrain_steps", f"={self.pretrain_steps} needs train.pretrain='ar' or 'denoise' "
                                              f"(pretrain is 'none')")
            return
        if self.pretrain_steps < 1:
            raise _fail("pretrain_steps", f"must be an int >= 1 with pretrain={self.pretrain!r}, "
                                          f"got {self.pretrain_steps}")
        for name, off in (("chunk_len", None), ("sequence_parallel", 1)):
            if getattr(self, name) != off:
                raise _fail("pretrain", f"={self.pretrain!r} cannot be combined with {name}="
                                        f"{getattr(self, name)} (self-pretraining runs whole sequences)")

    @property
    def warmup(self) -> int:
        """Warm-up steps in effect: ``warmup_steps``, or min(100, steps) when it is None."""
        return min(DEFAULT_WARMUP_STEPS, self.steps) if self.warmup_steps is None else self.warmup_steps

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: pretrain_steps of self-pretraining, then steps on the task."""
        return self.pretrain_steps + self.steps

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"train section must be a mapping, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ValueError(f"train: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                             f"{', '.join(valid)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------- values
def coerce_value(name: str, value: Any, annotation: Any) -> Any:
    """Check a Python value against a simple annotation (int, float, bool, str, X | None); strings from the
    command line are parsed. ints are accepted for floats; nothing else is converted."""
    base, optional = allowed_types(annotation)
    if isinstance(value, str) and str not in base:
        value = parse_literal(value)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {type_name(annotation)}, got None")
    out = match_type(value, annotation)
    if out is NO_MATCH:
        raise ValueError(f"{name} must be {type_name(annotation)}, got {type(value).__name__} {value!r}")
    return out


def parse_literal(text: str) -> Any:
    """A command-line value: JSON/YAML-style literals (numbers, true/false, null/none, [lists], {maps});
    anything else stays a string."""
    s = text.strip()
    low = s.lower()
    if low in ("none", "null", "~"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    try:
        return int(s)
    except ValueError:
        pass
    try:
        v = float(s)  # "1e-3", "inf" (json.loads rejects these)
        return v
    except ValueError:
        pass
    if s[:1] in "[{":
        try:
            import yaml

            return yaml.safe_load(s)
        except Exception:  # noqa: BLE001 - not YAML either: keep the text
            pass
    return text


# ------------------------------------------------------------------------------------------- files
def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON config file into {"task": {...}, "model": {...}, "train": {...}}."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"config file {str(p)!r} is YAML but PyYAML is not installed (pip install "
                             f"pyyaml); or write the config as JSON") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(p)!r}: invalid YAML: {e}") from e
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {str(p)!r}: invalid JSON: {e}") from e
    else:
        raise ValueError(f"config file {str(p)!r}: unknown extension {p.suffix!r}; expected .yaml, .yml or "
                         f".json")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r}: expected a mapping with sections {', '.join(SECTIONS)}, "
                         f"got {type(data).__name__}")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ValueError(f"config file {str(p)!r}: unknown section(s) {', '.join(map(repr, unknown))}; valid "
                         f"sections: {', '.join(SECTIONS)}")
    for k, v in data.items():
        if not isinstance(v, dict):
            raise ValueError(f"config file {str(p)!r}: section {k!r} must be a mapping, got "
                             f"{type(v).__name__}")
    return {k: dict(data.get(k) or {}) for k in SECTIONS}


def dump_yaml(data: dict[str, Any]) -> str | None:
    """YAML text of a config (None when PyYAML is not installed)."""
    try:
        import yaml
    except ImportError:
        return None
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------------- overrides
def _model_keys() -> list[str]:
    from ..models import ModelConfig

    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in TASK_SIZED_FIELDS]
    return [*MODEL_EXTRA_KEYS, *fields]


def _task_keys(task_name: str | None) -> list[str]:
    if task_name is None:
        return ["name"]
    from ..data import get_task_class

    cls = get_task_class(task_name)
    common = set(getattr(cls.Params, "common_fields", ()))
    names = sorted((f.name for f in dataclasses.fields(cls.Params)), key=lambda n: n in common)
    return ["name", *names]


def valid_keys(sections: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The keys each section accepts (task keys depend on the task name)."""
    return {"task": _task_keys(sections["task"].get("name")), "model": _model_keys(),
            "train": [f.name for f in dataclasses.fields(TrainConfig)]}


def _format_valid(keys: dict[str, list[str]]) -> str:
    return "; ".join(f"{s}.{{{', '.join(k)}}}" for s, k in keys.items())


def parse_override(item: str) -> tuple[str, str]:
    """"key=value" -> (key, value text)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected key=value (e.g. train.lr=1e-3 or model.d_model=128)")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--set {item!r}: empty key")
    return key, value


def apply_overrides(sections: dict[str, dict[str, Any]], items: list[str]) -> dict[str, dict[str, Any]]:
    """Apply ``--set key=value`` items to the raw sections (a new dict). ``task.name`` is applied first, so
    task parameters are parsed by the right task. Unknown keys raise ValueError listing the valid ones."""
    out = {k: dict(sections.get(k) or {}) for k in SECTIONS}
    parsed = [parse_override(item) for item in items]
    # a task name given by --set decides how the task's other keys parse
    parsed.sort(key=lambda kv: kv[0] not in ("task.name",))
    for key, text in parsed:
        keys = valid_keys(out)
        parts = key.split(".")
        if parts[0] in SECTIONS:
            section, rest = parts[0], parts[1:]
            if not rest:
                raise ValueError(f"--set {key}={text}: missing the key after {section!r}; valid keys: "
                                 f"{_format_valid({section: keys[section]})}")
        else:
            owners = [s for s in SECTIONS if parts[0] in keys[s]]
            if len(owners) != 1:
                what = "is ambiguous (in sections " + ", ".join(owners) + ")" if owners else "is unknown"
                raise ValueError(f"--set {key}={text}: key {parts[0]!r} {what}; use section.key; valid keys: "
                                 f"{_format_valid(keys)}")
            section, rest = owners[0], parts
        name = rest[0]
        if name not in keys[section]:
            raise ValueError(f"--set {key}={text}: unknown {section} key {name!r}; valid {section} keys: "
                             f"{', '.join(keys[section])}")
        target = out[section]
        if section == "task":
            if len(rest) > 1:
                raise ValueError(f"--set {key}={text}: task parameters are not nested")
            if name == "name":
                target["name"] = text.strip()
            else:
                from ..data import parse_task_params

                target.update(parse_task_params(target["name"], {name: text}))
        elif section == "train":
            if len(rest) > 1:
                raise ValueError(f"--set {key}={text}: train keys are not nested")
            hints = typing.get_type_hints(TrainConfig)
            target[name] = coerce_value(f"train.{name}", text, hints[name])
        else:
            _set_model_key(target, rest, text, key)
    return out


def _set_model_key(target: dict[str, Any], rest: list[str], text: str, key: str) -> None:
    name = rest[0]
    if name == "mixer_options" and len(rest) > 1:
        if len(rest) != 3:
            raise ValueError(f"--set {key}={text}: expected model.mixer_options.<mixer>.<option>=value")
        opts = {m: dict(o) for m, o in (target.get("mixer_options") or {}).items()}
        opts.setdefault(rest[1], {})[rest[2]] = parse_literal(text)
        target["mixer_options"] = opts
        return
    if len(rest) > 1:
        raise ValueError(f"--set {key}={text}: model.{name} is not nested (only "
                         f"model.mixer_options.<mixer>.<opt>)")
    if name in ("preset", "head", "norm", "mlp", "pooling"):
        target[name] = None if text.strip().lower() in ("none", "null") and name == "head" else text.strip()
    elif name == "pattern":
        target[name] = text.strip()
    else:
        target[name] = parse_literal(text)
