"""Decoding a W8A8 model: the recurrent step with the forward's integer products and static scales.

:func:`ssmkit.infer.w8a8.quantize_w8a8` calls :func:`enable_w8a8_step` on its copy, which
- makes every plain ``Mamba`` mixer a :class:`W8A8Mamba`, whose ``step`` calls its W8A8 projections (the plain
  Mamba step reads the projection weights directly, as float or weight-only int8, and a W8A8 layer has neither);
- makes the backbone a :class:`W8A8Backbone`, whose ``step_with_head`` steps block by block and calls the head
  through its forward (the fused one-launch decode and the plain head product read weights directly too).

Both are subclasses that add no state, so the copy keeps its parameters, buffers and ``state_dict`` keys. Other
mixers (Mamba-2, attention, GatedSSM, ...) already step through their layers' forward, so they run the same
W8A8 products in ``step`` as in the forward. Stepping a sequence token by token therefore quantizes every
activation with the same static scale as the forward and multiplies the same int8 codes exactly; the two differ
only by the float rounding of the parts that stay float (the scan, conv, norms), which can move a value across a
rounding boundary of its int8 code (tests check that every such difference sits on a boundary, and that in
float64 step and forward agree to 1e-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.mamba import Mamba, MambaState
from ..models.backbone import Backbone
from ..models.outputs import ModelState


class W8A8Mamba(Mamba):
    """A Mamba mixer whose projections are W8A8 layers: ``step`` runs them through their forward."""

    def step(self, x_t: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One token: x_t (batch, d_model) -> (y_t (batch, d_model), new state); the recurrence of
        :func:`ssmkit.ops.mamba_step` with in_proj, x_proj and out_proj called as modules."""
        x_t = self.check_step_input(x_t)
        self.check_dtype(x_t, "x_t")
        self._check_state(state, x_t)
        xi, z = self.in_proj(x_t).chunk(2, dim=-1)  # (batch, d_inner) each
        u, conv = self.conv1d.step(xi, state.conv)
        u = F.silu(u)
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        acc = state.ssm.dtype
        dt = F.softplus(F.linear(dt_low, self.dt_proj.weight, self.dt_proj.bias).to(acc))  # (batch, d_inner)
        uf = u.to(acc)
        dA = torch.exp(dt.unsqueeze(-1) * -torch.exp(self.A_log.to(acc)))  # (batch, d_inner, d_state)
        h = torch.addcmul(state.ssm * dA, (dt * uf).unsqueeze(-1), B.to(acc).unsqueeze(1))
        y = torch.bmm(h, C.to(acc).unsqueeze(-1)).squeeze(-1)
        y = torch.addcmul(y, uf, self.D.to(acc)) * F.silu(z.to(acc))
        return self.out_proj(y.to(x_t.dtype)), MambaState(conv=conv, ssm=h)

    def step_weights(self):
        raise TypeError("W8A8Mamba.step_weights: W8A8 projections quantize their inputs and have no weight-only "
                        "form; call step")


class W8A8Backbone(Backbone):
    """A backbone with W8A8 layers: ``step_with_head`` steps block by block and applies ``head`` as a module."""

    def step_with_head(
        self, inputs_t: Tensor, state: ModelState, head: nn.Module | None, *, input_name: str = "inputs_t"
    ) -> tuple[Tensor, ModelState, Tensor | None]:
        """One position: (hidden_t (batch, d_model), new state, head(hidden_t) or None)."""
        inputs_t = self.check_inputs(inputs_t, input_name, step=True)
        states = self._check_state(state).layers
        h = self.embed(inputs_t)
        new, embeddings = [], h
        for block, s in zip(self.blocks, states, strict=True):
            h, s = block.step(h, s, embeddings=embeddings)
            new.append(s)
        hidden = self.final_hidden(h)
        return hidden, ModelState(new), None if head is None else head(hidden)


def enable_w8a8_step(model: nn.Module) -> nn.Module:
    """Make ``model`` (a W8A8 copy, modified in place) step with its W8A8 layers (module docstring); returns it.

    Only plain ``Mamba`` mixers are converted; a subclass of Mamba with its own step keeps it (and fails there
    if it reads projection weights)."""
    for module in model.modules():
        if type(module) is Mamba and not module.variant:  # a variant steps through its modules already
            module.__class__ = W8A8Mamba
        elif type(module) is Backbone:
            module.__class__ = W8A8Backbone
    return model
