"""A trace-friendly one-token step of a CausalLM, with every layer's state as flat tensors (for ONNX).

The layers' own ``step`` methods validate their inputs (Python-side shape and value checks) and Mamba's runs a
numba kernel on CPU; neither can be traced. Here each mixer's step is the same arithmetic in plain torch ops
on the layer's own parameters (tested against the layer's ``step``). States per layer (batch first):

    mamba    conv (B, d_inner, K-1), ssm (B, d_inner, N)
    mamba2   conv (B, d_inner + 2 G N, K-1), ssm (B, H, P, N)
    gated    h (B, d_state)                        rglru   h (B, d_state)
    s4d      s (B, d_model, N/2, 2)                the complex state as (real, imag)
    attn     k, v (B, heads, T, head_dim) (T grows by one per step), pos (B,) int64
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import Attention, AttentionState
from ..layers.gated import RGLRU, GatedSSM, GatedSSMState, RGLRUState
from ..layers.mamba import Mamba, MambaState
from ..layers.mamba2 import Mamba2, Mamba2State
from ..layers.s4d import S4D, S4DState
from ..models.heads import CausalLM
from ..models.outputs import ModelState
from ..ops.mamba_step import _torch_step

SUPPORTED = ("mamba", "mamba2", "s4d", "gated", "rglru", "attn")


def _conv_step(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    window = torch.cat([state, x.unsqueeze(-1)], -1)
    y = (window * weight[:, 0]).sum(-1)
    return (y if bias is None else y + bias), window[:, :, 1:]


def _mamba(m: Mamba, x: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, ...]:
    return _torch_step(x, m.step_weights(), conv, ssm)


def _mamba2(m: Mamba2, x: Tensor, conv: Tensor, ssm: Tensor) -> tuple[Tensor, ...]:
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    z, xBC, dt = m.in_proj(x).split([m.d_inner, m.conv_dim, H], dim=-1)
    xBC, conv = _conv_step(xBC, m.conv1d.weight, m.conv1d.bias, conv)
    xs, B, C = F.silu(xBC).split([m.d_inner, G * N, G * N], dim=-1)
    dt = F.softplus(dt + m.dt_bias)
    lo, hi = m.dt_limit
    if lo > 0.0 or hi < float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    dA = torch.exp(dt * -torch.exp(m.A_log))  # (batch, H)
    xh = xs.unflatten(-1, (G, H // G, P))
    hg = ssm.unflatten(1, (G, H // G))  # (batch, G, H/G, P, N)
    dBx = (dt.unflatten(-1, (G, H // G)).unsqueeze(-1) * xh).unsqueeze(-1) * B.unflatten(-1, (G, 1, 1, N))
    hg = torch.addcmul(dBx, hg, dA.unflatten(-1, (G, H // G, 1, 1)))
    y = (hg @ C.unflatten(-1, (G, 1, N, 1))).squeeze(-1)  # (batch, G, H/G, P)
    y = torch.addcmul(y, xh, m.D.view(G, H // G, 1)).flatten(1)
    return m.out_proj(m.norm(y, z)), conv, hg.flatten(1, 2)


def _gated(m: GatedSSM, x: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    f, b, o = m._gates(x)
    h = f * h + b
    return m.out_proj(o * h), h


def _rglru(m: RGLRU, x: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    a, b, g = m._coeffs(x)
    h = a * h + b
    return m._out(h, g), h


class _S4DStep(nn.Module):
    """S4D's step with its discretised (complex) parameters frozen into real buffers (eval-time constants)."""

    def __init__(self, m: S4D) -> None:
        super().__init__()
        self.m = m
        with torch.no_grad():
            dA, _, dB, C = m.discrete()
        for name, t in (("dA", dA), ("dB", dB), ("C", C)):
            self.register_buffer(name, torch.view_as_real(t.detach()).clone(), persistent=False)

    def forward(self, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        ar, ai = self.dA[..., 0], self.dA[..., 1]
        sr, si = s[..., 0], s[..., 1]
        xr = x.unsqueeze(-1)
        nr = ar * sr - ai * si + self.dB[..., 0] * xr
        ni = ar * si + ai * sr + self.dB[..., 1] * xr
        y = 2 * (nr * self.C[..., 0] - ni * self.C[..., 1]).sum(-1) + x * self.m.D
        return self.m.out(y), torch.stack([nr, ni], -1)


def _attention(m: Attention, x: Tensor, kc: Tensor, vc: Tensor, pos: Tensor) -> tuple[Tensor, ...]:
    batch = x.shape[0]
    q, k, v = m.qkv(x).unflatten(-1, (3, m.n_heads, m.head_dim)).unsqueeze(3).unbind(1)  # (B, heads, 1, hd)
    if m.rotary:
        q, k = m._rotate(q, pos[:, None]), m._rotate(k, pos[:, None])
    keys, vals = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
    if m.window is not None:
        keys, vals = keys[:, :, -m.window:], vals[:, :, -m.window:]
    n_keys = keys.shape[2]
    # only the last min(pos + 1, n_keys) entries belong to the current segment (see AttentionState)
    idx = torch.arange(n_keys, device=x.device)[None, :]
    visible = idx >= (n_keys - torch.clamp(pos + 1, max=n_keys))[:, None]
    out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=visible[:, None, None, :])
    return m.out_proj(out.transpose(1, 2).reshape(batch, m.d_model)), keys, vals, pos + 1


def layer_fields(mixer: nn.Module) -> tuple[str, ...]:
    """The names of a mixer's flat state tensors."""
    if isinstance(mixer, (Mamba, Mamba2)):
        return ("conv", "ssm")
    if isinstance(mixer, (GatedSSM, RGLRU)):
        return ("h",)
    if isinstance(mixer, S4D):
        return ("s",)
    if isinstance(mixer, Attention):
        return ("k", "v", "pos")
    raise TypeError(type(mixer).__name__)


def state_to_flat(state: ModelState) -> list[Tensor]:
    """An ssmkit ModelState as the flat tensor list of :class:`StepModule` (S4D's complex state as pairs)."""
    out = []
    for s in state.layers:
        if isinstance(s, S4DState):
            out.append(torch.view_as_real(s.s).contiguous())
        else:
            out.extend(s.tensors().values())
    return out


def flat_to_state(model: CausalLM, flat: list[Tensor]) -> ModelState:
    """The inverse of :func:`state_to_flat`."""
    layers, k = [], 0
    for block in model.backbone.blocks:
        m = block.mixer
        n = len(layer_fields(m))
        t = flat[k:k + n]
        k += n
        if isinstance(m, Mamba):
            layers.append(MambaState(conv=t[0], ssm=t[1]))
        elif isinstance(m, Mamba2):
            layers.append(Mamba2State(conv=t[0], ssm=t[1]))
        elif isinstance(m, GatedSSM):
            layers.append(GatedSSMState(h=t[0]))
        elif isinstance(m, RGLRU):
            layers.append(RGLRUState(h=t[0]))
        elif isinstance(m, S4D):
            layers.append(S4DState(s=torch.view_as_complex(t[0].contiguous())))
        else:
            layers.append(AttentionState(k=t[0], v=t[1], pos=t[2]))
    return ModelState(layers)


def check_onnx_exportable(model: object) -> None:
    """ValueError naming what ONNX export supports, unless ``model`` is one."""
    supported = (f"a float32 CausalLM whose layers are causal {', '.join(SUPPORTED)} (attn with mask 'causal' "
                 f"or 'sliding')")
    if type(model) is not CausalLM:
        raise ValueError(f"ONNX export supports {supported}; got a {type(model).__name__}")
    if model.lm_head.weight.dtype != torch.float32:
        raise ValueError(f"ONNX export supports {supported}; the model is {model.lm_head.weight.dtype} (cast "
                         f"with .float())")
    for field in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(model.config, field) != 1.0:
            raise ValueError(f"ONNX export supports {supported} and every muP multiplier 1.0; the config has "
                             f"{field}={getattr(model.config, field)!r}")
    for i, (name, block) in enumerate(zip(model.backbone.mixer_names, model.backbone.blocks, strict=True)):
        m = block.mixer
        ok = name in SUPPORTED and not getattr(m, "reverse", False)
        if isinstance(m, Attention):
            ok = ok and m.mask in ("causal", "sliding")
        if isinstance(m, Mamba) and (m.x_proj.bias is not None or m.variant):  # variant: no traced step
            ok = False
        if not ok:
            raise ValueError(f"ONNX export supports {supported}; layer {i} is {name!r}")


class StepModule(nn.Module):
    """forward(token (B,) int64, *states) -> (logits (B, vocab), *new states): CausalLM.step, traceable."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        check_onnx_exportable(model)
        self.model = model
        self.s4d = nn.ModuleDict({str(i): _S4DStep(b.mixer) for i, b in enumerate(model.backbone.blocks)
                                  if isinstance(b.mixer, S4D)})
        self.fields = [layer_fields(b.mixer) for b in model.backbone.blocks]

    def _mixer_step(self, i: int, m: nn.Module) -> Callable[..., tuple[Tensor, ...]]:
        if isinstance(m, Mamba):
            return lambda x, *s: _mamba(m, x, *s)
        if isinstance(m, Mamba2):
            return lambda x, *s: _mamba2(m, x, *s)
        if isinstance(m, GatedSSM):
            return lambda x, *s: _gated(m, x, *s)
        if isinstance(m, RGLRU):
            return lambda x, *s: _rglru(m, x, *s)
        if isinstance(m, S4D):
            return self.s4d[str(i)]
        return lambda x, *s: _attention(m, x, *s)

    def forward(self, token: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        bb = self.model.backbone
        h = bb.embedding(token)
        new: list[Tensor] = []
        k = 0
        for i, (block, fields) in enumerate(zip(bb.blocks, self.fields, strict=True)):
            y, *s = self._mixer_step(i, block.mixer)(block.norm(h), *states[k:k + len(fields)])
            k += len(fields)
            h = h + y
            if block.mlp is not None:
                h = h + block.mlp(block.mlp_norm(h))
            new.extend(s)
        return (self.model.lm_head(bb.final_norm(h)), *new)
