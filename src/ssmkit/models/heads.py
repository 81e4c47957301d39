"""Models: a :class:`~ssmkit.models.backbone.Backbone` plus a task head.

    CausalLM            next-token LM on token ids; ``step`` for generation.
    PrefixLM            Birdie-style prefix LM: prefix-bidirectional layers alternating with causal ones.
    SequenceClassifier  pooled ("mean" | "last") logits per sequence (or per packed segment).
    Regressor           per-step real outputs (d_output) from real (d_input) or token inputs; MSE loss.
    Forecaster          a Regressor whose outputs are the next inputs; closed-loop ``forecast``.

Shared API: ``model(inputs, initial_state=None, *, reset=None, prefix_mask=None, labels=None,
return_final_state=False)`` returns a small output dataclass (logits/outputs, loss when labels are given, the final
state when asked; the old keywords ``state=`` / ``return_state=`` still work with a DeprecationWarning);
``init_state(batch_size)``; ``num_parameters(exclude_embeddings=False)``; ``summary()``;
``save_pretrained(dir)`` / ``Model.from_pretrained(dir)`` (see :mod:`ssmkit.models.checkpoint`; this module
imports it, never the other way round).

Label convention (LMs): labels are already aligned with the logits: ``labels[:, t]`` is the target for the
logits at position t (so for next-token prediction pass ``labels[:, t] = input_ids[:, t + 1]``, and -100 at
the last position). Positions with label -100 are ignored. The loss is the mean cross entropy over the
non-ignored positions (0 when there are none).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.base import state_kwargs
from .backbone import Backbone, check_mask
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, compress_pattern
from .outputs import ClassifierOutput, LMOutput, ModelState, RegressionOutput

IGNORE_INDEX = -100


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _check_class_labels(name: str, labels: object, shape: tuple[int, ...], n_classes: int,
                        device: torch.device) -> Tensor:
    """Integer labels of ``shape`` in [0, n_classes) or IGNORE_INDEX."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or (
        labels.dtype == torch.bool
    ):
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{name} must be an integer tensor, got {got}")
    if tuple(labels.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the model outputs are on {device}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        raise ValueError(f"{name} must hold values in [0, {n_classes}) or {IGNORE_INDEX} (ignored), got "
                         f"{int(labels[bad][0])}")
    return labels


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross entropy over labels != IGNORE_INDEX (0 if none), computed in at least float32."""
    logits = logits.reshape(-1, logits.shape[-1]).to(_acc(logits.dtype))
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _padding_reset(reset: Tensor | None, padding_mask: Tensor | None, has_state: bool) -> Tensor | None:
    """Segment starts that also cut at every padding boundary, so padding never mixes with real tokens in
    any layer (causal or bidirectional, in either direction)."""
    if padding_mask is None:
        return reset
    edges = torch.zeros_like(padding_mask)
    edges[:, 1:] = padding_mask[:, 1:] != padding_mask[:, :-1]
    if not has_state:
        edges[:, 0] = True
    return edges if reset is None else reset | edges


class SoftCappedHead(nn.Module):
    """A bias-free linear LM head with a logit soft cap: x (..., d_model) -> cap * tanh((x W^T) / cap) (..., vocab).

    It keeps ``weight`` (vocab, d_model) under the name of an ``nn.Linear`` head's (so checkpoints and tying are
    unchanged) but is deliberately not an ``nn.Linear``: code that swaps linear layers (quantization) or reads
    their weights for a fused step must not drop the cap."""

    def __init__(self, d_model: int, vocab_size: int, cap: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.cap = d_model, vocab_size, float(cap)
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(F.linear(x, self.weight) / self.cap) * self.cap

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, cap={self.cap}"


class SequenceModel(nn.Module):
    """Base of every head: holds a validated copy of the config and the backbone."""

    #: how ``config.prefix_layers=None`` resolves for this head
    prefix_default: ClassVar[str] = "none"
    #: the input argument's name in errors
    input_name: ClassVar[str] = "inputs"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"{type(self).__name__}: config must be a ModelConfig, "
                            f"got {type(config).__name__}")
        self.config = ModelConfig.from_dict(config.to_dict())  # a private, re-validated copy
        self.check_config(self.config)
        self.backbone = Backbone(self.config, self.config.resolved_pattern(self.prefix_default))

    def check_config(self, config: ModelConfig) -> None:
        """Head-specific requirements on the config (raise ValueError naming the field)."""

    def _fail(self, field: str, msg: str) -> ValueError:
        return ValueError(f"{type(self).__name__}: config.{field} {msg}")

    # ------------------------------------------------------------------------------------------ info
    @property
    def tied_weights(self) -> dict[str, str]:
        """Parameter names that alias another (alias -> saved name); saved once by checkpoints."""
        return {}

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The vocabulary matrices (embedding and an untied LM head)."""
        emb = self.backbone.embedding
        return [] if emb is None else [emb.weight]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (tied ones counted once); ``exclude_embeddings`` leaves out the vocabulary
        matrices (token embedding and an untied LM head)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for p in self.embedding_parameters():
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def summary(self) -> str:
        """One line: head, layers, widths and parameter counts."""
        cfg = self.config
        io = f"vocab_size={cfg.vocab_size}" if cfg.vocab_size is not None else f"d_input={cfg.d_input}"
        mlp = "none" if cfg.mlp == "none" else f"{cfg.mlp}(ratio {cfg.mlp_ratio:g})"
        pattern = compress_pattern(self.backbone.mixer_names)
        return (f"{type(self).__name__}: {cfg.n_layers} layers [{pattern}], "
                f"d_model={cfg.d_model}, {io}, norm={cfg.norm}, mlp={mlp}, "
                f"{_count(self.num_parameters())} params "
                f"({_count(self.num_parameters(exclude_embeddings=True))} non-embedding)")

    def _masks(
        self, inputs: object, reset: object, padding_mask: object, has_state: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Validate inputs, reset and padding_mask; return (reset, padding_mask, reset for the backbone)."""
        inputs = self.backbone.check_inputs(inputs, self.input_name)
        batch, length = inputs.shape[:2]
        reset = check_mask("reset", reset, batch, length, inputs.device)
        padding_mask = check_mask("padding_mask", padding_mask, batch, length, inputs.device)
        return reset, padding_mask, _padding_reset(reset, padding_mask, has_state)

    def _needs_padding_cut(self, padding_mask: Tensor | None, prefix_mask: object, final_state: bool) -> bool:
        """False when cutting segments at the padding cannot change what the caller gets back: every layer is
        causal (no prefix_mask), each row's padding comes after all its real tokens, and no final state is
        returned; then only real positions are read, and none of them can see the padding after it. Skipping
        the cut keeps SSMs on their convolution / chunked-scan path (a reset forces the sequential scan)."""
        if padding_mask is None or final_state or prefix_mask is not None or not self.backbone.causal:
            return True
        return not bool((padding_mask[:, 1:] <= padding_mask[:, :-1]).all())

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> ModelState:
        """Zero recurrent state (empty KV caches for attention layers) for ``batch_size`` sequences."""
        return self.backbone.init_state(batch_size, dtype=dtype)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically into ``directory`` (made if needed)."""
        return save_checkpoint(self, directory, head=head_name(self))

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: torch.device | str | None = None):
        """Load a model saved by ``save_pretrained``; the checkpoint's head must be this class."""
        return load_checkpoint(directory, HEADS, expected=cls, device=device)


class CausalLM(SequenceModel):
    """Language model on token ids: backbone, then an LM head (tied to the embedding when
    ``tie_embeddings``). Every layer must be causal (no bi-* mixers). See the module docstring for the
    label convention.

    With ``config.logits_soft_cap`` the head is a :class:`SoftCappedHead` (logits cap * tanh(logits / cap)).

    forward: input_ids (batch, length) -> LMOutput(logits (batch, length, vocab_size), loss, state).
    step: token_ids (batch,) -> (logits (batch, vocab_size), state): one O(1) recurrent step per layer
    (attention layers append to their KV cache).
    """

    input_name = "input_ids"

    def check_config(self, config: ModelConfig) -> None:
        if config.vocab_size is None:
            raise self._fail("vocab_size", f"must be set for a {type(self).__name__} (got d_input="
                                           f"{config.d_input})")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        bi = [f"{i} ({b.mixer_name})" for i, b in enumerate(self.backbone.blocks) if not b.causal]
        if bi:
            raise self._fail("pattern", f"has non-causal (bidirectional) layers {', '.join(bi)}; a language "
                                        f"model needs causal or prefix-* layers")
        cfg = self.config
        if cfg.logits_soft_cap is None:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        else:
            self.lm_head = SoftCappedHead(cfg.d_model, cfg.vocab_size, cfg.logits_soft_cap)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.embedding_std)

    @property
    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "backbone.embedding.weight"} if self.config.tie_embeddings else {}

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.backbone.embedding.weight, self.lm_head.weight]

    @state_kwargs
    def forward(
        self,
        input_ids: Tensor,
        initial_state: ModelState | None = None,
        *,
        reset: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_final_state: bool = False,
    ) -> LMOutput:
        """input_ids: (batch, length) int -> LMOutput.

        initial_state: a ModelState to continue from. reset: (batch, length) bool segment starts (packed sequences).
        prefix_mask: (batch, length) bool, True on prefix tokens (models with prefix layers only).
        labels: (batch, length) int aligned with the logits (labels[:, t] is position t's target); -100 is
        ignored.
        """
        hidden, state = self.backbone(input_ids, initial_state, reset=reset, prefix_mask=prefix_mask,
                                      return_final_state=return_final_state, input_name="input_ids")
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            labels = _check_class_labels("labels", labels, tuple(input_ids.shape), self.config.vocab_size,
                                         logits.device)
            loss = _cross_entropy(logits, labels)
        return LMOutput(logits=logits, loss=loss, state=state)

    def step(self, token_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """One token per sequence: token_ids (batch,) -> (logits (batch, vocab_size), new state)."""
        if isinstance(self.lm_head, SoftCappedHead):  # the backbone's fused head is a plain linear layer
            hidden, state, _ = self.backbone.step_with_head(token_ids, state, None, input_name="token_ids")
            return self.lm_head(hidden), state
        _, state, logits = self.backbone.step_with_head(token_ids, state, self.lm_head, input_name="token_ids")
        return logits, state


class PrefixLM(CausalLM):
    """Birdie-style prefix LM: some layers are prefix-bidirectional (bidirectional over the prefix, causal
    over the suffix), the others causal.

    Which layers: ``config.prefix_layers``; its default (None) here means "alternate": layers 0, 2, 4, ...
    become prefix-X (X must have a prefix form: gated, rglru, mamba, s4d, attn) and layers 1, 3, ... stay
    causal. Explicit prefix-* mixers in the pattern also count. At least one prefix layer is required.

    forward takes ``prefix_mask`` (batch, length) bool, True on prefix tokens, contiguous at the start of each
    segment. No future suffix token ever influences an earlier position's logits; prefix positions see the
    whole prefix. Without a prefix_mask the model is fully causal. ``step`` continues causally after a prefix
    (run the prompt through forward with prefix_mask and return_final_state=True, then step).
    """

    prefix_default = "alternate"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if not self.backbone.accepts_prefix:
            raise self._fail("prefix_layers", f"={self.config.prefix_layers!r} leaves no prefix-"
                                              f"bidirectional layer; a PrefixLM needs at least one")


class SequenceClassifier(SequenceModel):
    """Sequence classification: backbone, pooling over positions, a linear classifier.

    Pooling (``config.pooling``): "mean" over the valid positions, or the "last" valid position (the
    natural choice for a causal backbone, whose last position has seen the whole sequence).

    Packing and padding:
      * Without ``reset`` each row is one sequence: logits (batch, num_classes).
      * With ``reset`` (batch, length) bool, each row holds several sequences, each starting at a True (and
        at position 0): logits (n_segments, num_classes), segments numbered row by row, left to right.
      * ``padding_mask`` (batch, length) bool, True on real tokens: padded positions are excluded from
        pooling, and every boundary between padding and real tokens becomes a segment start for the backbone, so
        padding never leaks into real positions even through bidirectional layers. (Not needed, and skipped, for a
        causal backbone whose rows are right-padded, without prefix_mask or a returned final state: no real
        position can see the padding after it, and SSMs keep their fast convolution path.) Segments (of ``reset``)
        with no real token are dropped from the output; without ``reset`` a row with no real token is an
        error.
    Labels: int (n_segments,) (or (batch,)) in [0, num_classes), -100 ignored; loss = mean cross entropy.
    With a ``state`` the pooling covers only this call's positions ("last" pooling then equals a whole
    forward; "mean" pooling does not).
    """

    def check_config(self, config: ModelConfig) -> None:
        if config.num_classes is None:
            raise self._fail("num_classes", "must be set (>= 2) for a SequenceClassifier")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(self.config.d_model, self.config.num_classes)

    def pool(self, hidden: Tensor, reset: Tensor | None, valid: Tensor | None) -> Tensor:
        """hidden (batch, length, d_model) -> pooled (n_segments, d_model); see the class docstring."""
        batch, length, d = hidden.shape
        starts = torch.zeros(batch, length, dtype=torch.bool, device=hidden.device) if reset is None else (
            reset.clone())
        starts[:, 0] = True
        seg = starts.flatten().long().cumsum(0) - 1  # (batch * length,) global segment ids
        n_seg = int(starts.sum())
        valid = torch.ones_like(starts) if valid is None else valid
        v = valid.flatten()
        counts = torch.zeros(n_seg, dtype=torch.long, device=hidden.device).index_add_(0, seg, v.long())
        keep = counts > 0
        if reset is None and not bool(keep.all()):
            row = int((~keep).nonzero()[0])
            raise ValueError(f"padding_mask row {row} has no real (True) position to pool over")
        h = hidden.flatten(0, 1)
        if self.config.pooling == "mean":
            acc = _acc(h.dtype)
            sums = torch.zeros(n_seg, d, dtype=acc, device=h.device).index_add_(0, seg[v], h[v].to(acc))
            pooled = (sums / counts.clamp(min=1).unsqueeze(-1).to(acc)).to(h.dtype)
        else:
            pos = torch.arange(batch * length, device=h.device)
            last = torch.full((n_seg,), -1, dtype=torch.long, device=h.device)
            last = last.scatter_reduce(0, seg[v], pos[v], reduce="amax")
            pooled = h[last.clamp(min=0)]
        return pooled[keep]

    @state_kwargs
    def forward(
        self,
        inputs: Tensor,
        initial_state: ModelState | None = None,
        *,
        reset: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_final_state: bool = False,
    ) -> ClassifierOutput:
        """inputs: token ids (batch, length) or floats (batch, length, d_input) -> ClassifierOutput."""
        reset, padding_mask, run_reset = self._masks(inputs, reset, padding_mask, initial_state is not None)
        if not self._needs_padding_cut(padding_mask, prefix_mask, return_final_state):
            run_reset = reset
        hidden, state = self.backbone(inputs, initial_state, reset=run_reset, prefix_mask=prefix_mask,
                                      return_final_state=return_final_state)
        logits = self.classifier(self.pool(hidden, reset, padding_mask))
        loss = None
        if labels is not None:
            labels = _check_class_labels("labels", labels, (logits.shape[0],), self.config.num_classes,
                                         logits.device)
            loss = _cross_entropy(logits, labels)
        return ClassifierOutput(logits=logits, loss=loss, state=state)


class Regressor(SequenceModel):
    """Per-step regression: backbone, then Linear(d_model, d_output) at every position.

    forward: inputs (batch, length, d_input) floats (or token ids with vocab_size) -> RegressionOutput(outputs
    (batch, length, d_output), loss, state). Labels: floats (batch, length, d_output) aligned with the outputs
    (labels[:, t] is position t's target); loss = mean squared error over the valid positions
    (``padding_mask`` (batch, length) bool, True on real positions; padding also cuts segments as in
    SequenceClassifier). ``step``: one position -> (outputs_t (batch, d_output), state).
    """

    def check_config(self, config: ModelConfig) -> None:
        if config.d_output is None:
            raise self._fail("d_output", f"must be set for a {type(self).__name__}")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(self.config.d_model, self.config.d_output)

    @state_kwargs
    def forward(
        self,
        inputs: Tensor,
        initial_state: ModelState | None = None,
        *,
        reset: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_final_state: bool = False,
    ) -> RegressionOutput:
        reset, padding_mask, run_reset = self._masks(inputs, reset, padding_mask, initial_state is not None)
        hidden, state = self.backbone(inputs, initial_state, reset=run_reset, prefix_mask=prefix_mask,
                                      return_final_state=return_final_state)
        outputs = self.head(hidden)
        loss = None
        if labels is not None:
            loss = self._mse(outputs, labels, padding_mask)
        return RegressionOutput(outputs=outputs, loss=loss, state=state)

    @staticmethod
    def _mse(outputs: Tensor, labels: object, valid: Tensor | None) -> Tensor:
        if not isinstance(labels, Tensor) or not labels.is_floating_point():
            got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"labels must be a floating-point tensor, got {got}")
        if labels.shape != outputs.shape:
            raise ValueError(f"labels must have the outputs' shape (batch, length, d_output) = "
                             f"{tuple(outputs.shape)}, got {tuple(labels.shape)}")
        acc = _acc(outputs.dtype)
        err = (outputs.to(acc) - labels.to(acc)).pow(2)
        if valid is None:
            return err.mean()
        w = valid.to(acc).unsqueeze(-1)
        return (err * w).sum() / (w.sum() * outputs.shape[-1]).clamp(min=1)

    def step(self, inputs_t: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """One position: floats (batch, d_input) or ids (batch,) -> (outputs_t (batch, d_output), state)."""
        hidden, state = self.backbone.step(inputs_t, state)
        return self.head(hidden), state


class Forecaster(Regressor):
    """A Regressor whose output at t forecasts the input at t + 1 (so d_output must equal d_input).

    Training: ``labels[:, t] = inputs[:, t + 1]`` (use padding_mask False at the last position, or drop it).
    ``forecast(context, horizon)`` runs the context through forward, then feeds each prediction back in
    (closed loop) with ``step``.
    """

    def check_config(self, config: ModelConfig) -> None:
        super().check_config(config)
        if config.d_input is None or config.d_output != config.d_input:
            raise self._fail("d_output", f"must equal d_input for a Forecaster (its outputs are fed back as "
                                         f"inputs), got d_input={config.d_input}, d_output={config.d_output}")

    def forecast(self, context: Tensor, horizon: int, state: ModelState | None = None) -> Tensor:
        """context: (batch, length, d_input) -> forecasts (batch, horizon, d_output) of the next positions."""
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        out = self(context, state, return_final_state=True)
        y, st = out.outputs[:, -1], out.state
        preds = [y]
        for _ in range(horizon - 1):
            y, st = self.step(y, st)
            preds.append(y)
        return torch.stack(preds, 1)


#: head name recorded in config.json -> class
HEADS: dict[str, type[SequenceModel]] = {
    "CausalLM": CausalLM,
    "PrefixLM": PrefixLM,
    "SequenceClassifier": SequenceClassifier,
    "Regressor": Regressor,
    "Forecaster": Forecaster,
}


def head_name(model: object) -> str:
    """The name ``model``'s class is registered under in :data:`HEADS` (exact class, not a subclass)."""
    for name, cls in HEADS.items():
        if type(model) is cls:
            return name
    raise TypeError(f"model must be one of {', '.join(HEADS)} (exactly), got {type(model).__name__}")


def model_class(name: str) -> type[SequenceModel]:
    """The head class called ``name``; the error lists the valid names."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of {', '.join(HEADS)}")
    return HEADS[name]
