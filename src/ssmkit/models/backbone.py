"""The backbone: input embedding (tokens) or projection (real values), a stack of blocks, a final norm.

forward(inputs, initial_state=None, *, reset=None, prefix_mask=None, return_final_state=False)
    -> (hidden, final state or None)
step(inputs_t, state) -> (hidden_t, state)
init_state(batch_size) -> ModelState

``inputs`` are token ids (batch, length) for a config with ``vocab_size``, or floats (batch, length, d_input)
for one with ``d_input``. ``hidden`` (batch, length, d_model) is the final norm's output in the parameters'
dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.base import linear_weights, state_kwargs
from ..ops.decode_linear import decode_linear
from .blocks import Block, Norm
from .config import ModelConfig
from .fused_decode import fused_step
from .outputs import ModelState
from .registry import build_mixer


def check_mask(name: str, mask: object, batch: int, length: int, device: torch.device) -> Tensor | None:
    """An optional bool (batch, length) mask on the inputs' device."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape (batch, length) = {(batch, length)}, "
                         f"got {got}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    return mask


def _shared_modules(blocks: nn.ModuleList) -> nn.ModuleList | None:
    """Weights several blocks share (Zamba2's shared transformer blocks): a mixer class with ``build_shared``
    builds them once for all its layers and keeps references; the backbone holds them, so each weight has one
    state_dict key (``backbone.shared.{i}``). None when no mixer shares weights."""
    groups: dict[type, list] = {}
    for block in blocks:
        if hasattr(type(block.mixer), "build_shared"):
            groups.setdefault(type(block.mixer), []).append(block.mixer)
    if not groups:
        return None
    return nn.ModuleList(m for cls, layers in groups.items() for m in cls.build_shared(layers))


class Backbone(nn.Module):
    """Embedding/input projection, ``n_layers`` pre-norm residual blocks and a final norm.

    Args:
        config: the model config.
        mixers: the per-layer mixer names to build (``config.resolved_pattern(...)``; a head decides the
            prefix-layer default).
    """

    def __init__(self, config: ModelConfig, mixers: list[str]) -> None:
        super().__init__()
        if len(mixers) != config.n_layers:
            raise ValueError(f"Backbone: got {len(mixers)} mixer names for n_layers={config.n_layers}")
        self.config = config
        self.mixer_names = list(mixers)
        d = config.d_model
        if config.vocab_size is not None:
            self.embedding = nn.Embedding(config.vocab_size, d)
            nn.init.normal_(self.embedding.weight, std=config.embedding_std)
            self.input_proj = None
        else:
            self.embedding = None
            self.input_proj = nn.Linear(config.d_input, d)
        self.blocks = nn.ModuleList(
            Block(name, build_mixer(name, d, config.mixer_options), d, norm=config.norm,
                  norm_eps=config.norm_eps, mlp=config.mlp, d_mlp=config.d_mlp, dropout=config.dropout, index=i,
                  residual_multiplier=config.residual_multiplier)
            for i, name in enumerate(mixers)
        )
        self.final_norm = Norm(d, config.norm, config.norm_eps)
        self.shared = _shared_modules(self.blocks)

    # ------------------------------------------------------------------------------------------ dtypes
    @property
    def param_dtype(self) -> torch.dtype:
        return self.final_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.weight.device

    @property
    def residual_dtype(self) -> torch.dtype:
        """float32 (or wider) when ``residual_in_fp32``, else the parameters' dtype."""
        p = self.param_dtype
        return torch.promote_types(p, torch.float32) if self.config.residual_in_fp32 else p

    @property
    def accepts_prefix(self) -> bool:
        return any(b.accepts_prefix for b in self.blocks)

    @property
    def causal(self) -> bool:
        return all(b.causal for b in self.blocks)

    # ------------------------------------------------------------------------------------------ inputs
    def check_inputs(self, inputs: object, name: str, *, step: bool = False) -> Tensor:
        """Token ids (batch, length) in [0, vocab_size), or floats (batch, length, d_input) in the parameters'
        dtype; for ``step`` the length dim is absent."""
        cfg = self.config
        if not isinstance(inputs, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.device != self.device:
            raise ValueError(f"{name} is on {inputs.device} but the model is on {self.device}")
        lead = "(batch,)" if step else "(batch, length>=1)"
        if cfg.vocab_size is not None:
            if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {inputs.dtype}")
            if inputs.ndim != (1 if step else 2) or (not step and inputs.shape[1] < 1):
                raise ValueError(f"{name} must have shape {lead}, got {tuple(inputs.shape)}")
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= cfg.vocab_size):
                raise ValueError(f"{name} must hold ids in [0, vocab_size={cfg.vocab_size}), got values in "
                                 f"[{int(inputs.min())}, {int(inputs.max())}]")
            return inputs
        want = (lead[:-1] + f", d_input={cfg.d_input})")
        if not inputs.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of shape {want}, "
                            f"got dtype {inputs.dtype}")
        if inputs.ndim != (2 if step else 3) or inputs.shape[-1] != cfg.d_input or (
            not step and inputs.shape[1] < 1
        ):
            raise ValueError(f"{name} must have shape {want}, got {tuple(inputs.shape)}")
        if inputs.dtype != self.param_dtype:
            raise TypeError(f"{name} has dtype {inputs.dtype} but the model's parameters are "
                            f"{self.param_dtype}; cast one of them explicitly")
        return inputs

    def embed(self, inputs: Tensor) -> Tensor:
        """Validated inputs -> the residual stream (..., d_model) in ``residual_dtype``."""
        x = self.embedding(inputs) if self.embedding is not None else self.input_proj(inputs)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        return x.to(self.residual_dtype)

    def final_hidden(self, h: Tensor) -> Tensor:
        """The final norm, divided by ``config.logits_scaling`` (so that a linear head's logits are)."""
        hidden = self.final_norm(h)
        return hidden if self.config.logits_scaling == 1.0 else hidden / self.config.logits_scaling

    # ------------------------------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype | None = None) -> ModelState:
        """Zero state for ``batch_size`` sequences (mixer inputs are in the parameters' dtype by default)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"init_state: batch_size must be a positive int, got {batch_size!r}")
        dtype = dtype or self.param_dtype
        return ModelState([b.init_state(batch_size, dtype=dtype) for b in self.blocks])

    def _check_state(self, state: object) -> ModelState:
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState (from init_state or a forward with "
                            f"return_final_state=True), got {type(state).__name__}")
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layer states but the model has "
                             f"{len(self.blocks)} layers; was it made by another model?")
        return state

    # ------------------------------------------------------------------------------------------ run
    @state_kwargs
    def forward(
        self,
        inputs: Tensor,
        initial_state: ModelState | None = None,
        *,
        reset: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        return_final_state: bool = False,
        input_name: str = "inputs",
    ) -> tuple[Tensor, ModelState | None]:
        """inputs -> (hidden (batch, length, d_model), ModelState or None). See the module docstring."""
        inputs = self.check_inputs(inputs, input_name)
        batch, length = inputs.shape[:2]
        reset = check_mask("reset", reset, batch, length, inputs.device)
        prefix_mask = check_mask("prefix_mask", prefix_mask, batch, length, inputs.device)
        if prefix_mask is not None and not self.accepts_prefix:
            raise ValueError("prefix_mask was given but this model has no prefix-bidirectional layers (set "
                             "prefix_layers in the config, use prefix-* mixers, or use PrefixLM)")
        states = None if initial_state is None else self._check_state(initial_state).layers
        h = self.embed(inputs)
        embeddings = h  # the input embeddings, which Zamba2's hybrid layers read at every depth
        new_states = []
        for i, block in enumerate(self.blocks):
            h, s = block(h, None if states is None else states[i], reset=reset, prefix_mask=prefix_mask,
                         return_final_state=return_final_state, embeddings=embeddings)
            new_states.append(s)
        hidden = self.final_hidden(h)
        return hidden, (ModelState(new_states) if return_final_state else None)

    def step(
        self, inputs_t: Tensor, state: ModelState, *, input_name: str = "inputs_t"
    ) -> tuple[Tensor, ModelState]:
        """One position: ids (batch,) or floats (batch, d_input) -> (hidden_t (batch, d_model), state)."""
        return self.step_with_head(inputs_t, state, None, input_name=input_name)[:2]

    def step_with_head(
        self, inputs_t: Tensor, state: ModelState, head: nn.Module | None, *, input_name: str = "inputs_t"
    ) -> tuple[Tensor, ModelState, Tensor | None]:
        """:meth:`step`, then ``head`` (a linear layer or None) on the hidden state: (hidden_t, state,
        head(hidden_t) or None). A pure-Mamba backbone runs all of it in one kernel launch
        (:mod:`ssmkit.models.fused_decode`)."""
        inputs_t = self.check_inputs(inputs_t, input_name, step=True)
        states = self._check_state(state).layers
        h = self.embed(inputs_t)
        cfg = self.config
        plain = cfg.residual_multiplier == 1.0 and cfg.logits_scaling == 1.0  # the fused kernel has no multipliers
        fused = fused_step(self, h, state, head) if plain else None
        if fused is not None:
            return fused
        new_states, embeddings = [], h
        for block, s in zip(self.blocks, states, strict=True):
            h, s = block.step(h, s, embeddings=embeddings)
            new_states.append(s)
        hidden = self.final_hidden(h)
        out = None
        if head is not None:
            weight, scale, bias = linear_weights(head)
            out = decode_linear(hidden, weight, bias, scale=scale)
        return hidden, ModelState(new_states), out
