"""The fused verify pass of a hybrid target (ssmkit.infer.spec_hybrid) in float64: its logits equal single fused
steps and the full forward, the rollback gives the state after every accepted length (ragged rows, ragged prompts),
and greedy speculative rounds give plain greedy's tokens."""

from __future__ import annotations

import pytest
import torch

from ssmkit.infer import generate
from ssmkit.infer.fused_hybrid import hybrid_step
from ssmkit.infer.fused_spec import fused_plan
from ssmkit.infer.generate import _prefill
from ssmkit.infer.prompts import parse_prompts
from ssmkit.infer.spec_hybrid import HybridSpecState, commit, hybrid_rounds, hybrid_verify, spec_plan
from ssmkit.infer.speculative import SpecStats
from ssmkit.layers.attention import AttentionState
from ssmkit.layers.mamba2 import Mamba2State
from ssmkit.models.config import ModelConfig
from ssmkit.models.heads import CausalLM
from tests.infer.test_fused_hybrid import PATTERN, _model

VOCAB = 40


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _prefilled(model, x: torch.Tensor, lengths: list[int]):
    return _prefill(model, parse_prompts(x, vocab_size=VOCAB, device=x.device, prompt_lengths=lengths))


def _steps(model, state, tokens: torch.Tensor):
    """Single fused steps: -> (logits (B, T, V), [state after 0..T tokens])."""
    states, logits = [state], []
    for t in range(tokens.shape[1]):
        lg, state = hybrid_step(model, tokens[:, t], state)
        logits.append(lg)
        states.append(state)
    return torch.stack(logits, 1), states


def _row(state, b: int):
    return state.map(lambda t: t[b:b + 1])


def _assert_state_row(got, want, b: int) -> None:
    """Row b of ``got`` (a to_state) equals ``want`` (batch 1): Mamba-2 states, visible KV entries and positions."""
    for g, w in zip(got.layers, want.layers, strict=True):
        if type(w) is Mamba2State:
            torch.testing.assert_close(g.conv[b:b + 1], w.conv, rtol=0, atol=1e-12)
            torch.testing.assert_close(g.ssm[b:b + 1], w.ssm, rtol=0, atol=1e-12)
        elif type(w) is AttentionState:
            m = int(w.pos[0])
            assert int(g.pos[b]) == m
            torch.testing.assert_close(g.k[b:b + 1, :, g.k.shape[2] - m:], w.k[:, :, w.k.shape[2] - m:], rtol=0,
                                       atol=1e-12)
            torch.testing.assert_close(g.v[b:b + 1, :, g.v.shape[2] - m:], w.v[:, :, w.v.shape[2] - m:], rtol=0,
                                       atol=1e-12)


@torch.no_grad()
def test_verify_equals_steps_and_rollback_to_every_length():
    model = _model(PATTERN, residual_multiplier=0.8, logits_scaling=1.5)
    model.backbone.blocks[3].residual_multiplier = 0.55
    _, state = _prefilled(model, _ids(3, 6, 1), [6, 2, 4])  # ragged prompts: ragged caches and positions
    plan = spec_plan(model, state)
    assert plan is not None
    tokens = _ids(3, 5, 2)
    st = HybridSpecState.from_state(plan, state, 2)  # too little room: the verify grows the buffers
    logits, rec = hybrid_verify(model, plan, tokens, st)
    want, states = _steps(model, state, tokens)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)
    for b, n in enumerate([6, 2, 4]):  # the full forward over prompt + tokens
        full = model(torch.cat([_ids(3, 6, 1)[b:b + 1, :n], tokens[b:b + 1]], 1)).logits[:, n:]
        torch.testing.assert_close(logits[b:b + 1], full, rtol=0, atol=1e-10)
    for j in range(6):  # every row takes every kept length 0..5 once
        keep = torch.tensor([j, (j + 2) % 6, (j + 4) % 6])
        mine = HybridSpecState(st.conv.clone(), st.ssm.clone(), st.k_buf.clone(), st.v_buf.clone(),
                               st.lens.clone(), st.pos.clone())
        commit(plan, mine, rec, keep)
        got = mine.to_state(plan)
        for b in range(3):
            _assert_state_row(got, _row(states[int(keep[b])], b), b)
        if j in (1, 4):  # verify again from the ragged state (and from its ModelState round trip)
            more = _ids(3, 3, 10 + j)
            for again in (mine, HybridSpecState.from_state(plan, got, 8)):
                lg, _ = hybrid_verify(model, plan, more, again)
                for b in range(3):
                    w, _ = _steps(model, _row(states[int(keep[b])], b), more[b:b + 1])
                    torch.testing.assert_close(lg[b:b + 1], w, rtol=0, atol=1e-12)


def _draft_like(target: CausalLM, scale: float) -> CausalLM:
    """A pure-Mamba draft sharing the target's embedding, final norm and head, its mixers' outputs scaled by
    ``scale``: both models then mostly predict from the current token, so the draft is right part of the time."""
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=16, pattern=["mamba", "mamba"], vocab_size=VOCAB, mixer_options={"mamba": {"d_state": 4}},
                      norm="rmsnorm", mlp="none", tie_embeddings=False)
    draft = CausalLM(cfg).double().eval()
    with torch.no_grad():
        draft.backbone.embedding.weight.copy_(target.backbone.embedding.weight)
        draft.backbone.final_norm.weight.copy_(target.backbone.final_norm.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
        for block in draft.backbone.blocks:
            block.mixer.out_proj.weight.mul_(scale)
    return draft


def _rounds(target, draft, x, new: int, k: int, eos: int | None = None, pad: int = 0):
    """speculative_generate's greedy set-up around hybrid_rounds: -> (tokens (B, new), SpecStats, count)."""
    lengths = [x.shape[1]] * x.shape[0]
    logits, s_t = _prefilled(target, x, lengths)
    _, s_d = _prefilled(draft, x, lengths)
    plan, dplan = spec_plan(target, s_t), fused_plan(draft, s_d)
    assert plan is not None and dplan is not None
    out = torch.full((x.shape[0], new), pad, dtype=torch.long)
    out[:, 0] = first = torch.argmax(logits, -1)
    count = torch.ones(x.shape[0], dtype=torch.long)
    eos_t = None if eos is None else torch.tensor([eos])
    done = count >= new if eos is None else (count >= new) | torch.isin(first, eos_t)
    stats = SpecStats()
    hybrid_rounds(target, plan, draft, dplan, k, first, (s_t, s_d), out, count, done, eos_t, new, stats)
    return out, stats, count


@torch.no_grad()
def test_rounds_equal_plain_greedy():
    target = _model(PATTERN, residual_multiplier=0.3)
    draft = _draft_like(target, 0.05)
    x = _ids(3, 5, 4)
    out, stats, count = _rounds(target, draft, x, 17, 3)
    plain = generate(target, x, 17)
    assert torch.equal(out, plain)
    assert 0 < stats.accepted < stats.drafted, (stats.accepted, stats.drafted)  # both kept and rejected drafts
    assert bool((count == 17).all())
    eos = int(plain[1, 6])  # rows stop at their first EOS, the rest padded, as generate does
    out, _, _ = _rounds(target, draft, x, 17, 3, eos=eos, pad=39)
    assert torch.equal(out, generate(target, x, 17, eos_token_id=eos, pad_token_id=39))


@torch.no_grad()
def test_stacks_without_attention_or_without_mamba2():
    """No attention (no KV buffers), no Mamba-2 (no scan states), or a first block that is not Mamba-2: verify,
    rollback and the state round trip; a record commits only to a state of its shape."""
    for pattern in (["mamba2", "ffn", "mamba2"], ["gqa", "ffn"], ["gqa", "ffn", "mamba2"]):
        model = _model(pattern)
        _, state = _prefilled(model, _ids(2, 4, 5), [4, 3])
        plan = spec_plan(model, state)
        assert plan is not None, pattern
        tokens = _ids(2, 3, 6)
        st = HybridSpecState.from_state(plan, state, 8)
        logits, rec = hybrid_verify(model, plan, tokens, st)
        want, states = _steps(model, state, tokens)
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)
        commit(plan, st, rec, torch.tensor([1, 3]))
        with pytest.raises(ValueError, match="rec must be a verify pass of this state"):
            commit(plan, HybridSpecState.from_state(plan, _prefilled(model, _ids(3, 4, 5), [4, 3, 2])[1], 8), rec,
                   torch.tensor([1, 3, 0]))
        got = st.to_state(plan)
        for b, n in enumerate([1, 3]):
            _assert_state_row(got, _row(states[n], b), b)
