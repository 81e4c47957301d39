"""Fused verify pass and greedy speculative rounds for a hybrid target (Mamba-2, grouped-query attention and MLP
blocks, the stacks :mod:`ssmkit.infer.fused_hybrid` fuses) with a pure-Mamba draft.

    st = HybridSpecState.from_state(plan, state, room)     # the target's state in the kernels' layout
    logits, rec = hybrid_verify(model, plan, tokens, st)    # tokens (B, T) -> logits (B, T, vocab), one launch
    commit(st, rec, keep)                                    # keep (B,): row b keeps its first keep[b] tokens

The verify launch (:func:`ssmkit.ops._numba_verify_hybrid.verify_stack`) reads every weight once for all B * T
tokens; the Mamba-2 states are then advanced through each row's kept tokens from the per-position inputs the pass
kept (one small launch), and the attention rollback is each row's cache length (rows keep their own lengths, so
ragged acceptance moves no cache entry). :func:`hybrid_rounds` is the greedy chain loop of
:func:`ssmkit.infer.speculative_generate` on top: the draft drafts its chain in one launch
(:func:`~ssmkit.infer.fused_spec.fused_draft`), the target verifies, the longest agreeing prefix plus the target's
own token is emitted. Its tokens are plain greedy's (the verify logits equal single fused steps').
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..layers.attention import AttentionState
from ..layers.ffn import NoState
from ..layers.mamba2 import Mamba2State
from ..models.heads import CausalLM
from ..models.outputs import ModelState
from ..ops.threads import kernel_threads
from .fused_spec import fused_draft
from .hybrid_plan import HybridPlan, hybrid_plan


def spec_plan(model: CausalLM, state: ModelState) -> HybridPlan | None:
    """The target's fused hybrid plan if the verify kernel can run it from ``state``, else None."""
    from ..ops import _numba_decode_hybrid as K

    if not isinstance(model, CausalLM) or not isinstance(state, ModelState) or torch.is_grad_enabled():
        return None
    plan = hybrid_plan(model)
    if plan is None or len(state.layers) != len(plan.kinds):
        return None
    want = {K.MAMBA2: Mamba2State, K.FFN: NoState, K.GQA: AttentionState}
    if any(type(s) is not want[int(k)] for s, k in zip(state.layers, plan.kinds, strict=True)):
        return None
    att = [s for s in state.layers if type(s) is AttentionState]
    if any(s.k.shape[2] != att[0].k.shape[2] or not torch.equal(s.pos, att[0].pos) for s in att):
        return None
    tensors = [t for s in state.layers for t in vars(s).values() if isinstance(t, Tensor) and t.is_floating_point()]
    return plan if all(t.dtype == plan.dtype and t.device.type == "cpu" for t in tensors) else None


class HybridSpecState:
    """A hybrid target's state for the verify kernels: conv (n_m2, B, C, K - 1), ssm (n_m2, B, Di, N), KV buffers
    (n_att, B, n_kv, cap, D) with row b's cache in slots [0, lens[b]), pos (B,) the next rotary positions."""

    def __init__(self, conv: Tensor, ssm: Tensor, k_buf: Tensor, v_buf: Tensor, lens: Tensor, pos: Tensor) -> None:
        self.conv, self.ssm, self.k_buf, self.v_buf, self.lens, self.pos = conv, ssm, k_buf, v_buf, lens, pos

    @classmethod
    def from_state(cls, plan: HybridPlan, state: ModelState, room: int) -> HybridSpecState:
        """The ModelState (as ``model.step`` takes it) with room for ``room`` more tokens in the KV buffers."""
        layers = state.layers
        m2 = [s for s in layers if type(s) is Mamba2State]
        att = [s for s in layers if type(s) is AttentionState]
        batch = m2[0].conv.shape[0] if m2 else att[0].k.shape[0]
        like = torch.empty(0, dtype=plan.dtype)
        if m2:
            conv = torch.stack([s.conv for s in m2]).contiguous()
            ssm = torch.stack([s.ssm.reshape(batch, -1, s.ssm.shape[-1]) for s in m2]).contiguous()
        else:
            conv, ssm = like.new_zeros(0, batch, 1, 1), like.new_zeros(0, batch, 1, 1)
        if att:
            n = att[0].k.shape[2]
            pos = att[0].pos.clone()
            lens = pos.clamp(max=n)
            cap = n + room
            k_buf = like.new_zeros(len(att), batch, att[0].k.shape[1], cap, att[0].k.shape[3])
            v_buf = torch.zeros_like(k_buf)
            for b in range(batch):  # right-aligned rows (pos masks the left) to left-aligned ones
                m = int(lens[b])
                for i, s in enumerate(att):
                    k_buf[i, b, :, :m] = s.k[b, :, n - m:]
                    v_buf[i, b, :, :m] = s.v[b, :, n - m:]
        else:
            k_buf = v_buf = like.new_zeros(0, batch, 1, 1, 1)
            lens, pos = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
        return cls(conv, ssm, k_buf, v_buf, lens, pos)

    def to_state(self, plan: HybridPlan) -> ModelState:
        """The ModelState ``model.step`` takes (attention caches right-aligned, as GQAttention keeps them)."""
        from ..ops import _numba_decode_hybrid as K

        heads = plan.m2_dims[2]
        n = int(self.lens.max()) if self.lens.numel() else 0
        out = []
        for kind, i in zip(plan.kinds.tolist(), plan.index.tolist(), strict=True):
            if kind == K.MAMBA2:
                ssm = self.ssm[i]
                out.append(Mamba2State(conv=self.conv[i].clone(),
                                       ssm=ssm.reshape(ssm.shape[0], heads, -1, ssm.shape[-1]).clone()))
            elif kind == K.FFN:
                out.append(NoState())
            else:
                kv = [self.k_buf.new_zeros(self.k_buf.shape[1:3] + (n, self.k_buf.shape[4])) for _ in range(2)]
                for b in range(kv[0].shape[0]):
                    m = int(self.lens[b])
                    kv[0][b, :, n - m:] = self.k_buf[i, b, :, :m]
                    kv[1][b, :, n - m:] = self.v_buf[i, b, :, :m]
                out.append(AttentionState(k=kv[0], v=kv[1], pos=self.pos.clone()))
        return ModelState(out)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only rows ``rows`` (m,) int64 of the batch."""
        self.conv, self.ssm = self.conv[:, rows].contiguous(), self.ssm[:, rows].contiguous()
        self.k_buf, self.v_buf = self.k_buf[:, rows].contiguous(), self.v_buf[:, rows].contiguous()
        self.lens, self.pos = self.lens[rows], self.pos[rows]

    def reserve(self, extra: int) -> None:
        """Grow the KV buffers so every row has room for ``extra`` more tokens."""
        cap = self.k_buf.shape[3]
        need = int(self.lens.max()) + extra if self.lens.numel() else 0
        if self.k_buf.shape[0] and need > cap:
            new = max(need, cap + cap // 2)
            grow = [t.new_zeros(t.shape[:3] + (new, t.shape[4])) for t in (self.k_buf, self.v_buf)]
            grow[0][:, :, :, :cap], grow[1][:, :, :, :cap] = self.k_buf, self.v_buf
            self.k_buf, self.v_buf = grow


class VerifyRecord:
    """A verify pass's buffers for B * T rows (made once, reused by every pass of that shape); after a pass, what
    :func:`commit` needs: per Mamba-2 layer and position the conv inputs raw (n_m2, B T, C), the conv outputs xbc
    (n_m2, B T, C) and dts (n_m2, B T, 2 H)."""

    def __init__(self, plan: HybridPlan, n_m2: int, batch: int, n_pos: int) -> None:
        from ..ops import _numba_decode_hybrid as K

        self.batch, self.n_pos = batch, n_pos
        rows = batch * n_pos
        di, n_conv, heads, _, _ = plan.m2_dims
        n_heads, n_kv, head_dim = plan.att_shape
        e = lambda *shape: torch.empty(shape, dtype=plan.dtype)  # noqa: E731
        d_model = plan.norm_w.shape[1]
        self.raw, self.xbc, self.dts = e(n_m2, rows, n_conv), e(n_m2, rows, n_conv), e(n_m2, rows, 2 * heads)
        self.h, self.xn, self.out = e(rows, d_model), e(rows, d_model), e(rows, d_model)
        self.scratch = [e(rows, di), e(rows, di), e(rows * plan.hidden), e(rows, (n_heads + 2 * n_kv) * head_dim),
                        e(rows, n_heads * head_dim)]
        self.logits = e(rows, plan.head[0].shape[0])
        self.n_stages = K.STAGES * len(plan.kinds) + 2


@torch.no_grad()
def hybrid_verify(model: CausalLM, plan: HybridPlan, tokens: Tensor, st: HybridSpecState,
                  rec: VerifyRecord | None = None) -> tuple[Tensor, VerifyRecord]:
    """tokens (B, T) int64 after ``st`` -> (logits (B, T, vocab) as T single steps give them, VerifyRecord).
    ``st`` is unchanged but for the KV slots past each row's length. ``rec``: a previous pass's record of this
    shape to reuse (its logits and inputs are overwritten)."""
    from ..ops import _numba_decode as D
    from ..ops import _numba_verify_hybrid as V

    batch, n_pos = tokens.shape if tokens.ndim == 2 else (-1, -1)
    if tokens.dtype != torch.long or batch != st.lens.shape[0] or n_pos < 1:
        raise ValueError(f"tokens must be int64 of shape ({st.lens.shape[0]}, T >= 1), got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    if rec is None or (rec.batch, rec.n_pos) != (batch, n_pos):
        rec = VerifyRecord(plan, st.conv.shape[0], batch, n_pos)
    st.reserve(n_pos)
    emb = model.backbone.embed(tokens.reshape(-1))
    if emb.dtype != plan.dtype:
        raise ValueError(f"the embedding gives {emb.dtype} but the plan's weights are {plan.dtype}")
    rec.h.copy_(emb)  # row b * T + i
    n_heads, n_kv, _ = plan.att_shape
    with kernel_threads(plan.work * rec.h.shape[0]) as threads:
        counters = np.zeros(D.counter_slots(rec.n_stages, threads), dtype=np.int64)
        V.verify_stack(
            rec.h.numpy(), n_pos, plan.kinds, plan.index, plan.norm_w, plan.norm_eps, plan.res_mult, *plan.final,
            *plan.m2, plan.m2_consts, plan.ngroups, *plan.m2_out, st.conv.numpy(), st.ssm.numpy(), rec.raw.numpy(),
            rec.xbc.numpy(), rec.dts.numpy(), *plan.ffn, plan.f_acts, plan.f_consts, *plan.att, plan.inv_freq,
            plan.a_consts, n_heads, n_kv, st.k_buf.numpy(), st.v_buf.numpy(), st.lens.numpy(),
            st.pos.to(plan.dtype).numpy(), rec.xn.numpy(), *(t.numpy() for t in rec.scratch), rec.out.numpy(),
            *plan.head, rec.logits.numpy(), counters, threads)
    return rec.logits.view(batch, n_pos, -1), rec


def commit(plan: HybridPlan, st: HybridSpecState, rec: VerifyRecord, keep: Tensor) -> None:
    """Set ``st`` in place to row b's state after its first keep[b] (0..T) tokens of the verify pass ``rec``, which
    must be a pass from ``st`` (or from a copy of it: branching commits one pass into several copies). Commit a pass
    once per state: a second commit advances the state again."""
    from ..ops import _numba_verify_hybrid as V

    if keep.dtype != torch.long or keep.shape != st.lens.shape or bool(((keep < 0) | (keep > rec.n_pos)).any()):
        raise ValueError(f"keep must be int64 of shape {tuple(st.lens.shape)} in [0, {rec.n_pos}], got "
                         f"{keep.tolist()}")
    if rec.batch != st.lens.shape[0] or rec.raw.shape[0] != st.conv.shape[0]:
        raise ValueError(f"rec must be a verify pass of this state ({st.lens.shape[0]} rows, {st.conv.shape[0]} "
                         f"Mamba-2 layers), got {rec.batch} rows and {rec.raw.shape[0]} layers")
    if st.conv.shape[0]:
        V.rollback(st.conv.numpy(), st.ssm.numpy(), rec.raw.numpy(), rec.xbc.numpy(), rec.dts.numpy(), rec.n_pos,
                   keep.contiguous().numpy(), plan.ngroups)
    st.lens += keep
    st.pos += keep


@torch.no_grad()
def hybrid_rounds(model: CausalLM, plan: HybridPlan, draft: CausalLM, draft_plan, k: int, last: Tensor,
                  states: tuple[ModelState, ModelState], out: Tensor, count: Tensor, done: Tensor,
                  eos: Tensor | None, max_new: int, stats) -> None:
    """Greedy chain rounds (k drafts) to the end of ``out`` (B, max_new): last (B,) the last emitted tokens,
    states (target, draft) after everything emitted but ``last``; plan from :func:`spec_plan`, draft_plan from
    :func:`~ssmkit.infer.fused_spec.fused_plan`; count, done, stats (a SpecStats) updated in place."""
    s_t, s_d = states
    st = HybridSpecState.from_state(plan, s_t, max_new + k + 1)
    active = torch.arange(last.shape[0])
    out_np, count_np, done_np = out.numpy(), count.numpy(), done.numpy()
    eos_np = None if eos is None else eos.numpy()
    rec = None
    while True:
        keep = ~done[active]
        if not bool(keep.any()):
            return
        if not bool(keep.all()):
            rows = keep.nonzero().squeeze(1)
            active, last = active[rows], last[rows]
            st.keep_rows(rows)
            s_d = s_d.map(lambda t, r=rows: t.index_select(0, r))
        nodes, dsnaps = fused_draft(draft, draft_plan, last, 1, k, s_d)  # (m, k + 1): last, then k drafts
        logits, rec = hybrid_verify(model, plan, nodes, st, rec)
        g = torch.argmax(logits, dim=-1)  # (m, k + 1)
        n = torch.cumprod((nodes[:, 1:] == g[:, :k]).long(), 1).sum(1)
        commit(plan, st, rec, n + 1)
        s_d = dsnaps.select(n)
        last = g.gather(1, n[:, None]).squeeze(1)
        toks = torch.cat([nodes[:, 1:], last[:, None]], 1).scatter_(1, n[:, None], last[:, None])  # row i emits
        toks, n_np = toks.numpy(), n.numpy()  # its first n[i] + 1
        m = active.shape[0]
        stats.passes += 1
        stats.row_passes += m
        stats.drafted += m * k
        stats.accepted += int(n_np.sum())
        for i, row in enumerate(active.tolist()):
            c = int(count_np[row])
            new = toks[i, :min(int(n_np[i]) + 1, max_new - c)]
            if eos_np is not None:
                hit = np.nonzero(np.isin(new, eos_np))[0]
                if hit.size:
                    new = new[:hit[0] + 1]
                    done_np[row] = True
            out_np[row, c:c + new.shape[0]] = new
            count_np[row] = c + new.shape[0]
            stats.emitted += new.shape[0]
            if count_np[row] >= max_new:
                done_np[row] = True
