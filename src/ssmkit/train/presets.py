"""Model presets for ``--model`` and the task-to-model glue: which head a task needs and how its sizes fill in
the :class:`~ssmkit.models.ModelConfig`.

Presets are small, CPU-sized defaults; every field can be overridden (``--set model.d_model=128``).
``--model`` also accepts a block pattern ("mamba2*2,attn") or a mixer name, built with the defaults of
:data:`BASE`.

Heads by task kind: "lm" -> CausalLM (or PrefixLM with ``model.head=PrefixLM``); "classification" ->
SequenceClassifier; "forecast" -> Regressor with ``d_output = horizon * d``: the output at the last context
position is the whole forecast, reshaped to (batch, horizon, d) (direct multi-horizon forecasting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..models import ModelConfig, parse_pattern
from ..models.registry import MIXERS
from .config import MODEL_EXTRA_KEYS, TASK_SIZED_FIELDS

#: defaults shared by every preset (and by a bare pattern given to --model)
BASE: dict[str, Any] = {"d_model": 64, "norm": "rmsnorm"}

#: name -> (one-line description, ModelConfig fields on top of BASE)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mamba": ("Mamba (S6), 2 layers", {"pattern": "mamba*2"}),
    "mamba2": ("Mamba-2 (SSD), 2 layers", {"pattern": "mamba2*2",
                                          "mixer_options": {"mamba2": {"d_state": 32, "headdim": 16}}}),
    "mamba-m2blk": ("Mamba (S6) with Mamba-2's gated RMSNorm and per-channel in_proj dt, 2 layers",
                    {"pattern": "mamba*2", "mixer_options": {"mamba": {"out_norm": True, "dt_source": "in_proj"}}}),
    "s4d": ("S4D (diagonal, LTI) + GELU MLP, 2 layers",
            {"pattern": "s4d*2", "mlp": "gelu", "mlp_ratio": 2.0, "mixer_options": {"s4d": {"d_state": 32}}}),
    "s4": ("S4 (DPLR, LTI) + GELU MLP, 2 layers",
           {"pattern": "s4*2", "mlp": "gelu", "mlp_ratio": 2.0, "mixer_options": {"s4": {"d_state": 32}}}),
    "h3": ("H3 (shift + diagonal SSM) + GELU MLP, 2 layers",
           {"pattern": "h3*2", "mlp": "gelu", "mlp_ratio": 2.0, "mixer_options": {"h3": {"d_state": 32}}}),
    "longconv": ("long convolutions + GELU MLP, 2 layers",
                 {"pattern": "longconv*2", "mlp": "gelu", "mlp_ratio": 2.0}),
    "gated": ("gated linear RNN (GatedSSM) + SwiGLU MLP, 2 layers",
              {"pattern": "gated*2", "mlp": "swiglu", "mlp_ratio": 2.0}),
    "rglru": ("RG-LRU (Griffin's recurrence) + SwiGLU MLP, 2 layers",
              {"pattern": "rglru*2", "mlp": "swiglu", "mlp_ratio": 2.0}),
    "attn": ("transformer: causal attention (rotary, 4 heads) + SwiGLU MLP, 2 layers",
             {"pattern": "attn*2", "mlp": "swiglu", "mlp_ratio": 2.0,
              "mixer_options": {"attn": {"n_heads": 4, "rotary": True}}}),
    "hybrid": ("Mamba-2 / attention hybrid mamba2*2,attn,mamba2*2",
               {"pattern": "mamba2*2,attn,mamba2*2",
                "mixer_options": {"mamba2": {"d_state": 32, "headdim": 16},
                                  "attn": {"n_heads": 4, "rotary": True}}}),
}
#: aliases accepted by --model
ALIASES = {"transformer": "attn"}

HEADS_BY_KIND = {"lm": ("CausalLM", "PrefixLM"), "classification": ("SequenceClassifier",),
                 "forecast": ("Regressor",)}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_fields(name: str) -> dict[str, Any]:
    """ModelConfig fields of preset ``name`` (or of a pattern/mixer name); errors list presets and mixers."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model preset must be a non-empty string, got {name!r}")
    name = ALIASES.get(name, name)
    if name in PRESETS:
        return {**copy.deepcopy(BASE), **copy.deepcopy(PRESETS[name][1])}
    try:
        names = parse_pattern(name)
        unknown = [n for n in names if n not in MIXERS]
    except ValueError:
        unknown = [name]
    if unknown:
        raise ValueError(f"unknown model {name!r}; valid presets: {', '.join([*PRESETS, *ALIASES])}; or a "
                         f"block pattern of mixers ({', '.join(MIXERS)}), e.g. 'mamba2*2,attn'")
    return {**copy.deepcopy(BASE), "pattern": name}


def default_head(kind: str) -> str:
    return HEADS_BY_KIND[kind][0]


@dataclass
class ModelSpec:
    """A resolved model: preset name, head class name and the validated ModelConfig."""

    preset: str
    head: str
    config: ModelConfig

    def section(self) -> dict[str, Any]:
        """The ``model`` section recorded in the run's config.json (without the task-sized fields)."""
        d = {k: v for k, v in self.config.to_dict().items() if k not in TASK_SIZED_FIELDS}
        return {"preset": self.preset, "head": self.head, **d}


def resolve_model(section: dict[str, Any], task: Any) -> ModelSpec:
    """Build the ModelConfig for ``task`` from a raw ``model`` section (preset, head and field overrides)."""
    section = dict(section)
    preset = section.pop("preset", None) or "mamba"
    head = section.pop("head", None)
    fields = preset_fields(preset)
    sized = [k for k in section if k in TASK_SIZED_FIELDS]
    if sized:
        raise ValueError(f"model.{sized[0]} is set by the task ({task.name}) and cannot be given; the task "
                         f"decides {', '.join(TASK_SIZED_FIELDS)}")
    valid = [*MODEL_EXTRA_KEYS, *(k for k in ModelConfig.__dataclass_fields__ if k not in TASK_SIZED_FIELDS)]
    unknown = [k for k in section if k not in valid]
    if unknown:
        raise ValueError(f"model: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                         f"{', '.join(valid)}")
    if "pattern" in section and "n_layers" not in section:
        fields.pop("n_layers", None)
    explicit = set(section.get("mixer_options") or {})
    if "mixer_options" in section:  # merge per mixer so one override keeps the preset's other options
        opts = {m: dict(o) for m, o in fields.get("mixer_options", {}).items()}
        for m, o in (section.pop("mixer_options") or {}).items():
            if not isinstance(o, dict):
                raise ValueError(f"model.mixer_options[{m!r}] must be a mapping of options, got {o!r}")
            opts.setdefault(m, {}).update(o)
        fields["mixer_options"] = opts
    fields.update(section)
    kind = task.kind
    heads = HEADS_BY_KIND[kind]
    head = head or heads[0]
    if head not in heads:
        raise ValueError(f"model.head={head!r} does not fit task {task.name!r} (kind {kind!r}); valid heads: "
                         f"{', '.join(heads)}")
    if task.vocab_size is not None:
        fields["vocab_size"] = task.vocab_size
    else:
        fields["d_input"] = task.d_input
    if kind == "classification":
        fields["num_classes"] = task.num_classes
    elif kind == "forecast":
        fields["d_output"] = task.horizon * task.d_output
    if "mixer_options" in fields:  # keep only the options of mixers in the pattern (preset leftovers)
        pattern = fields["pattern"]
        names = set(parse_pattern(pattern) if isinstance(pattern, str) else pattern)
        bases = names | {MIXERS[n].base for n in names if n in MIXERS}
        fields["mixer_options"] = {m: o for m, o in fields["mixer_options"].items()
                                   if m in bases or m in explicit}
    return ModelSpec(preset=preset, head=head, config=ModelConfig(**fields))
