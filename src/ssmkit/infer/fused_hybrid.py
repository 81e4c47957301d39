"""The decode step of a hybrid CausalLM (Mamba-2, grouped-query attention and MLP blocks, e.g. NemotronH or Bamba
converted from transformers) in one kernel launch, LM head included (:mod:`ssmkit.ops._numba_decode_hybrid`).

    out = hybrid_step(model, token_ids, state)   # (logits (batch, vocab), new state), or None: use model.step

Eligible: every block a pre-RMSNorm residual block (no block MLP, no active dropout) whose mixer is a plain
``Mamba2`` (the blocks all of one shape), a ``FeedForward`` or a ``GQAttention`` (the attention blocks all of one
shape), a final RMSNorm and an ``nn.Linear`` head, float32 or float64 weights on CPU, no gradient needed. The
result equals :meth:`CausalLM.step` up to float rounding (tests compare both in float64).

KV cache: an attention layer's state keeps the usual :class:`~ssmkit.layers.attention.AttentionState` (k, v
(batch, kv_heads, cache_len, head_dim)), but after a fused step its k and v are views of one buffer per model state
(attention layers x batch x kv_heads x capacity x head_dim) with room to grow, so the next step writes its key
and value in place instead of copying the cache. A slot is written only once (the buffer records how far it is
filled): stepping twice from the same state (speculation, retries) copies the cache for the second step, so an
older state never changes. Slots are claimed under a lock before the launch (and launches hold
:data:`ssmkit.ops.threads.KERNEL_LOCK`), so threads stepping from one state at once each get their own slot or
copy: the step is thread-safe.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor, nn

from ..layers.attention import AttentionState
from ..layers.base import linear_weights
from ..layers.ffn import FeedForward, NoState
from ..layers.gqa import GQAttention
from ..layers.mamba2 import Mamba2, Mamba2State
from ..models.fused_decode import _REGISTRATIONS, WeightsKey, _hold, mamba2_step_weights
from ..models.heads import CausalLM
from ..models.outputs import ModelState
from ..ops.decode_linear import decode_fusable
from ..ops.mamba_step import _stacked
from ..ops.threads import kernel_threads

_GROW = 256  # the least number of free KV slots a new buffer gets
_CLAIM = threading.Lock()  # held while a step finds its KV buffers and claims their next slot


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


def _kv_buffers(states: list[AttentionState], plan: HybridPlan) -> tuple[Tensor, Tensor, int, int] | None:
    """(K, V buffers (n_att, batch, kv_heads, capacity, head_dim), start, end): the attention states' caches as
    slots [start, end) of buffers whose slot ``end`` is free, reusing the previous fused step's buffers when the
    states are their views and nobody wrote past them, else copying the caches into new buffers. None when the
    layers' caches differ in length or their positions differ."""
    k0 = states[0].k
    n = k0.shape[2]
    if any(s.k.shape[2] != n or not torch.equal(s.pos, states[0].pos) for s in states[1:]):
        return None
    K, V = k0._base, states[0].v._base
    if (K is not None and V is not None and getattr(K, "_ssmkit_filled", None) is not None
            and K.shape[0] == len(states) and K.shape[1:3] == k0.shape[:2] and K.shape[4] == k0.shape[3]):
        start = (k0.storage_offset() - K[0].storage_offset()) // K.stride(3)
        end = start + n
        if (K._ssmkit_filled == end and end < K.shape[3] and V._ssmkit_filled == end and V.shape == K.shape
                and all(s.k._base is K and s.v._base is V and s.k.data_ptr() == K[i, :, :, start].data_ptr()
                        and s.v.data_ptr() == V[i, :, :, start].data_ptr() and s.k.stride() == K[i].stride()
                        and s.v.stride() == V[i].stride() for i, s in enumerate(states))):
            return K, V, start, end
    cap = n + max(_GROW, n // 4)
    K = k0.new_empty(len(states), k0.shape[0], k0.shape[1], cap, k0.shape[3])
    V = torch.empty_like(K)
    for i, s in enumerate(states):
        K[i, :, :, :n] = s.k
        V[i, :, :, :n] = s.v
    return K, V, 0, n


def hybrid_step(model: CausalLM, token_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState] | None:
    """One token per sequence through an eligible hybrid CausalLM in one launch: token_ids (batch,) -> (logits
    (batch, vocab), new state), as :meth:`CausalLM.step` returns them; None when the model, the state or the call
    does not fit (then call ``model.step``)."""
    from ..ops import _numba_decode as D
    from ..ops import _numba_decode_hybrid as K

    if not isinstance(model, CausalLM) or not isinstance(state, ModelState):
        return None
    plan = hybrid_plan(model)
    bb = model.backbone
    if plan is None or len(state.layers) != len(bb.blocks):
        return None
    layers = state.layers
    want = {K.MAMBA2: Mamba2State, K.FFN: NoState, K.GQA: AttentionState}
    if any(type(s) is not want[int(k)] for s, k in zip(layers, plan.kinds, strict=True)):
        return None
    token_ids = bb.check_inputs(token_ids, "token_ids", step=True)
    h = bb.embed(token_ids)
    batch = h.shape[0]
    m2 = [s for s in layers if type(s) is Mamba2State]
    att = [s for s in layers if type(s) is AttentionState]
    di, n_conv, heads, p, n_state = plan.m2_dims
    n_heads, n_kv, head_dim = plan.att_shape
    if batch == 0 or h.dtype != plan.dtype or not decode_fusable(h, plan.tensors):
        return None
    for s in m2:
        if s.conv.shape[:2] != (batch, n_conv) or s.ssm.shape != (batch, heads, p, n_state) or s.conv.dtype != h.dtype \
                or s.ssm.dtype != h.dtype:
            return None
    for s in att:
        if s.k.shape[:2] != (batch, n_kv) or s.k.shape[3] != head_dim or s.k.shape != s.v.shape \
                or s.k.dtype != h.dtype or s.v.dtype != h.dtype or s.pos.shape != (batch,):
            return None
    if m2:
        conv_all, ssm_all = _stacked([s.conv for s in m2]), _stacked([s.ssm for s in m2])
    else:
        conv_all, ssm_all = h.new_zeros(1, batch, 1, 1), h.new_zeros(1, batch, 1, 1, 1)
    conv_new, ssm_new = torch.empty_like(conv_all), torch.empty_like(ssm_all)
    if att:
        with _CLAIM:  # claim slot `end` before the launch: a second step from this state copies the caches
            kv = _kv_buffers(att, plan)
            if kv is None:
                return None
            k_buf, v_buf, start, end = kv
            k_buf._ssmkit_filled = v_buf._ssmkit_filled = end + 1
        pos = att[0].pos
        n = end - start
        pos = pos.contiguous()
        row_lo = (end - pos.clamp(max=n)).contiguous()
    else:
        k_buf = v_buf = h.new_zeros(1, batch, 1, 1, 1)
        start = end = n = 0
        pos = row_lo = torch.zeros(batch, dtype=torch.long)
    resid = h.detach().clone()
    out = torch.empty_like(resid)
    logits = h.new_empty(batch, plan.head[0].shape[0])
    scratch = [h.new_empty(batch, k) for k in (h.shape[1], di, n_conv, 2 * heads, di)]
    scratch += [h.new_empty(batch * plan.hidden)]
    scratch += [h.new_empty(batch, k) for k in ((n_heads + 2 * n_kv) * head_dim, n_heads * head_dim)]
    n_layers = len(layers)
    with kernel_threads(plan.work * batch) as threads:
        counters = torch.zeros(D.counter_slots(K.STAGES * n_layers + 2, threads), dtype=torch.int64)
        K.hybrid_stack(
            resid.numpy(), plan.kinds, plan.index, plan.norm_w, plan.norm_eps, plan.res_mult, *plan.final,
            *plan.m2, plan.m2_consts, plan.ngroups, *plan.m2_out, conv_all.numpy(),
            ssm_all.view(ssm_all.shape[0], batch, -1, ssm_all.shape[-1]).numpy(), conv_new.numpy(),
            ssm_new.view(ssm_all.shape[0], batch, -1, ssm_all.shape[-1]).numpy(),
            *plan.ffn, plan.f_acts, plan.f_consts,
            *plan.att, plan.inv_freq, plan.a_consts, n_heads, n_kv, k_buf.numpy(), v_buf.numpy(), end,
            row_lo.numpy(), pos.to(h.dtype).numpy(), *(t.numpy() for t in scratch), out.numpy(), *plan.head,
            logits.numpy(), counters.numpy(), threads)
    new, convs, ssms = [], iter(conv_new.unbind(0)), iter(ssm_new.unbind(0))
    if att:
        hi = int(pos.max())
        first = start + (n + 1) - min(hi + 1, n + 1)  # entries no row can see again are dropped, as GQAttention does
        new_pos = pos + 1
    a = 0
    for s in layers:
        if type(s) is Mamba2State:
            new.append(Mamba2State(conv=next(convs), ssm=next(ssms)))
        elif type(s) is AttentionState:
            new.append(AttentionState(k=k_buf[a, :, :, first:end + 1], v=v_buf[a, :, :, first:end + 1], pos=new_pos))
            a += 1
        else:
            new.append(s)
    return logits, ModelState(new)


def decode_step(model: CausalLM, token_ids: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
    """The decode step generation uses: :func:`hybrid_step` when it applies, else ``model.step``."""
    out = hybrid_step(model, token_ids, state) if not torch.is_grad_enabled() else None
    return model.step(token_ids, state) if out is None else out
