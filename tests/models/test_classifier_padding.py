"""SequenceClassifier on right-padded batches: a causal backbone skips the segment cut at the padding (keeping
SSMs on their convolution path) with logits unchanged; non-causal or left-padded inputs still get the cut."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models import SequenceClassifier
from ssmkit.models.heads import _padding_reset

from .util import cached_model, ids

LENGTHS = (5, 11, 1, 8)  # ragged real lengths; the batch is padded to 12
PAD_LEN = 12


def _batch(seed: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    seqs = [ids(1, n, seed=seed + i) for i, n in enumerate(LENGTHS)]
    rows, masks = [], []
    for s in seqs:
        fill = torch.full((1, PAD_LEN - s.shape[1]), 7)  # real-looking ids in the padding
        rows.append(torch.cat([fill, s] if left else [s, fill], 1))
        m = torch.zeros(1, PAD_LEN, dtype=torch.bool)
        if left:
            m[:, PAD_LEN - s.shape[1]:] = True
        else:
            m[:, : s.shape[1]] = True
        masks.append(m)
    return torch.cat(rows), torch.cat(masks), seqs


def _spy(model: SequenceClassifier, monkeypatch) -> list:
    """Record the reset each backbone call receives."""
    seen: list = []
    original = model.backbone.forward

    def forward(*args, **kw):
        seen.append(kw.get("reset"))
        return original(*args, **kw)

    monkeypatch.setattr(model.backbone, "forward", forward)
    return seen


@pytest.mark.parametrize("pattern", ["s4d", "mamba", "mamba2", "longconv", "h3", "gated,attn", "rglru"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_causal_right_padding_skips_the_cut_with_equal_logits(pattern, pooling, monkeypatch):
    model = cached_model(SequenceClassifier, pattern, num_classes=3, pooling=pooling)
    x, valid, seqs = _batch(seed=40)
    seen = _spy(model, monkeypatch)
    with torch.no_grad():
        fast = model(x, padding_mask=valid).logits
        assert seen == [None], "a causal, right-padded batch must reach the backbone without resets"
        cut = model.backbone(x, reset=_padding_reset(None, valid, False))[0]  # the old, always-cut path
        old = model.classifier(model.pool(cut, None, valid))
        alone = torch.cat([model(s).logits for s in seqs])
    torch.testing.assert_close(fast, old, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast, alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", ["bi-gated,mamba"])
def test_non_causal_model_still_cuts_at_the_padding(pattern, monkeypatch):
    model = cached_model(SequenceClassifier, pattern, num_classes=3, pooling="mean")
    x, valid, seqs = _batch(seed=50)
    seen = _spy(model, monkeypatch)
    with torch.no_grad():
        out = model(x, padding_mask=valid).logits
        alone = torch.cat([model(s).logits for s in seqs])
    assert seen[0] is not None and bool(seen[0][:, 1:].any())
    torch.testing.assert_close(out, alone, rtol=1e-10, atol=1e-10)


def test_left_padding_and_final_state_keep_the_cut(monkeypatch):
    model = cached_model(SequenceClassifier, "s4d", num_classes=3, pooling="last")
    x, valid, seqs = _batch(seed=60, left=True)
    seen = _spy(model, monkeypatch)
    with torch.no_grad():
        out = model(x, padding_mask=valid).logits
        alone = torch.cat([model(s).logits for s in seqs])
        xr, vr, _ = _batch(seed=60)
        model(xr, padding_mask=vr, return_final_state=True)
    assert seen[0] is not None and bool(seen[0].any())
    assert seen[-1] is not None and bool(seen[-1].any()), "a returned final state keeps the cut"
    torch.testing.assert_close(out, alone, rtol=1e-10, atol=1e-10)


def test_packed_rows_with_padding_between_segments_keep_the_cut(monkeypatch):
    model = cached_model(SequenceClassifier, "s4d", num_classes=3, pooling="mean")
    a, b = ids(1, 3, seed=70), ids(1, 4, seed=71)
    x = torch.cat([a, torch.full((1, 2), 7), b], 1)
    valid = torch.tensor([[True] * 3 + [False] * 2 + [True] * 4])
    reset = torch.zeros(1, 9, dtype=torch.bool)
    reset[0, 5] = True
    seen = _spy(model, monkeypatch)
    with torch.no_grad():
        out = model(x, reset=reset, padding_mask=valid).logits
        alone = torch.cat([model(a).logits, model(b).logits])
    assert bool(seen[0][0, 3])  # the padding start is still a segment start
    torch.testing.assert_close(out, alone, rtol=1e-10, atol=1e-10)
