"""Heads: output shapes, losses (label convention), pooling, padding, parameter counts, summaries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmkit.models import (
    CausalLM,
    ClassifierOutput,
    Forecaster,
    LMOutput,
    ModelConfig,
    PrefixLM,
    RegressionOutput,
    Regressor,
    SequenceClassifier,
)
from tests.layers.contract import assert_close
from tests.models.util import VOCAB, D, cached_model, ids, tiny_config

TOL = 1e-10
MIXER_PATTERNS = ["mamba*2", "gated,attn", "mamba2,s4d", "h3,longconv", "rglru,s4"]


# ----------------------------------------------------------------------------------------------- LM
@pytest.mark.parametrize("pattern", MIXER_PATTERNS)
def test_causal_lm_shapes_loss_and_grads(pattern):
    torch.manual_seed(0)
    model = CausalLM(tiny_config(pattern, mlp="gelu"))
    x = ids(2, 6)
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)  # next-token targets, aligned
    out = model(x, labels=labels)
    assert isinstance(out, LMOutput) and out.state is None
    assert out.logits.shape == (2, 6, VOCAB) and out.logits.dtype == torch.float32
    assert out.loss.shape == () and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model(x, return_final_state=True).state is not None


def test_lm_loss_convention():
    """labels[t] is the target of position t; -100 positions are ignored; all ignored gives 0."""
    model = cached_model(CausalLM, "gated,attn")
    x = ids(2, 5, seed=3)
    labels = ids(2, 5, seed=4)
    labels[0, 1] = -100
    labels[1, 4] = -100
    out = model(x, labels=labels)
    keep = labels != -100
    expect = F.cross_entropy(out.logits[keep], labels[keep])
    assert_close(out.loss, expect, TOL, "lm loss")
    # shifting the labels by one position changes the loss: no hidden shift inside
    shifted = model(x, labels=torch.roll(labels, 1, dims=1)).loss
    assert not torch.allclose(shifted, out.loss)
    none = model(x, labels=torch.full_like(labels, -100)).loss
    assert none.item() == 0.0


def test_lm_label_errors():
    model = cached_model(CausalLM, "gated")
    x = ids(2, 5)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(x, labels=x[:, :4])
    with pytest.raises(ValueError, match=r"labels must hold values in \[0, 13\) or -100"):
        model(x, labels=torch.full_like(x, VOCAB))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(x, labels=x.double())


def test_lm_input_errors():
    model = cached_model(CausalLM, "gated")
    with pytest.raises(ValueError, match=r"input_ids must hold ids in \[0, vocab_size=13\)"):
        model(torch.tensor([[0, 13]]))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reset must be a bool tensor"):
        model(ids(1, 3), reset=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="prefix_mask was given but this model has no prefix"):
        model(ids(1, 3), prefix_mask=torch.zeros(1, 3, dtype=torch.bool))


def test_lm_config_requirements():
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLM(ModelConfig(d_model=D, d_input=3))
    with pytest.raises(ValueError, match="non-causal.*0 \\(bi-gated\\)"):
        CausalLM(tiny_config("bi-gated,gated"))
    with pytest.raises(ValueError, match="prefix_layers"):
        PrefixLM(tiny_config("gated*2", prefix_layers="none"))
    with pytest.raises(TypeError, match="ModelConfig"):
        CausalLM({"d_model": 8})


def test_tied_and_untied_parameter_counts():
    torch.manual_seed(0)
    tied = CausalLM(tiny_config("gated*2"))
    untied = CausalLM(tiny_config("gated*2", tie_embeddings=False))
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    by_hand = sum(p.numel() for p in untied.parameters())
    assert untied.num_parameters() == by_hand
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * D
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - VOCAB * D
    assert untied.num_parameters(exclude_embeddings=True) == tied.num_parameters(exclude_embeddings=True)


def test_summary_is_one_line():
    model = cached_model(CausalLM, "mamba2*3,attn,mamba2*3")
    s = model.summary()
    assert "\n" not in s
    assert s.startswith("CausalLM: 7 layers [mamba2*3,attn,mamba2*3]")
    assert "d_model=8" in s and "non-embedding" in s


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = CausalLM(tiny_config("gated*2", dropout=0.5, mlp="gelu"))
    x = ids(2, 6)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


def test_residual_in_fp32_for_half_precision_params():
    torch.manual_seed(0)
    model = CausalLM(tiny_config("attn*2"))
    assert model.backbone.residual_dtype == torch.float32
    model = model.to(torch.bfloat16)
    assert model.backbone.residual_dtype == torch.float32
    assert model(ids(1, 4)).logits.dtype == torch.bfloat16
    model = CausalLM(tiny_config("attn*2", residual_in_fp32=False)).to(torch.bfloat16)
    assert model.backbone.residual_dtype == torch.bfloat16
    assert cached_model(CausalLM, "gated").backbone.residual_dtype == torch.float64  # never narrowed


# ----------------------------------------------------------------------------------------------- classifier
@pytest.mark.parametrize("pattern", ["mamba*2", "gated,attn", "bi-gated,s4d", "bi-mamba,attn"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classifier_shapes_and_loss(pattern, pooling):
    model = cached_model(SequenceClassifier, pattern, num_classes=3, pooling=pooling)
    x = ids(4, 6)
    labels = torch.tensor([0, 2, 1, -100])
    out = model(x, labels=labels)
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (4, 3)
    assert_close(out.loss, F.cross_entropy(out.logits[:3], labels[:3]), TOL, "classifier loss")


@pytest.mark.parametrize("pattern", ["gated,attn", "bi-gated,mamba"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classifier_packed_and_padded_equal_separate(pattern, pooling):
    """Packed rows (reset) give one logit row per segment, equal to classifying each sequence alone; padding
    (even through bidirectional layers) changes nothing."""
    model = cached_model(SequenceClassifier, pattern, num_classes=3, pooling=pooling)
    seqs = [ids(1, n, seed=20 + n) for n in (3, 4, 2, 5)]
    with torch.no_grad():
        alone = torch.cat([model(s).logits for s in seqs], 0)
        # row 0: seqs 0, 1 (7 tokens), then 4 padding positions; row 1: seqs 2, 3 (7 tokens), then 4 padding
        # positions holding real-looking ids
        row0 = torch.cat([seqs[0], seqs[1], torch.zeros(1, 4, dtype=torch.long)], 1)
        row1 = torch.cat([seqs[2], seqs[3], torch.full((1, 4), 5)], 1)
        reset = torch.zeros(2, 11, dtype=torch.bool)
        reset[0, [0, 3]] = True
        reset[1, [0, 2]] = True
        pad = torch.ones(2, 11, dtype=torch.bool)
        pad[:, 7:] = False
        packed = model(torch.cat([row0, row1]), reset=reset, padding_mask=pad).logits
        # plain padding without reset: one sequence per row
        padded = model(torch.cat([seqs[1], torch.zeros(1, 3, dtype=torch.long)], 1),
                       padding_mask=torch.tensor([[True] * 4 + [False] * 3])).logits
        # a padding-only segment (reset at the padding) is dropped
        reset2 = reset.clone()
        reset2[0, 7] = True
        dropped = model(torch.cat([row0, row1]), reset=reset2, padding_mask=pad).logits
    assert_close(packed, alone, TOL, "packed classifier")
    assert_close(padded, alone[1:2], TOL, "padded classifier")
    assert_close(dropped, alone, TOL, "padding segment dropped")


def test_classifier_padding_leaks_without_mask_in_bidirectional():
    """Control: without padding_mask the bidirectional model does see the padding (so the test above is
    meaningful)."""
    model = cached_model(SequenceClassifier, "bi-gated,mamba", num_classes=3, pooling="last")
    s = ids(1, 4, seed=30)
    with torch.no_grad():
        alone = model(s).logits
        padded = model(torch.cat([s, torch.ones(1, 3, dtype=torch.long)], 1)).logits
    assert (padded - alone).abs().max() > 1e-6


def test_classifier_errors():
    model = cached_model(SequenceClassifier, "gated", num_classes=3)
    x = ids(2, 4)
    with pytest.raises(ValueError, match="padding_mask row 1 has no real"):
        model(x, padding_mask=torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="labels must have shape \\(2,\\)"):
        model(x, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="padding_mask must be a bool"):
        model(x, padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_classes"):
        SequenceClassifier(tiny_config("gated"))


def test_classifier_on_real_valued_inputs():
    model = cached_model(SequenceClassifier, "mamba,gated", d_input=3, num_classes=2)
    out = model(torch.randn(5, 7, 3, dtype=torch.float64))
    assert out.logits.shape == (5, 2)
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(5, 7, 3))  # float32 inputs for a float64 model: not cast silently


# ----------------------------------------------------------------------------------------------- regression
@pytest.mark.parametrize("pattern", ["mamba*2", "gated,attn", "s4d,bi-gated"])
def test_regressor_shapes_and_mse(pattern):
    model = cached_model(Regressor, pattern, d_input=3, d_output=2)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    y = torch.randn(2, 6, 2, dtype=torch.float64)
    out = model(x, labels=y)
    assert isinstance(out, RegressionOutput) and out.outputs.shape == (2, 6, 2)
    assert_close(out.loss, F.mse_loss(out.outputs, y), TOL, "mse")
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    masked = model(x, labels=y, padding_mask=valid)
    assert_close(masked.loss, F.mse_loss(masked.outputs[valid], y[valid]), TOL, "masked mse")
    with pytest.raises(ValueError, match="labels must have the outputs' shape"):
        model(x, labels=y[..., :1])
    with pytest.raises(TypeError, match="labels must be a floating-point"):
        model(x, labels=y.long())


def test_regressor_needs_d_output_and_forecaster_d_input():
    with pytest.raises(ValueError, match="d_output"):
        Regressor(ModelConfig(d_model=D, d_input=3))
    with pytest.raises(ValueError, match="d_output must equal d_input"):
        Forecaster(ModelConfig(d_model=D, d_input=3, d_output=2))


def test_forecaster_closed_loop_matches_forward():
    """forecast(context, h)[k] equals the forward output at the last position of context + forecasts[:k]."""
    model = cached_model(Forecaster, "mamba,gated,attn", d_input=2, d_output=2)
    ctx = torch.randn(2, 5, 2, dtype=torch.float64)
    with torch.no_grad():
        preds = model.forecast(ctx, 4)
        assert preds.shape == (2, 4, 2)
        for k in range(4):
            seq = torch.cat([ctx, preds[:, :k]], 1)
            assert_close(preds[:, k], model(seq).outputs[:, -1], TOL, f"forecast step {k}")
    with pytest.raises(ValueError, match="horizon"):
        model.forecast(ctx, 0)
