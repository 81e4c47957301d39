"""Speculative decoding: a small draft model proposes tokens, the target verifies them in one parallel pass.

Chain (``num_draft=k``): the draft steps k tokens; the target feeds (last token, k drafts) in one multi-token pass
(:func:`~ssmkit.infer.multitoken.forward_snapshots`) and keeps, per row, the longest prefix it agrees with plus one
token of its own, then rolls its state back to that point (``Snapshots.select``). Greedy output is exactly plain
greedy's; with ``temperature > 0`` a draft token d is kept with probability min(1, p(d) / q(d)) and at the first
rejection a token is drawn from max(p - q, 0) renormalised (p, q: the target's and the draft's filtered
distributions), so every token is distributed as plain sampling from the target would give it.

Tree (``tree=(b, d)``, greedy only): the draft proposes its top-b tokens at every level down to depth d
(1 + b + ... + b**d nodes). The target verifies the whole tree in one pass (:mod:`ssmkit.infer.tree`: each
node's Mamba/Mamba-2 state comes from its parent's, attention sees the node's ancestors), keeps the deepest
accepted node and sets its state to that node's path. Models with other mixers verify the b**d root-to-leaf
paths as batch rows instead (shared prefixes recomputed). Output again equals plain greedy.

Greedy decoding with a pure-Mamba target and draft (the stacks the fused decode step covers) runs as three numba
launches per round with the states kept in the kernels' layout (:mod:`ssmkit.infer.fused_loop`): the draft's chain
or tree, the target's verify pass over all its nodes, the acceptance and rollback; a chain of k drafts is the tree
(1, k). With another target (a hybrid, say) a pure-Mamba draft still drafts a greedy chain in one launch
(:func:`~ssmkit.infer.fused_spec.fused_draft`). A greedy chain with a pure-Mamba draft on a Mamba-2 / GQA / MLP
hybrid target verifies in one launch too (:func:`~ssmkit.infer.spec_hybrid.hybrid_rounds`). Anything else takes the
paths above.

    tokens, stats = speculative_generate(target, ids, 64, draft_model=draft, num_draft=4)
    print(stats.acceptance_rate, stats.tokens_per_pass)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.heads import CausalLM, PrefixLM
from ..models.outputs import ModelState
from .fused_loop import fused_rounds
from .fused_spec import fused_draft, fused_plan
from .generate import _check_model, _plan, _prefill
from .multitoken import forward_snapshots
from .sampling import filter_logits, sample_from_logits
from .spec_hybrid import hybrid_rounds, spec_plan
from .spec_tree_rounds import _tree_round
from .states import merge_states


@dataclass
class SpecStats:
    """Counts over a speculative run: target passes (rounds), row-passes (rows verified, summed over passes),
    drafted and accepted draft tokens, emitted tokens (excluding each row's first token, from the prefill)."""

    passes: int = 0
    row_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens (for a tree: per level, i.e. drafted counts depth per row-round)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens a row gains per target pass (accepted drafts + the target's own token)."""
        return self.emitted / self.row_passes if self.row_passes else 0.0


def self_draft(model: CausalLM, n_layers: int) -> CausalLM:
    """A draft sharing ``model``'s embedding, first ``n_layers`` blocks, final norm and head (no new weights)."""
    if not isinstance(model, CausalLM) or isinstance(model, PrefixLM):
        raise TypeError(f"model must be an ssmkit CausalLM, got {type(model).__name__}")
    total = model.config.n_layers
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers < total:
        raise ValueError(f"n_layers must be an int in [1, {total - 1}] (fewer layers than the model), "
                         f"got {n_layers!r}")
    small = dataclasses.replace(model.config, n_layers=n_layers,
                                pattern=list(model.backbone.mixer_names[:n_layers]))
    draft = CausalLM(small).to(device=model.backbone.device, dtype=model.backbone.param_dtype)
    draft.backbone.embedding = model.backbone.embedding
    draft.backbone.blocks = nn.ModuleList(model.backbone.blocks[:n_layers])
    draft.backbone.final_norm = model.backbone.final_norm
    draft.lm_head = model.lm_head
    return draft.eval()


def _check_draft(model: CausalLM, draft: object, num_draft: object, tree: object, temperature: float,
                 prefix_mask: object) -> tuple[CausalLM, int, tuple[int, int] | None]:
    draft = _check_model(draft)
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"draft_model has vocab_size={draft.config.vocab_size} but model has "
                         f"{model.config.vocab_size}; the draft must share the target's tokenizer")
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft must be an int >= 1, got {num_draft!r}")
    if prefix_mask is not None:
        raise ValueError("prefix_mask is not supported with draft_model (speculative decoding is causal)")
    if tree is not None:
        ok = (isinstance(tree, (tuple, list)) and len(tree) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in tree))
        if not ok:
            raise ValueError(f"tree must be (branches, depth), two ints >= 1, got {tree!r}")
        if temperature > 0:
            raise ValueError("tree decoding supports greedy decoding only (temperature=0)")
        if tree[0] ** tree[1] > 1024:
            raise ValueError(f"tree={tuple(tree)} has {tree[0] ** tree[1]} paths; use at most 1024")
        tree = (int(tree[0]), int(tree[1]))
    return draft, num_draft, tree


def _check_context(model: CausalLM, who: str, longest: int, max_new: int, depth: int) -> None:
    """Attention layers with max_cache must hold the prompt, the tokens generated and the drafted ones."""
    from ..layers.attention import Attention

    need = longest + max(max_new - 1, 0) + depth
    for i, block in enumerate(model.backbone.blocks):
        layer = block.mixer
        if isinstance(layer, Attention) and layer.max_cache is not None and layer.window is None and (
            need > layer.max_cache
        ):
            raise ValueError(f"num_draft/tree too large for the context: the longest prompt ({longest}) + "
                             f"max_new_tokens - 1 + {depth} drafted = {need} tokens exceed {who} layer {i}'s "
                             f"max_cache={layer.max_cache}")


def _pick_states(states: list[ModelState], n: Tensor) -> ModelState:
    """Row i of ``states[n[i]]`` for every row."""
    parts, rows = [], []
    for v in torch.unique(n).tolist():
        r = (n == v).nonzero().squeeze(1)
        parts.append(states[v].map(lambda t, r=r: t.index_select(0, r)))
        rows.append(r)
    return merge_states(parts, rows, n.shape[0])


def _probs(logits: Tensor, plan) -> Tensor:
    return torch.softmax(filter_logits(logits, plan.temperature, plan.top_k, plan.top_p), dim=-1)


def _sample(probs: Tensor, u: Tensor) -> Tensor:
    return sample_from_logits(torch.log(probs), u)


def _uniforms(plan, active: Tensor) -> Tensor:
    if plan.rng is not None:
        return plan.rng.draw(active)
    return torch.zeros(active.shape[0], dtype=torch.float64)


@torch.no_grad()
def _chain_round(plan, draft: CausalLM, k: int, last: Tensor, s_t: ModelState, s_d: ModelState,
                 active: Tensor, draft_plan=None) -> tuple[Tensor, Tensor, ModelState, ModelState]:
    """One draft-then-verify round: -> (tokens (m, k + 1), count (m,) of them emitted, target state, draft
    state); both states have consumed everything emitted except the last emitted token. ``draft_plan`` (greedy
    only): the draft's fused plan, so its k steps are one launch (:func:`~ssmkit.infer.fused_spec.fused_draft`)
    whatever the target."""
    greedy = plan.temperature == 0
    states, toks, qs = [s_d], [], []
    tok, s = last, s_d
    if draft_plan is not None:  # node i of the chain: the draft's state after last and i drafts
        nodes, dsnaps = fused_draft(draft, draft_plan, last, 1, k, s_d)
        toks = list(nodes[:, 1:].unbind(1))
    for _ in range(k if draft_plan is None else 0):
        lg, s = draft.step(tok, s)
        states.append(s)
        if greedy:
            tok = torch.argmax(lg, dim=-1)
        else:
            q = _probs(lg, plan)
            tok = _sample(q, _uniforms(plan, active))
            qs.append(q)
        toks.append(tok)
    drafts = torch.stack(toks, 1)  # (m, k)
    logits, snaps = forward_snapshots(plan.model, torch.cat([last[:, None], drafts], 1), s_t)
    m = last.shape[0]
    if greedy:
        g = torch.argmax(logits, dim=-1)  # (m, k + 1)
        n = torch.cumprod((drafts == g[:, :k]).long(), 1).sum(1)
        final = g.gather(1, n[:, None]).squeeze(1)
    else:
        p = _probs(logits, plan)  # (m, k + 1, vocab)
        q = torch.stack(qs, 1)  # (m, k, vocab)
        pd = p[:, :k].gather(2, drafts[..., None]).squeeze(2)
        qd = q.gather(2, drafts[..., None]).squeeze(2)
        u = torch.stack([_uniforms(plan, active) for _ in range(k)], 1)
        n = torch.cumprod((u * qd < pd).long(), 1).sum(1)
        rows = torch.arange(m)
        resid = p[rows, n].clone()
        rejected = n < k
        resid[rejected] = (resid[rejected] - q[rows[rejected], n[rejected]]).clamp(min=0)
        final = _sample(resid, _uniforms(plan, active))
    out = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n[:, None], final[:, None])
    if draft_plan is not None:
        return out, n + 1, snaps.select(n + 1), dsnaps.select(n)
    if bool((n == k).any()):  # the draft has not consumed its own last token yet
        states.append(draft.step(toks[-1], s)[1])
    return out, n + 1, snaps.select(n + 1), _pick_states(states, n + 1)


def speculative_generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    draft_model: CausalLM,
    num_draft: int = 4,
    tree: tuple[int, int] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    prompt_lengths: Tensor | Sequence[int] | None = None,
    prefix_mask: Tensor | None = None,
) -> tuple[Tensor, SpecStats]:
    """:func:`~ssmkit.infer.generate` with a draft model: -> (new tokens (batch, max_new_tokens), SpecStats).

    num_draft: tokens the draft proposes per round (chain); tree: (branches, depth) for tree drafts (greedy
    only; num_draft is then unused). Other arguments as for ``generate``.
    """
    plan = _plan(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, attention_mask=attention_mask,
                 prompt_lengths=prompt_lengths, prefix_mask=prefix_mask)
    draft, k, tree = _check_draft(plan.model, draft_model, num_draft, tree, plan.temperature, prefix_mask)
    depth = tree[1] if tree is not None else k
    longest = plan.prompts.max_length
    _check_context(plan.model, "model", longest, plan.max_new_tokens, depth)
    _check_context(draft, "draft_model", longest, plan.max_new_tokens, depth)
    prompts, batch, device = plan.prompts, plan.prompts.batch, plan.prompts.ids.device
    out = torch.full((batch, plan.max_new_tokens), plan.pad_id, dtype=torch.long, device=device)
    stats = SpecStats()
    if plan.max_new_tokens == 0:
        return out, stats
    logits, s_t = _prefill(plan.model, prompts)
    _, s_d = _prefill(draft, prompts)
    active = torch.arange(batch, device=device)
    if plan.temperature == 0:
        last = torch.argmax(logits, dim=-1)
    else:
        last = _sample(_probs(logits, plan), _uniforms(plan, active))
    out[:, 0] = last
    with torch.no_grad():  # pure-Mamba target and draft, greedy: fused draft and verify passes
        fused = (fused_plan(plan.model, s_t), fused_plan(draft, s_d)) if plan.temperature == 0 else (None, None)
    draft_plan = fused[1]  # a pure-Mamba draft drafts in one launch even for another target
    fused = fused if None not in fused else None
    count = torch.ones(batch, dtype=torch.long, device=device)
    eos = None if plan.eos is None else torch.tensor(plan.eos, device=device)
    done = count >= plan.max_new_tokens
    if eos is not None:
        done |= torch.isin(last, eos)
    if fused is not None:  # the whole loop in numba launches (ssmkit.infer.fused_loop)
        fused_rounds(fused, (plan.model, draft), tree or (1, k), last, (s_t, s_d), out, count, done, eos,
                     plan.max_new_tokens, stats)
        return out, stats
    if tree is None and draft_plan is not None:  # greedy, pure-Mamba draft: a Mamba-2/GQA/MLP hybrid target
        with torch.no_grad():  # verifies in one launch (ssmkit.infer.spec_hybrid)
            hybrid = spec_plan(plan.model, s_t)
            if hybrid is not None:
                hybrid_rounds(plan.model, hybrid, draft, draft_plan, k, last, (s_t, s_d), out, count, done, eos,
                              plan.max_new_tokens, stats)
                return out, stats
    while True:
        keep = ~done[active]
        if not bool(keep.any()):
            return out, stats
        if not bool(keep.all()):
            active, last = active[keep], last[keep]
            s_t, s_d = (s.map(lambda t, k_=keep: t[k_]) for s in (s_t, s_d))
        if tree is None:
            toks, n, s_t, s_d = _chain_round(plan, draft, k, last, s_t, s_d, active, draft_plan)
        else:
            toks, n, s_t, s_d = _tree_round(plan, draft, tree, last, s_t, s_d, active)
        stats.passes += 1
        stats.row_passes += active.shape[0]
        stats.drafted += active.shape[0] * depth
        stats.accepted += int((n - 1).sum())
        for i, row in enumerate(active.tolist()):
            c, take = int(count[row]), int(n[i])
            take = min(take, plan.max_new_tokens - c)
            new = toks[i, :take]
            if eos is not None:
                hit = torch.isin(new, eos).nonzero()
                if hit.numel():
                    new = new[: int(hit[0]) + 1]
                    done[row] = True
            out[row, c:c + new.shape[0]] = new
            count[row] = c + new.shape[0]
            stats.emitted += new.shape[0]
            if count[row] >= plan.max_new_tokens:
                done[row] = True
        last = toks.gather(1, (n - 1)[:, None]).squeeze(1)
