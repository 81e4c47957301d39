"""Token selection: greedy, temperature, top-k, top-p and inverse-CDF sampling against brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.infer import filter_logits, sample_from_logits, select_tokens
from ssmkit.infer.sampling import RowRandom, check_sampling_options

V = 12


def logits_strategy(batch: int = 3):
    # integer-valued logits on a coarse grid make ties likely, which is where filters go wrong
    return st.lists(st.lists(st.integers(-4, 4), min_size=V, max_size=V), min_size=batch, max_size=batch).map(
        lambda rows: torch.tensor(rows, dtype=torch.float64) / 2
    )


def kept(x: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in x]


@given(logits=logits_strategy(), k=st.integers(1, V))
def test_top_k_keeps_the_k_largest_and_their_ties(logits, k):
    for row, keep in zip(logits, kept(filter_logits(logits, 1.0, top_k=k)), strict=True):
        kth = sorted(row.tolist(), reverse=True)[k - 1]
        assert keep == {j for j, v in enumerate(row.tolist()) if v >= kth}


@given(logits=logits_strategy(), p=st.floats(0.01, 1.0), temp=st.sampled_from([0.5, 1.0, 2.0]))
def test_top_p_keeps_the_smallest_nucleus(logits, p, temp):
    out = filter_logits(logits, temp, top_p=p)
    for row, keep in zip(logits, kept(out), strict=True):
        probs = torch.softmax(row / temp, -1).tolist()
        order = sorted(range(V), key=lambda j: (-probs[j], j))  # stable: ties by index
        masses = torch.cumsum(torch.tensor([probs[j] for j in order], dtype=torch.float64), 0)
        if p < 1 and bool(((masses - p).abs() < 1e-9).any()):
            continue  # p sits on a cumulative mass: which side rounding puts it is not defined
        want, mass = set(), 0.0
        for j in order:
            if want and mass >= p:
                break
            want.add(j)
            mass += probs[j]
        assert keep == want, (probs, p)
    # the kept logits are the scaled originals
    assert torch.equal(out[torch.isfinite(out)], (logits / temp)[torch.isfinite(out)])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.5, None, None), (2.0, 4, None),
                                                     (1.0, None, 0.7), (0.8, 6, 0.9)])
def test_stratified_uniforms_reproduce_the_distribution(temperature, top_k, top_p):
    """With M evenly spaced uniforms every token is drawn M * p_j times up to one draw: the sampler realises
    exactly softmax(filtered logits / T)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(V, dtype=torch.float64, generator=g) * 2
    filtered = filter_logits(logits[None], temperature, top_k, top_p)[0]
    probs = torch.softmax(filtered, -1)
    M = 20000
    u = (torch.arange(M, dtype=torch.float64) + 0.5) / M
    toks = sample_from_logits(filtered.expand(M, V), u)
    counts = torch.bincount(toks, minlength=V).to(torch.float64)
    assert (counts - M * probs).abs().max() <= 1.0 + 1e-6
    assert bool((counts[~torch.isfinite(filtered)] == 0).all())


def test_extreme_uniforms_never_pick_excluded_tokens():
    logits = torch.full((4, V), -math.inf, dtype=torch.float64)
    logits[:, 3] = 0.0
    logits[:, 5] = 1.0
    u = torch.tensor([0.0, 1e-300, 1 - 2 ** -53, 0.5], dtype=torch.float64)
    toks = sample_from_logits(logits, u)
    assert set(toks.tolist()) <= {3, 5}
    assert int(toks[0]) == 3 and int(toks[2]) == 5


def test_greedy_is_argmax_first_on_ties_and_ignores_filters():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 0.0]])
    for k, p in [(None, None), (1, None), (None, 0.1)]:
        assert select_tokens(logits, temperature=0, top_k=k, top_p=p).tolist() == [1, 0]
    with pytest.raises(ValueError, match="uniforms"):
        select_tokens(logits, temperature=1.0)


def test_row_random_per_row_generators_are_independent_of_the_batch():
    batch = RowRandom([7, 8, 9], 3)
    alone = RowRandom([8], 1)
    draws_batch = [batch.draw(torch.tensor([0, 1, 2]))[1] for _ in range(5)]
    draws_alone = [alone.draw(torch.tensor([0]))[0] for _ in range(5)]
    assert torch.equal(torch.stack(draws_batch), torch.stack(draws_alone))
    # dropping a finished row does not disturb the others
    dropped = RowRandom([7, 8, 9], 3)
    dropped.draw(torch.tensor([0, 1, 2]))
    again = RowRandom([7, 8, 9], 3)
    again.draw(torch.tensor([0, 1, 2]))
    assert torch.equal(dropped.draw(torch.tensor([1])), again.draw(torch.tensor([0, 1, 2]))[1:2])
    with pytest.raises(ValueError, match="seed must be .* 3 ints .* got 2 values"):
        RowRandom([1, 2], 3)
    with pytest.raises(ValueError, match="seed"):
        RowRandom(1.5, 3)


@pytest.mark.parametrize("kw,name", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_k": V + 1}, "top_k"),
    ({"top_k": 2.0}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_options_name_the_argument(kw, name):
    args = {"temperature": 1.0, "top_k": None, "top_p": None, **kw}
    with pytest.raises(ValueError, match=f"^{name} must be"):
        check_sampling_options(args["temperature"], args["top_k"], args["top_p"], V)
