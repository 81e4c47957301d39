"""Speculative decoding (chain and tree): greedy output identical to plain greedy in float64 (several families and
a hybrid, ragged prompts, EOS, a self-draft); sampling distributed as the target's (chi-square against the
exact marginals, with a control that fails without the accept/reject rule); one-line errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from ssmkit.infer import generate, self_draft, speculative_generate
from tests.infer.util import VOCAB, ids, tiny_model

PATTERNS = ["mamba*2", "mamba2*2", "mamba2,attn,mamba2", "mamba2,gqa", "s4d,gated", "rglru,h3,longconv"]
GQA = {"gqa": {"n_heads": 4, "n_kv_heads": 2, "rotary_dim": 2}}
LENGTHS = [6, 2, 4]


def _drafts(model):
    """A foreign draft (low acceptance), the model itself (everything accepted) and a self-draft."""
    return {"other": tiny_model("mamba", seed=3), "itself": model, "self": self_draft(model, 1)}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chain_and_tree_greedy_equal_plain_greedy(pattern):
    model = tiny_model(pattern, mixer_options=GQA if "gqa" in pattern else None)
    x = ids(3, 6, seed=1)
    want = generate(model, x, 13, prompt_lengths=LENGTHS)
    for (name, draft), k in itertools.product(_drafts(model).items(), (1, 3, 6)):
        got, stats = speculative_generate(model, x, 13, draft_model=draft, num_draft=k, prompt_lengths=LENGTHS)
        assert torch.equal(got, want), f"draft {name}, num_draft={k}"
        assert stats.emitted == 3 * 12 and stats.passes >= 12 / (k + 1)
        if name == "itself":
            assert stats.acceptance_rate == 1.0
    for (name, draft), tree in itertools.product(_drafts(model).items(), ((2, 2), (1, 4), (3, 1))):
        got, _ = speculative_generate(model, x, 13, draft_model=draft, tree=tree, prompt_lengths=LENGTHS)
        assert torch.equal(got, want), f"draft {name}, tree={tree}"


def test_generate_takes_a_draft_and_keeps_eos_and_padding():
    model = tiny_model("mamba,attn")
    x = ids(4, 5, seed=7)
    plain = generate(model, x, 12)
    eos = int(plain[0, 3])  # a token row 0 produces: it stops there
    want = generate(model, x, 12, eos_token_id=eos, pad_token_id=1)
    for kw in ({"num_draft": 3}, {"tree": (2, 2)}, {}):
        got = generate(model, x, 12, eos_token_id=eos, pad_token_id=1, draft_model=tiny_model("mamba2*2"), **kw)
        assert torch.equal(got, want), kw
    assert torch.equal(generate(model, x, 1, draft_model=model), plain[:, :1])
    assert generate(model, x, 0, draft_model=model).shape == (4, 0)


def test_the_accepted_count_is_counted():
    """With the model as its own draft every drafted token is accepted (acceptance 1, k + 1 tokens per pass)."""
    model = tiny_model("mamba2,attn")
    _, stats = speculative_generate(model, ids(2, 3, seed=2), 1 + 4 * 5, draft_model=model, num_draft=4)
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_pass == 5.0 and stats.passes == 4


@torch.no_grad()
def _exact_marginals(model, prompt: torch.Tensor, n: int, temperature: float) -> list[torch.Tensor]:
    """p(token i = v) for i < n, summing the target's sampling distribution over every earlier continuation."""
    seqs, probs, out = prompt[None], torch.ones(1, dtype=torch.float64), []
    for _ in range(n):
        logits = model(seqs).logits[:, -1]
        p = torch.softmax(logits.double() / temperature, -1) * probs[:, None]  # (paths, vocab)
        out.append(p.sum(0))
        seqs = torch.cat([seqs.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(seqs.shape[0])[:, None]], 1)
        probs = p.reshape(-1)
    return out


def _gof(samples: torch.Tensor, p: torch.Tensor) -> float:
    """Chi-square goodness of fit of samples (N,) to p (vocab,), pooling cells expected below 5."""
    n = samples.shape[0]
    counts = torch.bincount(samples, minlength=VOCAB).double()
    exp = p * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([exp[big], exp[~big].sum()[None]])
    if exp[-1] < 5:
        obs, exp = torch.cat([obs[:-2], obs[-2:].sum()[None]]), torch.cat([exp[:-2], exp[-2:].sum()[None]])
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def test_sampling_follows_the_target_distribution():
    """4000 rows of one prompt, 3 tokens each (token 0 from the prefill, tokens 1-2 drafted and verified):
    every token's marginal matches the target's exact one (p > 1e-3, fixed seed); the draft's own samples do not
    (the control shows the test can fail)."""
    model, draft = tiny_model("mamba,attn"), tiny_model("mamba", seed=3)
    prompt = ids(1, 4, seed=5)[0]
    rows, temp = 4000, 1.5
    x = prompt[None].repeat(rows, 1)
    got, stats = speculative_generate(model, x, 3, draft_model=draft, num_draft=2, temperature=temp, seed=123)
    assert 0 < stats.acceptance_rate < 1
    exact = _exact_marginals(model, prompt, 3, temp)
    for i in range(3):
        assert _gof(got[:, i], exact[i]) > 1e-3, f"token {i}"
    own = generate(draft, x, 3, temperature=temp, seed=123)
    assert min(_gof(own[:, i], exact[i]) for i in range(1, 3)) < 1e-6


def test_sampling_with_top_k_and_per_row_seeds_is_reproducible():
    model, draft = tiny_model("mamba2*2"), tiny_model("mamba", seed=3)
    x = ids(2, 4, seed=9)
    kw = {"draft_model": draft, "num_draft": 3, "temperature": 0.8, "top_k": 5, "seed": [1, 2]}
    a, _ = speculative_generate(model, x, 10, **kw)
    b, _ = speculative_generate(model, x, 10, **kw)
    assert torch.equal(a, b)
    top = torch.topk(model(torch.cat([x, a[:, :-1]], 1)).logits[:, 3:], 5, -1).indices  # top-5 of each position
    assert bool((top == a[..., None]).any(-1).all()), "a token outside the target's top-k"


def test_bad_input_is_a_one_line_error():
    model = tiny_model("mamba,attn")
    x = ids(1, 3)
    small = tiny_model("mamba", seed=3)
    cases = [
        ({"num_draft": 2}, "need a draft_model"),
        ({"draft_model": small, "num_draft": 0}, "num_draft must be an int >= 1"),
        ({"draft_model": small, "tree": (2, 0)}, r"tree must be \(branches, depth\)"),
        ({"draft_model": small, "tree": (2, 2), "temperature": 0.5}, "greedy decoding only"),
        ({"draft_model": small, "tree": (4, 6)}, "4096 paths"),
        ({"draft_model": "small"}, "model must be an ssmkit CausalLM"),
    ]
    for kw, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg) as e:
            generate(model, x, 4, **kw)
        assert "\n" not in str(e.value)


def test_draft_vocabulary_and_context_are_checked():
    from ssmkit.models import CausalLM, ModelConfig

    model = tiny_model("mamba,attn")
    other = CausalLM(ModelConfig(d_model=8, pattern="mamba", vocab_size=VOCAB + 3)).double().eval()
    with pytest.raises(ValueError, match=f"draft_model has vocab_size={VOCAB + 3} but model has {VOCAB}"):
        generate(model, ids(1, 3), 4, draft_model=other)
    capped = tiny_model("mamba,attn", mixer_options={"attn": {"n_heads": 2, "max_cache": 12}})
    x = ids(1, 5)
    generate(capped, x, 4, draft_model=small_draft(), num_draft=4)  # 5 + 3 + 4 = 12 tokens fit
    with pytest.raises(ValueError, match="too large for the context.*max_cache=12"):
        generate(capped, x, 4, draft_model=small_draft(), num_draft=5)
    with pytest.raises(ValueError, match="too large for the context"):
        generate(capped, x, 4, draft_model=small_draft(), tree=(2, 5))
    with pytest.raises(ValueError, match=r"n_layers must be an int in \[1, 1\]"):
        self_draft(model, 2)


def small_draft():
    return tiny_model("mamba", seed=3)


@pytest.mark.parametrize("pattern, hybrid_verify", [("mamba2,gqa", True), ("s4d,gqa", False)])
def test_a_pure_mamba_draft_drafts_in_one_launch_for_a_hybrid_target(monkeypatch, pattern, hybrid_verify):
    """With a target the pure-Mamba fused loop does not cover, the draft's greedy chain is still one fused launch
    per round; a Mamba-2/GQA target verifies in one launch too (spec_hybrid), another target through PyTorch. The
    tokens are plain greedy's either way."""
    from ssmkit.infer import spec_hybrid, speculative

    calls, rounds = {"per-round": 0, "hybrid": 0}, []
    for mod, key in ((speculative, "per-round"), (spec_hybrid, "hybrid")):
        real = mod.fused_draft
        monkeypatch.setattr(mod, "fused_draft", lambda *a, real_=real, key_=key, **k: (
            calls.__setitem__(key_, calls[key_] + 1), real_(*a, **k))[1])
    real_rounds = speculative.hybrid_rounds
    monkeypatch.setattr(speculative, "hybrid_rounds", lambda *a, **k: rounds.append(1) or real_rounds(*a, **k))
    model = tiny_model(pattern, mixer_options=GQA)
    x = ids(3, 6, seed=1)
    got, stats = speculative_generate(model, x, 13, draft_model=small_draft(), num_draft=3, prompt_lengths=LENGTHS)
    assert torch.equal(got, generate(model, x, 13, prompt_lengths=LENGTHS))
    assert calls["per-round" if not hybrid_verify else "hybrid"] == stats.passes > 0
    assert calls["hybrid" if not hybrid_verify else "per-round"] == 0
    assert len(rounds) == int(hybrid_verify)
