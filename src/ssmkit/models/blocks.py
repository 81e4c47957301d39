"""Building blocks: norms, MLPs and the pre-norm residual block around a sequence mixer.

Block (pre-norm residual):

    h = h + dropout(mixer(norm(h)))
    h = h + dropout(mlp(mlp_norm(h)))          (when the config has an MLP)

The residual stream ``h`` may be wider than the parameters (float32 for 16-bit models when
``residual_in_fp32``); norms compute in the residual dtype and hand the mixer/MLP their parameters' dtype.

A mixer with ``takes_residual = True`` (Zamba2's hybrid layer) gets no pre-norm: it reads ``h`` itself and the
model's input embeddings (``embeddings=``), and normalises what it needs on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.base import LayerState, SequenceLayer, state_kwargs
from . import registry


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dim, computed in (at least) float32.

    h: (..., d) in any float dtype -> (..., d) in the norm's parameter dtype.
    """

    def __init__(self, d: int, kind: str = "rmsnorm", eps: float = 1e-5) -> None:
        super().__init__()
        if kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"Norm: unknown kind {kind!r}; expected 'rmsnorm' or 'layernorm'")
        self.d, self.kind, self.eps = d, kind, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layernorm" else None

    def forward(self, h: Tensor) -> Tensor:
        acc = _acc_dtype(h.dtype)
        hf, w = h.to(acc), self.weight.to(acc)
        if self.kind == "rmsnorm":
            y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps) * w
        else:
            y = F.layer_norm(hf, (self.d,), w, self.bias.to(acc), self.eps)
        return y.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.d}, kind={self.kind!r}, eps={self.eps}"


class MLP(nn.Module):
    """Position-wise MLP: "gelu" (Linear, GELU, Linear; with biases) or "swiglu" (fused gate/up Linear,
    silu(gate) * up, Linear; no biases). x: (..., d_model) -> (..., d_model)."""

    def __init__(self, d_model: int, d_hidden: int, kind: str = "gelu") -> None:
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"MLP: unknown kind {kind!r}; expected 'gelu' or 'swiglu'")
        self.kind = kind
        if kind == "gelu":
            self.fc_in = nn.Linear(d_model, d_hidden)
            self.fc_out = nn.Linear(d_hidden, d_model)
        else:
            self.fc_in = nn.Linear(d_model, 2 * d_hidden, bias=False)
            self.fc_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gelu":
            return self.fc_out(F.gelu(self.fc_in(x)))
        gate, up = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(F.silu(gate) * up)


class Block(nn.Module):
    """A pre-norm residual block: a mixer sub-block and an optional MLP sub-block.

    Args:
        mixer_name: a name from :mod:`ssmkit.models.registry` (kept for errors and summaries).
        mixer: the sequence layer.
        d_model, norm, norm_eps: width and norm kind.
        mlp, d_mlp: "none" | "gelu" | "swiglu" and its hidden width.
        dropout: on each sub-block's output.
        index: the block's position in the backbone (for error messages).
        residual_multiplier: scales each sub-block's output before its residual add (1.0: no scaling).
    """

    def __init__(
        self,
        mixer_name: str,
        mixer: SequenceLayer,
        d_model: int,
        *,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        mlp: str = "none",
        d_mlp: int = 0,
        dropout: float = 0.0,
        index: int = 0,
        residual_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.mixer_name, self.index = mixer_name, index
        self.residual_multiplier = residual_multiplier
        spec = registry.get_spec(mixer_name)
        self.causal = spec.causal
        # prefix-* mixers, or a plain attn configured with mask="prefix"
        self.accepts_prefix = spec.accepts_prefix or getattr(mixer, "mask", None) == "prefix"
        #: the mixer reads the raw residual stream and the input embeddings (no pre-norm here)
        self.takes_residual = bool(getattr(mixer, "takes_residual", False))
        self.norm = None if self.takes_residual else Norm(d_model, norm, norm_eps)
        self.mixer = mixer
        self.mlp_norm = Norm(d_model, norm, norm_eps) if mlp != "none" else None
        self.mlp = MLP(d_model, d_mlp, mlp) if mlp != "none" else None
        self.dropout = nn.Dropout(dropout)

    @property
    def can_step(self) -> bool:
        return bool(self.mixer.can_step)

    def _where(self) -> str:
        return f"layer {self.index} ({self.mixer_name})"

    def scale_output(self, y: Tensor) -> Tensor:
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def _mlp(self, h: Tensor) -> Tensor:
        if self.mlp is None:
            return h
        return h + self.scale_output(self.dropout(self.mlp(self.mlp_norm(h)))).to(h.dtype)

    @state_kwargs
    def forward(
        self,
        h: Tensor,
        initial_state: LayerState | None = None,
        *,
        reset: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        return_final_state: bool = False,
        embeddings: Tensor | None = None,
    ) -> tuple[Tensor, LayerState | None]:
        """h: (batch, length, d_model) residual stream -> (new h, the mixer's new state or None). ``embeddings``
        (the model's input embeddings, like h) go to a ``takes_residual`` mixer and are ignored otherwise."""
        x, kw = self._mixer_input(h, embeddings)
        kw["reset"] = reset
        if prefix_mask is not None and self.accepts_prefix:
            kw["prefix_mask"] = prefix_mask
        try:
            if initial_state is None and not return_final_state:
                y, new_state = self.mixer(x, **kw), None
            else:
                if not self.can_step:
                    raise ValueError(f"{self._where()} is bidirectional and carries no state; state passing "
                                     f"(initial_state / return_final_state) needs causal layers")
                y, new_state = self.mixer(x, initial_state, return_final_state=True, **kw)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError):
                raise
            raise type(e)(f"{self._where()}: {e}") from e
        h = h + self.scale_output(self.dropout(y)).to(h.dtype)
        return self._mlp(h), new_state

    def _mixer_input(self, h: Tensor, embeddings: Tensor | None) -> tuple[Tensor, dict]:
        """(the mixer's input, its extra keyword arguments)."""
        if not self.takes_residual:
            return self.norm(h), {}
        return h, {"embeddings": embeddings}

    def step(self, h_t: Tensor, state: LayerState, *, embeddings: Tensor | None = None) -> tuple[Tensor, LayerState]:
        """One position: h_t (batch, d_model) -> (new h_t, new mixer state)."""
        x, kw = self._mixer_input(h_t, embeddings)
        try:
            y, state = self.mixer.step(x, state, **kw)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError):
                raise
            raise type(e)(f"{self._where()}: {e}") from e
        h_t = h_t + self.scale_output(self.dropout(y)).to(h_t.dtype)
        return self._mlp(h_t), state

    def init_state(self, batch_size: int, dtype: torch.dtype | None = None) -> LayerState:
        if not self.can_step:
            raise NotImplementedError(f"{self._where()} is bidirectional: it has no recurrent state and "
                                      f"cannot step token by token")
        return self.mixer.init_state(batch_size, dtype=dtype)
