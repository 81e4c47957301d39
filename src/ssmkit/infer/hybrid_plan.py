"""The plan of :mod:`ssmkit.infer.fused_hybrid`'s one-launch hybrid decode step (and of the fused verify pass,
:mod:`ssmkit.infer.spec_hybrid`): which hybrid CausalLMs the kernels take, and their weights as numpy views and
typed lists per block kind, cached per model and rebuilt when its modules, weights or settings change.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..layers.base import linear_weights
from ..layers.ffn import FeedForward
from ..layers.gqa import GQAttention
from ..layers.mamba2 import Mamba2
from ..models._fused_cache import _REGISTRATIONS, _hold
from ..models.fused_decode import WeightsKey, mamba2_step_weights
from ..models.heads import CausalLM


class HybridPlan:
    """A hybrid CausalLM's weights prepared for :func:`hybrid_step` (numpy views, typed lists per block kind)."""

    def __init__(self, model: CausalLM) -> None:
        from numba.typed import List

        from ..ops import _numba_decode_hybrid as K

        bb = model.backbone
        like = bb.final_norm.weight
        self.dtype = like.dtype
        np_ = lambda t: (like.new_empty(0) if t is None else t.detach()).contiguous().numpy()  # noqa: E731
        kinds, index, m2, ffn, att, tensors = [], [], [], [], [], []
        for block in bb.blocks:
            mixer = block.mixer
            if type(mixer) is Mamba2:
                w = mamba2_step_weights(mixer)
                kinds.append(K.MAMBA2)
                index.append(len(m2))
                m2.append(w)
                tensors += w.tensors()
            elif type(mixer) is FeedForward:
                mlp = mixer.mlp
                lin = [mlp.up_proj, mlp.gate_proj, mlp.down_proj]
                kinds.append(K.FFN)
                index.append(len(ffn))
                ffn.append((mlp, lin))
                tensors += [p for m in lin if m is not None for p in (m.weight, m.bias) if p is not None]
            else:
                kinds.append(K.GQA)
                index.append(len(att))
                att.append(mixer)
                tensors += [p for m in (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.o_proj)
                            for p in (m.weight, m.bias) if p is not None]
            tensors.append(block.norm.weight)
        head_w, _, head_b = linear_weights(model.lm_head)
        tensors += [bb.final_norm.weight, head_w] + ([head_b] if head_b is not None else [])
        # the block norms and q/k/v are copied into stacked arrays below: their in-place updates must rebuild
        copied = [b.norm.weight for b in bb.blocks] + [p for m in att for lin in (m.q_proj, m.k_proj, m.v_proj)
                                                       for p in (lin.weight, lin.bias) if p is not None]
        self.key, self.tensors = WeightsKey(tensors, copied), tensors
        self.kinds, self.index = torch.tensor(kinds).numpy(), torch.tensor(index).numpy()
        self.norm_w = torch.stack([b.norm.weight.detach() for b in bb.blocks]).numpy()
        self.norm_eps = torch.tensor([b.norm.eps for b in bb.blocks], dtype=like.dtype).numpy()
        self.res_mult = torch.tensor([float(b.residual_multiplier) for b in bb.blocks], dtype=like.dtype).numpy()
        self.final = (np_(bb.final_norm.weight), float(bb.final_norm.eps), float(bb.config.logits_scaling))
        self.head = (np_(head_w), np_(head_b))
        d = like.shape[0]
        lst = lambda arrs, *shape: List(arrs if arrs else [np_(like.new_zeros(*shape))])  # noqa: E731
        # Mamba-2 blocks
        self.n_m2 = len(m2)
        big = float(torch.finfo(torch.float32).max)
        self.m2 = [lst([np_(getattr(w, f)) for w in m2], *shp) for f, shp in (
            ("in_w", (1, d)), ("in_b", (0,)), ("conv_w", (1, 1)), ("conv_b", (0,)), ("dt_b", (1,)),
            ("a_log", (1,)), ("d", (1,)), ("norm_w", (1,)))]
        self.m2_consts = torch.tensor([[w.dt_limit[0], min(w.dt_limit[1], big), w.norm_eps] for w in m2] or [[0, 1, 1]],
                                      dtype=like.dtype).numpy()
        self.m2_out = [lst([np_(w.out_w) for w in m2], d, 1), lst([np_(w.out_b) for w in m2], 0)]
        self.ngroups = m2[0].ngroups if m2 else 1
        self.m2_dims = m2[0].dims() if m2 else (1, 1, 1, 1, 1)
        # MLP blocks
        f_arrays: list[list] = [[], [], [], [], [], []]
        for _, lin in ffn:
            for j, m in enumerate(lin):
                f_arrays[2 * j].append(np_(m.weight if m is not None else like.new_zeros(0, d)))
                f_arrays[2 * j + 1].append(np_(m.bias if m is not None else None))
        self.ffn = [lst(a, *shp) for a, shp in zip(f_arrays, [(1, d), (0,), (0, d), (0,), (d, 1), (0,)], strict=True)]
        self.f_acts = torch.tensor([K.ACTS[mlp.act] for mlp, _ in ffn] or [0], dtype=torch.int64).numpy()
        self.f_consts = torch.tensor([[mlp.gate_multiplier, mlp.down_multiplier] for mlp, _ in ffn] or [[1, 1]],
                                     dtype=like.dtype).numpy()
        self.hidden = max([lin[0].weight.shape[0] for _, lin in ffn] or [1])
        # attention blocks
        self.n_att = len(att)
        a0 = att[0] if att else None
        self.att_shape = (a0.n_heads, a0.n_kv_heads, a0.head_dim) if att else (1, 1, 1)
        qkv_w = [torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]).detach() for m in att]
        qkv_b = [torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]).detach() if m.q_proj.bias is not None
                 else None for m in att]
        self.att = [lst([np_(w) for w in qkv_w], 1, d), lst([np_(b) for b in qkv_b], 0),
                    lst([np_(m.o_proj.weight) for m in att], d, 1), lst([np_(m.o_proj.bias) for m in att], 0)]
        freqs = []
        for m in att:
            cdt = torch.promote_types(like.dtype, torch.float32)
            r = m.rotary_dim
            freqs.append(np_((m.rotary_base ** (-torch.arange(0, r, 2, dtype=cdt) / r)).to(like.dtype)))
        self.inv_freq = lst(freqs, 0)
        self.a_consts = torch.tensor([[m.scale if m.scale is not None else m.head_dim ** -0.5, m.key_multiplier]
                                      for m in att] or [[1, 1]], dtype=like.dtype).numpy()
        self.work = sum(t.numel() for t in tensors)


def _eligible(model: CausalLM) -> bool:
    """Whether every block and the head fit the kernel (module docstring)."""
    bb = model.backbone
    if bb.final_norm.kind != "rmsnorm" or type(model.lm_head) is not nn.Linear:
        return False
    like = bb.final_norm.weight
    if like.dtype not in (torch.float32, torch.float64) or like.device.type != "cpu":
        return False
    m2, att = [], []
    for block in bb.blocks:
        norm, mixer = block._modules.get("norm"), block.mixer
        if norm is None or norm.kind != "rmsnorm" or block.mlp is not None or (block.training and block.dropout.p > 0):
            return False
        if type(mixer) is Mamba2 and not getattr(mixer, "variant", False):
            m2.append(mamba2_step_weights(mixer))
        elif type(mixer) is GQAttention:
            att.append((mixer.n_heads, mixer.n_kv_heads, mixer.head_dim))
            lin = [mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.o_proj]
        elif type(mixer) is FeedForward:
            lin = [m for m in (mixer.mlp.up_proj, mixer.mlp.gate_proj, mixer.mlp.down_proj) if m is not None]
        else:
            return False
        if type(mixer) is not Mamba2 and any(type(m) is not nn.Linear for m in lin):  # int8/int4 layers
            return False
    if any(w.in_scale is not None or w.out_scale is not None or w.dims() != m2[0].dims() or w.ngroups != m2[0].ngroups
           for w in m2):
        return False
    if len(set(att)) > 1:
        return False
    return all(p.dtype == like.dtype and p.device == like.device for p in model.parameters())


def _settings(model: CausalLM) -> tuple:
    """Plain attributes the plan copies (no registration hook sees a change of them)."""
    bb = model.backbone
    out = [bb.final_norm.eps, bb.config.logits_scaling]
    for b in bb.blocks:
        m = b._modules["mixer"]
        out += [b.training, b.residual_multiplier, getattr(b._modules.get("norm"), "eps", None),
                getattr(m, "variant", None)]
        if type(m) is Mamba2:
            out += [m.ngroups, tuple(m.dt_limit), m._modules["norm"].eps]
        elif type(m) is FeedForward:
            mlp = m._modules["mlp"]
            out += [mlp.act, mlp.gate_multiplier, mlp.down_multiplier]
        elif type(m) is GQAttention:
            out += [m.rotary_dim, m.rotary_base, m.scale, m.key_multiplier]
    return tuple(out)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hybrid_plan(model: CausalLM) -> HybridPlan | None:
    """The model's (cached) plan, rebuilt when its modules, weights or settings changed; None if not eligible."""
    cached = _PLANS.get(model)
    settings = _settings(model)
    if cached is not None and cached[0] == _REGISTRATIONS[0] and cached[1] == settings and (
            cached[2] is None or cached[2].key.matches(cached[2].tensors)):
        return cached[2]
    if cached is None:
        _hold(model)
    registrations = _REGISTRATIONS[0]
    plan = HybridPlan(model) if _eligible(model) else None
    _PLANS[model] = (registrations, settings, plan)
    return plan
