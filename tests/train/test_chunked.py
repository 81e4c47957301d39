"""Chunked long-sequence training: the gradient and loss equal the unchunked ones exactly (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssmkit.models import CausalLM, ModelConfig, PrefixLM, Regressor, SequenceClassifier
from ssmkit.train.chunked import chunked_loss_backward
from tests.layers.contract import assert_close
from tests.models.util import OPTIONS, VOCAB, ids

TOL = 1e-10
PATTERNS = ["mamba*2", "gated,attn", "mamba2,s4d", "h3,longconv", "rglru,s4", "mamba,attn,mamba2"]


def build(head: type, pattern: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = {"d_model": 8, "pattern": pattern, "mixer_options": OPTIONS, "vocab_size": VOCAB, **kw}
    if "d_input" in kw:
        cfg.pop("vocab_size")
    return head(ModelConfig(**cfg)).double()


def lm_batch(batch: int, length: int, seed: int = 0, *, n_resets: int = 2, ignore: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    x = ids(batch, length, seed)
    labels = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], 1)
    labels[torch.rand(batch, length, generator=g) < ignore] = -100
    reset = torch.zeros(batch, length, dtype=torch.bool)
    for _ in range(n_resets):
        reset[torch.randint(0, batch, (1,), generator=g), torch.randint(1, length, (1,), generator=g)] = True
    return {"input_ids": x, "labels": labels, "reset": reset}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def unchunked(model, batch: dict, **extra) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    key = "input_ids" if "input_ids" in batch else "inputs"
    out = model(batch[key], reset=batch.get("reset"), labels=batch["labels"], **extra)
    out.loss.backward()
    return float(out.loss.detach()), grads(model)


def chunked(model, batch: dict, chunk_len: int, **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    stats = chunked_loss_backward(model, batch, chunk_len, **kw)
    return stats, grads(model)


def assert_same_grads(got: dict, want: dict, tol: float = TOL) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert_close(got[name], g, tol, f"grad of {name}")


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_unchunked_gradient(pattern):
    """Several mixers (and hybrids with attention), chunk_len not dividing the length, resets (one of them
    exactly at a chunk start) and ignored labels."""
    model = build(CausalLM, pattern, mlp="gelu" if "attn" in pattern else "none")
    batch = lm_batch(2, 23, seed=len(pattern))
    batch["reset"][1, 10] = True  # a segment start exactly at a chunk boundary
    loss, want = unchunked(model, batch)
    stats, got = chunked(model, batch, 5)
    assert abs(stats["loss"] - loss) <= TOL * max(1.0, abs(loss))
    assert stats["tokens"] == int((batch["labels"] != -100).sum())
    assert_same_grads(got, want)


@given(
    length=st.integers(1, 24),
    chunk_len=st.integers(2, 12),
    n_resets=st.integers(0, 3),
    ignore=st.sampled_from([0.0, 0.5, 0.9]),
    seed=st.integers(0, 1000),
)
def test_matches_unchunked_any_split(length, chunk_len, n_resets, ignore, seed):
    model = _mamba_lm()
    batch = lm_batch(2, length, seed, n_resets=n_resets if length > 1 else 0, ignore=ignore)
    if int((batch["labels"] != -100).sum()) == 0:
        batch["labels"][0, 0] = 3
    loss, want = unchunked(model, batch)
    stats, got = chunked(model, batch, chunk_len)
    assert abs(stats["loss"] - loss) <= TOL * max(1.0, abs(loss))
    assert_same_grads(got, want)


_MODELS: dict = {}


def _mamba_lm() -> CausalLM:
    if "mamba" not in _MODELS:
        _MODELS["mamba"] = build(CausalLM, "mamba,gated", seed=3)
    return _MODELS["mamba"]


def test_single_chunk_and_loss_scale_accumulates():
    model = build(CausalLM, "mamba*2")
    batch = lm_batch(2, 12)
    loss, want = unchunked(model, batch)
    stats, got = chunked(model, batch, 12)
    assert stats["chunks"] == 1 and stats["state_bytes"] == 0
    assert_same_grads(got, want)
    # two accumulated halves (loss_scale 0.5, different chunkings) add up to the full gradient
    model.zero_grad(set_to_none=True)
    chunked_loss_backward(model, batch, 5, loss_scale=0.5)
    stats = chunked_loss_backward(model, batch, 7, loss_scale=0.5)
    assert abs(stats["loss"] - loss) <= TOL  # the reported loss is unscaled
    assert_same_grads(grads(model), want)


def test_trailing_unscored_chunks_are_skipped_and_states_are_small():
    model = build(CausalLM, "mamba*2")
    batch = lm_batch(1, 40, n_resets=0, ignore=0.0)
    batch["labels"][:, 12:] = -100  # scored positions only in chunks 0..2 (chunk_len 5)
    loss, want = unchunked(model, batch)
    stats, got = chunked(model, batch, 5)
    assert stats["chunks"] == 3 and stats["tokens"] == 12
    per_state = sum(t.numel() * t.element_size() for t in model.init_state(1).tensors().values())
    assert stats["state_bytes"] == 2 * per_state  # the states entering chunks 1 and 2 only
    assert abs(stats["loss"] - loss) <= TOL
    assert_same_grads(got, want)


def test_nothing_scored():
    model = build(CausalLM, "gated")
    batch = lm_batch(2, 9)
    batch["labels"][:] = -100
    model.zero_grad(set_to_none=True)
    stats = chunked_loss_backward(model, batch, 4)
    assert stats["loss"] == 0.0 and stats["tokens"] == 0
    assert all(p.grad is None for p in model.parameters())


def test_dropout_replays_the_same_masks():
    """In training mode with dropout, pass 2 must redraw pass 1's masks: compare with running the chunks in
    order with state passing under one autograd graph, from the same RNG state."""
    model = build(CausalLM, "mamba,gated", dropout=0.3).train()
    batch = lm_batch(2, 17)
    chunk_len, total = 4, int((batch["labels"] != -100).sum())
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    state, loss = None, 0.0
    for s in range(0, 17, chunk_len):
        sl = slice(s, s + chunk_len)
        lab = batch["labels"][:, sl]
        out = model(batch["input_ids"][:, sl], state, reset=batch["reset"][:, sl], labels=lab, return_final_state=True)
        loss = loss + out.loss * (int((lab != -100).sum()) / total)
        state = out.state
    loss.backward()
    want = grads(model)
    torch.manual_seed(123)
    stats, got = chunked(model, batch, chunk_len)
    assert abs(stats["loss"] - float(loss.detach())) <= TOL
    assert_same_grads(got, want)


# ------------------------------------------------------------------------------------ other heads
def test_regressor_with_padding_at_a_chunk_boundary():
    """Padding that ends exactly at a chunk start must still cut the segment there (as the unchunked model
    does), so the padded positions' state does not leak into the next chunk."""
    model = build(Regressor, "mamba,s4d", d_input=3, d_output=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 20, 2, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 7:10] = False  # real again from position 10 = a chunk start for chunk_len 5
    mask[1, 16:] = False
    model.zero_grad(set_to_none=True)
    out = model(x, padding_mask=mask, labels=y)
    out.loss.backward()
    want = grads(model)
    stats, got = chunked(model, {"inputs": x, "labels": y, "mask": mask}, 5)
    assert stats["tokens"] == int(mask.sum())
    assert abs(stats["loss"] - float(out.loss.detach())) <= TOL
    assert_same_grads(got, want)


def test_lm_mask_must_only_cover_unscored_positions():
    model = build(CausalLM, "gated")
    batch = lm_batch(2, 10, ignore=0.0)
    batch["mask"] = torch.ones(2, 10, dtype=torch.bool)
    batch["mask"][0, 8:] = False
    with pytest.raises(ValueError, match="unscored"):
        chunked_loss_backward(model, batch, 4)
    batch["labels"][0, 8:] = -100
    loss, want = unchunked(model, {k: v for k, v in batch.items() if k != "mask"})
    stats, got = chunked(model, batch, 4)
    assert abs(stats["loss"] - loss) <= TOL
    assert_same_grads(got, want)


def test_prefix_lm_prefixes_inside_chunks():
    model = build(PrefixLM, "gated,mamba,attn", prefix_layers=[0, 2])
    batch = lm_batch(2, 16, n_resets=0)
    batch["reset"][0, 8] = True
    prefix = torch.zeros(2, 16, dtype=torch.bool)
    prefix[0, :3] = True
    prefix[0, 8:11] = True  # the second segment's prefix, inside chunk [8, 12)
    prefix[1, :4] = True
    batch["prefix_mask"] = prefix
    loss, want = unchunked(model, batch, prefix_mask=prefix)
    stats, got = chunked(model, batch, 4)
    assert abs(stats["loss"] - loss) <= TOL
    assert_same_grads(got, want)
    with pytest.raises(ValueError, match="prefix crossing the chunk boundary at position 2"):
        chunked_loss_backward(model, batch, 2)


# ------------------------------------------------------------------------------------ errors
def test_bad_arguments():
    model = build(CausalLM, "gated")
    batch = lm_batch(1, 6)
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="chunk_len must be a positive int"):
            chunked_loss_backward(model, batch, bad)
    with pytest.raises(ValueError, match="loss_scale"):
        chunked_loss_backward(model, batch, 2, loss_scale=float("nan"))
    with pytest.raises(ValueError, match="unknown keys \\['foo'\\]"):
        chunked_loss_backward(model, {**batch, "foo": batch["reset"]}, 2)
    with pytest.raises(ValueError, match="labels"):
        chunked_loss_backward(model, {"input_ids": batch["input_ids"]}, 2)
    with pytest.raises(ValueError, match="exactly one of 'input_ids' or 'inputs'"):
        chunked_loss_backward(model, {"labels": batch["labels"]}, 2)
    with pytest.raises(ValueError, match="reset.*bool tensor of shape"):
        chunked_loss_backward(model, {**batch, "reset": batch["reset"].long()}, 2)
    with pytest.raises(TypeError, match="batch must be a dict"):
        chunked_loss_backward(model, [batch], 2)


def test_rejects_pooled_losses_and_stateless_layers():
    clf = build(SequenceClassifier, "gated", num_classes=3)
    x = ids(2, 6)
    with pytest.raises(ValueError, match="per position"):
        chunked_loss_backward(clf, {"input_ids": x, "labels": torch.tensor([0, 2])}, 3)
    bi = build(Regressor, "bi-gated", d_input=2, d_output=2)
    xs = torch.randn(1, 6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="layers 0 \\(bi-gated\\) are bidirectional"):
        chunked_loss_backward(bi, {"inputs": xs, "labels": xs}, 3)
