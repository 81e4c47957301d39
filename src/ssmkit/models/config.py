"""``ModelConfig``: one validated dataclass describing a backbone and its head options.

Block pattern (``pattern``): a list of mixer names, one per layer, or a spec string:

    "mamba"                          one name
    "mamba2*3,attn,mamba2*3"         comma-separated items, ``name*count`` repeats an item
    "(mamba2*2,attn)*3"              parentheses group items (nesting allowed)

Layer count rule: ``n_layers`` may be omitted (None), and is then derived from the pattern. When given it must
equal the pattern's length, except that a pattern of a single bare mixer name ("mamba" or ["mamba"]) is
repeated ``n_layers`` times. After validation ``pattern`` is always the expanded list and ``n_layers`` its
length, so ``to_dict`` / ``from_dict`` round-trip exactly.

Prefix-bidirectional layers (``prefix_layers``, Birdie): None (default) lets the head decide (PrefixLM:
"alternate"; every other head: "none"); "none"; "alternate" (layers 0, 2, 4, ... become prefix-bidirectional,
the others stay causal); "all"; or a list of layer indices. A selected layer with mixer X becomes "prefix-X"
(X must be one of ``registry.PREFIXABLE``). Explicit ``prefix-*`` names in the pattern are prefix layers too.

All errors are ValueError naming the field (and, for choices, listing the valid values). Mixer options are
checked by name against the layer's constructor, and by value by building each mixer of the pattern on the
meta device (layers that cannot be built there, S4/S4D/H3, have their values checked at model build).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import registry

NORMS = ("rmsnorm", "layernorm")
MLPS = ("none", "gelu", "swiglu")
POOLINGS = ("mean", "last")
PREFIX_MODES = ("none", "alternate", "all")


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"ModelConfig: {name} {msg}")


def _pos_int(name: str, v: object, *, optional: bool = False, minimum: int = 1) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        extra = " or None" if optional else ""
        raise _err(name, f"must be an int >= {minimum}{extra}, got {v!r}")
    return v


def _number(name: str, v: object, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise _err(name, f"must be a number in {interval}, got {v!r}")
    return float(v)


def _flag(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise _err(name, f"must be a bool, got {v!r}")
    return v


def _choice(name: str, v: object, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise _err(name, f"got {v!r}; expected one of {', '.join(map(repr, choices))}")
    return v  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- spec parsing
_TOKEN = re.compile(r"\s*(?:([A-Za-z0-9_\-]+)|(\*)|(,)|(\()|(\)))")


def parse_pattern(spec: str) -> list[str]:
    """Expand a spec string ("mamba2*3,attn,(gated,attn)*2") into a list of names (not checked here)."""
    if not isinstance(spec, str) or not spec.strip():
        raise _err("pattern", f"must be a non-empty spec string or list of mixer names, got {spec!r}")
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(spec):
        if spec[pos:].strip() == "":
            break
        m = _TOKEN.match(spec, pos)
        if m is None:
            raise _err("pattern", f"{spec!r}: unexpected character {spec[pos:].lstrip()[0]!r} at "
                                  f"position {pos}")
        kinds = ("name", "*", ",", "(", ")")
        kind = next(k for k, g in zip(kinds, m.groups(), strict=True) if g is not None)
        tokens.append((kind, m.group(m.lastindex)))
        pos = m.end()
    i = 0

    def peek() -> str | None:
        return tokens[i][0] if i < len(tokens) else None

    def fail(what: str) -> ValueError:
        got = repr(tokens[i][1]) if i < len(tokens) else "the end"
        return _err("pattern", f"{spec!r}: expected {what}, got {got}")

    def seq() -> list[str]:
        nonlocal i
        out = item()
        while peek() == ",":
            i += 1
            out += item()
        return out

    def item() -> list[str]:
        nonlocal i
        if peek() == "name":
            out = [tokens[i][1]]
            i += 1
        elif peek() == "(":
            i += 1
            out = seq()
            if peek() != ")":
                raise fail("')'")
            i += 1
        else:
            raise fail("a mixer name or '('")
        if peek() == "*":
            i += 1
            if peek() != "name" or not tokens[i][1].isdigit() or int(tokens[i][1]) < 1:
                raise fail("a positive repeat count after '*'")
            out = out * int(tokens[i][1])
            i += 1
        return out

    names = seq()
    if i != len(tokens):
        raise fail("',' or the end")
    return names


def compress_pattern(names: list[str]) -> str:
    """The shortest run-length spec ("mamba2*3,attn,mamba2*3") for a list of names."""
    out: list[str] = []
    i = 0
    while i < len(names):
        j = i
        while j < len(names) and names[j] == names[i]:
            j += 1
        out.append(names[i] if j - i == 1 else f"{names[i]}*{j - i}")
        i = j
    return ",".join(out)


# ------------------------------------------------------------------------------------------- options
_SCALARS = (bool, int, float, str, type(None))


def _normalise_value(where: str, v: object) -> object:
    """JSON-compatible option values; sequences become tuples (JSON lists come back as tuples too)."""
    if isinstance(v, _SCALARS):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_normalise_value(where, e) for e in v)
    raise _err(where, f"must be a JSON-compatible value (bool, int, float, str, None or a list of them), "
                      f"got {type(v).__name__}")


def _check_mixer_options(opts: object) -> dict[str, dict[str, Any]]:
    if not isinstance(opts, dict):
        raise _err("mixer_options", f"must be a dict mixer name -> dict of options, "
                                    f"got {type(opts).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for mixer, kw in opts.items():
        if mixer not in registry.MIXERS:
            raise _err("mixer_options", f"has unknown mixer {mixer!r}; expected one of "
                                        f"{', '.join(registry.MIXERS)}")
        if not isinstance(kw, dict):
            raise _err(f"mixer_options[{mixer!r}]", f"must be a dict of options, got {type(kw).__name__}")
        valid = registry.allowed_options(mixer)
        for key in kw:
            if key not in valid:
                raise _err(f"mixer_options[{mixer!r}]", f"has unknown option {key!r}; valid options: "
                                                        f"{', '.join(valid)}")
        out[mixer] = {k: _normalise_value(f"mixer_options[{mixer!r}][{k!r}]", v) for k, v in kw.items()}
    return out


def _jsonable(v: object) -> object:
    if isinstance(v, tuple):
        return [_jsonable(e) for e in v]
    if isinstance(v, list):
        return [_jsonable(e) for e in v]
    if isinstance(v, dict):
        return {k: _jsonable(e) for k, e in v.items()}
    return v


# ------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    """A model's architecture. Validated (and normalised) on construction; see the module docstring.

    Args:
        d_model: residual stream width.
        n_layers: number of blocks; None = derived from ``pattern``.
        pattern: block pattern, a list of mixer names or a spec string (see :mod:`ssmkit.models.registry`).
        vocab_size: token inputs (embedding). Exactly one of ``vocab_size`` and ``d_input``.
        d_input: real-valued inputs (batch, length, d_input), projected to d_model.
        mixer_options: mixer name -> constructor kwargs of its layer.
        norm: "rmsnorm" | "layernorm" (pre-norm in every block, and a final norm).
        norm_eps: the norms' epsilon.
        mlp: "none" | "gelu" | "swiglu": an MLP sub-block after each mixer.
        mlp_ratio: MLP hidden width = round(mlp_ratio * d_model).
        tie_embeddings: LM heads reuse the embedding matrix as the output projection (LM heads only).
        dropout: dropout on each mixer's and MLP's output before the residual add.
        residual_in_fp32: keep the residual stream in at least float32 (for 16-bit parameters).
        prefix_layers: which layers are prefix-bidirectional (None, "none", "alternate", "all" or indices).
        num_classes: SequenceClassifier's number of classes (>= 2).
        pooling: SequenceClassifier's pooling over positions, "mean" | "last".
        d_output: Regressor/Forecaster's per-step output width.
        init_std: std of the normal init of the embedding and an untied LM head; None (default) =
            ``d_model ** -0.5`` (see :attr:`embedding_std` and docs/init.md); 0.02 was the old default.
        embedding_multiplier, residual_multiplier, logits_scaling: muP-style constants (GraniteMoeHybrid):
            the embedding output is multiplied by the first, every mixer/MLP output by the second before its
            residual add, and the final norm's output divided by the third (so logits are divided by it).
            1.0 (default) skips them.
        logits_soft_cap: CausalLM logits become ``cap * tanh(logits / cap)`` (RecurrentGemma); None (default)
            leaves them uncapped.
    """

    d_model: int
    n_layers: int | None = None
    pattern: str | list[str] = "mamba"
    vocab_size: int | None = None
    d_input: int | None = None
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "none"
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    residual_in_fp32: bool = True
    prefix_layers: str | list[int] | None = None
    num_classes: int | None = None
    pooling: str = "mean"
    d_output: int | None = None
    init_std: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    logits_soft_cap: float | None = None

    def __post_init__(self) -> None:
        self.d_model = _pos_int("d_model", self.d_model)
        self.n_layers = _pos_int("n_layers", self.n_layers, optional=True)
        self.vocab_size = _pos_int("vocab_size", self.vocab_size, optional=True)
        self.d_input = _pos_int("d_input", self.d_input, optional=True)
        if (self.vocab_size is None) == (self.d_input is None):
            raise _err("vocab_size/d_input", f"exactly one must be set (vocab_size for token inputs, d_input "
                                             f"for real-valued inputs), got vocab_size={self.vocab_size!r}, "
                                             f"d_input={self.d_input!r}")
        self._check_pattern()
        self.mixer_options = _check_mixer_options(self.mixer_options)
        self.norm = _choice("norm", self.norm, NORMS)
        self.norm_eps = _number("norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True, hi_open=True)
        self.mlp = _choice("mlp", self.mlp, MLPS)
        self.mlp_ratio = _number("mlp_ratio", self.mlp_ratio, 0.0, 1e6, lo_open=True, hi_open=False)
        if self.mlp != "none" and round(self.mlp_ratio * self.d_model) < 1:
            raise _err("mlp_ratio", f"gives an MLP width round({self.mlp_ratio} * {self.d_model}) < 1")
        self.tie_embeddings = _flag("tie_embeddings", self.tie_embeddings)
        self.dropout = _number("dropout", self.dropout, 0.0, 1.0, lo_open=False, hi_open=True)
        self.residual_in_fp32 = _flag("residual_in_fp32", self.residual_in_fp32)
        self._check_prefix_layers()
        self._check_mixer_values()
        self.num_classes = _pos_int("num_classes", self.num_classes, optional=True, minimum=2)
        self.pooling = _choice("pooling", self.pooling, POOLINGS)
        self.d_output = _pos_int("d_output", self.d_output, optional=True)
        if self.init_std is not None:
            self.init_std = _number("init_std", self.init_std, 0.0, 1e3, lo_open=True, hi_open=False)
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            setattr(self, name, _number(name, getattr(self, name), 0.0, 1e6, lo_open=True, hi_open=False))
        if self.logits_soft_cap is not None:
            self.logits_soft_cap = _number("logits_soft_cap", self.logits_soft_cap, 0.0, 1e6, lo_open=True,
                                           hi_open=False)

    def _check_pattern(self) -> None:
        p = self.pattern
        if isinstance(p, str):
            names = parse_pattern(p)
            bare = "," not in p and "*" not in p and "(" not in p
        elif isinstance(p, (list, tuple)) and p and all(isinstance(n, str) for n in p):
            names, bare = list(p), len(p) == 1
        else:
            raise _err("pattern", f"must be a spec string or a non-empty list of mixer names, got {p!r}")
        for n in names:
            registry.get_spec(n, "ModelConfig: pattern")
        if self.n_layers is not None and len(names) != self.n_layers:
            if not bare:
                raise _err("n_layers", f"={self.n_layers} does not match pattern {p!r}, which has "
                                       f"{len(names)} layers (omit n_layers to derive it)")
            names = names * self.n_layers
        self.pattern = names
        self.n_layers = len(names)

    def _check_prefix_layers(self) -> None:
        v = self.prefix_layers
        if v is None:
            return
        if isinstance(v, str):
            _choice("prefix_layers", v, PREFIX_MODES)
        elif isinstance(v, (list, tuple)):
            for i in v:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers:
                    raise _err("prefix_layers", f"indices must be ints in [0, n_layers={self.n_layers}), got "
                                                f"{i!r} in {list(v)!r}")
            if len(set(v)) != len(v):
                raise _err("prefix_layers", f"has repeated indices: {list(v)!r}")
            self.prefix_layers = sorted(v)
        else:
            modes = ", ".join(map(repr, PREFIX_MODES))
            raise _err("prefix_layers", f"must be None, one of {modes} or a list of layer indices, got {v!r}")
        self.resolved_pattern(None)  # every selected layer must have a prefix form

    def _check_mixer_values(self) -> None:
        """Build every distinct mixer of the pattern on the meta device (no memory, no RNG use) so that bad
        option values fail here, naming the mixer. Layers whose init needs real values (S4/S4D/H3 compute their
        init numerically) cannot be built on meta; their values are checked when the model is built."""
        import torch

        for name in dict.fromkeys(self.resolved_pattern(None)):
            try:
                with torch.random.fork_rng(devices=[]), torch.device("meta"):
                    registry.build_mixer(name, self.d_model, self.mixer_options)
            except ValueError as e:  # build_mixer re-raises the layer's ValueError/TypeError as ValueError
                raise _err(f"mixer_options (for {name!r})", f"invalid: {e}") from e
            except (RuntimeError, NotImplementedError):
                pass  # not buildable on the meta device; checked for real when the model is built

    # ------------------------------------------------------------------------------------------ derived
    def prefix_indices(self, default: str = "none") -> list[int]:
        """Indices of the layers made prefix-bidirectional by ``prefix_layers`` (``default`` when None)."""
        mode = default if self.prefix_layers is None else self.prefix_layers
        if mode == "none":
            return []
        if mode == "alternate":
            return list(range(0, self.n_layers, 2))
        if mode == "all":
            return list(range(self.n_layers))
        return list(mode)

    def resolved_pattern(self, default: str | None = "none") -> list[str]:
        """The per-layer mixer names after applying ``prefix_layers`` (or ``default`` when it is None)."""
        names = list(self.pattern)
        for i in self.prefix_indices(default or "none"):
            spec = registry.get_spec(names[i])
            if spec.kind == "prefix":
                continue
            if spec.kind != "plain" or spec.base not in registry.PREFIXABLE:
                mode = self.prefix_layers if self.prefix_layers is not None else default
                raise _err("prefix_layers", f"{mode!r} selects layer {i} ({names[i]!r}), which has no "
                                            f"prefix-bidirectional form; prefixable mixers: "
                                            f"{', '.join(registry.PREFIXABLE)} (or give layer indices)")
            names[i] = f"prefix-{names[i]}"
        return names

    @property
    def embedding_std(self) -> float:
        """Std of the embedding (and untied LM head) init: ``init_std``, or ``d_model ** -0.5`` when None.

        With a tied head the logits at init are then O(1) (a unit-RMS final norm dotted with rows of std
        d^-1/2), and a token's embedding is not drowned by the first block's output (docs/init.md)."""
        return self.d_model ** -0.5 if self.init_std is None else self.init_std

    @property
    def d_mlp(self) -> int:
        """The MLP hidden width (0 when mlp == "none")."""
        return 0 if self.mlp == "none" else round(self.mlp_ratio * self.d_model)

    # ------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (lists, not tuples)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: object) -> ModelConfig:
        """Build and validate a config from a dict; unknown or missing keys fail naming the key."""
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig.from_dict: expected a dict, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in valid]
        if unknown:
            raise ValueError(f"ModelConfig: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                             f"{', '.join(valid)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"ModelConfig: missing required key(s) {', '.join(map(repr, missing))}")
        return cls(**d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"ModelConfig.from_json: invalid JSON: {e}") from e
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed (unknown names fail naming the key)."""
        d = self.to_dict()
        if "pattern" in changes and "n_layers" not in changes:
            d["n_layers"] = None  # derive it from the new pattern
        return type(self).from_dict({**d, **changes})
