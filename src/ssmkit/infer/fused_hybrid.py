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

import torch
from torch import Tensor

from ..layers.attention import AttentionState
from ..layers.ffn import NoState
from ..layers.mamba2 import Mamba2State
from ..models.heads import CausalLM
from ..models.outputs import ModelState
from ..ops.decode_linear import decode_fusable
from ..ops.mamba_step import _stacked
from ..ops.threads import kernel_threads
from .hybrid_plan import HybridPlan, hybrid_plan

_GROW = 256  # the least number of free KV slots a new buffer gets
_CLAIM = threading.Lock()  # held while a step finds its KV buffers and claims their next slot


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
