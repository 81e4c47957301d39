"""Model-level state: split-with-state equals whole, stepping equals forward, packing with reset equals
separate sequences — for single-mixer models and hybrids, through the whole model (norms, MLPs, heads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.models import CausalLM, ModelState, Regressor, SequenceClassifier
from tests.layers.contract import assert_close
from tests.models.util import cached_model, ids, tiny_config

TOL = 1e-10  # float64

PATTERNS = [
    "mamba*2",
    "gated*2",
    "mamba,attn",
    "gated,attn,gated",
    "mamba2*2,attn",
    "rglru,s4d",
    "s4,h3",
    "longconv,attn",
]
# an MLP and layernorm variant of the two priority mixers
VARIANTS = [("mamba,attn", {"mlp": "swiglu"}), ("gated*2", {"mlp": "gelu", "norm": "layernorm"})]
CASES = [(p, {}) for p in PATTERNS] + VARIANTS


def lm(pattern: str, extra: dict) -> CausalLM:
    return cached_model(CausalLM, pattern, **extra)


def ids_of(case) -> str:
    return case[0] + ("+" + ",".join(f"{k}={v}" for k, v in case[1].items()) if case[1] else "")


@pytest.mark.parametrize("case", CASES, ids=ids_of)
def test_step_equals_forward(case):
    model = lm(*case)
    x = ids(2, 7, seed=1)
    with torch.no_grad():
        whole = model(x).logits
        state = model.init_state(2)
        steps = []
        for t in range(x.shape[1]):
            logits, state = model.step(x[:, t], state)
            steps.append(logits)
    assert_close(torch.stack(steps, 1), whole, TOL, f"{case[0]} step vs forward")


@pytest.mark.parametrize("case", CASES, ids=ids_of)
def test_split_with_state_equals_whole(case):
    model = lm(*case)
    x = ids(2, 9, seed=2)

    @given(t=st.integers(1, x.shape[1] - 1))
    def check(t):
        with torch.no_grad():
            whole = model(x, return_final_state=True)
            a = model(x[:, :t], return_final_state=True)
            b = model(x[:, t:], a.state, return_final_state=True)
        assert_close(torch.cat([a.logits, b.logits], 1), whole.logits, TOL, f"{case[0]} split at {t}")
        want = whole.state.tensors()
        for name, tensor in b.state.tensors().items():
            if tensor.is_floating_point() or tensor.is_complex():
                assert_close(tensor, want[name], TOL, f"{case[0]} final state {name}")
            else:
                assert torch.equal(tensor, want[name]), name

    check()


@pytest.mark.parametrize("case", CASES, ids=ids_of)
def test_reset_packing_equals_separate(case):
    model = lm(*case)
    seqs = [ids(1, n, seed=10 + n) for n in (3, 5, 2)]
    with torch.no_grad():
        alone = [model(s).logits for s in seqs]
        rows, resets, expect = [], [], []
        for order in ([0, 1, 2], [2, 0, 1]):
            rows.append(torch.cat([seqs[i] for i in order], 1))
            r = torch.zeros(rows[-1].shape[1], dtype=torch.bool)
            pos = 0
            for i in order:
                r[pos] = True
                pos += seqs[i].shape[1]
            resets.append(r)
            expect.append(torch.cat([alone[i] for i in order], 1)[0])
        packed = model(torch.cat(rows, 0), reset=torch.stack(resets)).logits
    for row in range(2):
        assert_close(packed[row], expect[row], TOL, f"{case[0]} packed row {row}")


def test_step_after_forward_prompt_continues():
    """A prompt through forward (with state out), then steps, equals one forward over everything."""
    model = lm("mamba2*2,attn", {})
    x = ids(3, 8, seed=4)
    with torch.no_grad():
        whole = model(x).logits
        out = model(x[:, :5], return_final_state=True)
        state, steps = out.state, []
        for t in range(5, 8):
            logits, state = model.step(x[:, t], state)
            steps.append(logits)
    assert_close(torch.stack(steps, 1), whole[:, 5:], TOL, "prompt then step")


def test_state_carries_gradient_for_tbptt():
    torch.manual_seed(0)
    model = CausalLM(tiny_config("gated,attn"))
    x = ids(2, 6)
    a = model(x[:, :3], return_final_state=True)
    b = model(x[:, 3:], a.state, labels=x[:, 3:])
    b.loss.backward()
    emb = model.backbone.embedding.weight.grad
    assert emb is not None and bool(emb[x[:, :3].flatten()].abs().sum() > 0)
    detached = a.state.detach()
    assert all(not t.requires_grad for t in detached.tensors().values())


def test_model_state_helpers():
    model = lm("mamba,attn", {})
    with torch.no_grad():
        state = model(ids(3, 4), return_final_state=True).state
    assert isinstance(state, ModelState) and len(state) == 2
    names = state.tensors()
    assert "layers.0.ssm" in names and "layers.1.k" in names
    assert all(t.shape[0] == 3 for t in names.values())  # batch first everywhere
    sub = state.map(lambda t: t.index_select(0, torch.tensor([2, 0])))
    assert all(t.shape[0] == 2 for t in sub.tensors().values())
    # row selection commutes with running the model
    x = ids(3, 2, seed=9)
    with torch.no_grad():
        full = model(x, state).logits
        part = model(x[[2, 0]], sub).logits
    assert_close(part, full[[2, 0]], TOL, "state row selection")


def test_state_errors():
    model = lm("mamba,attn", {})
    other = lm("gated*3", {})
    x = ids(2, 4)
    with pytest.raises(TypeError, match="ModelState"):
        model(x, initial_state=(1, 2))
    with pytest.raises(ValueError, match="3 layer states but the model has 2"):
        model(x, initial_state=other.init_state(2))
    with pytest.raises(ValueError, match="layer 0 \\(mamba\\)"):
        model(x, initial_state=model.init_state(3))  # wrong batch size
    with pytest.raises(TypeError, match="layer 0 \\(gated\\)"):
        lm("gated*2", {})(x, initial_state=model.init_state(2))
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)
    with pytest.raises(ValueError, match="token_ids"):
        model.step(x, model.init_state(2))  # (batch, length) instead of (batch,)


def test_bidirectional_layers_have_no_state():
    model = cached_model(SequenceClassifier, "bi-gated,gated", num_classes=3)
    with pytest.raises(NotImplementedError, match="layer 0 \\(bi-gated\\) is bidirectional"):
        model.init_state(2)
    with pytest.raises(ValueError, match="layer 0 \\(bi-gated\\).*state passing"):
        model(ids(2, 4), return_final_state=True)


def test_regressor_state_and_step():
    model = cached_model(Regressor, "mamba,gated", d_input=3, d_output=2)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    with torch.no_grad():
        whole = model(x).outputs
        a = model(x[:, :2], return_final_state=True)
        b = model(x[:, 2:], a.state).outputs
        state, steps = model.init_state(2), []
        for t in range(6):
            y, state = model.step(x[:, t], state)
            steps.append(y)
    assert_close(torch.cat([a.outputs, b], 1), whole, TOL, "regressor split")
    assert_close(torch.stack(steps, 1), whole, TOL, "regressor step")
