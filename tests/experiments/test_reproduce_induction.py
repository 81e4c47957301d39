"""The induction reproduction's evaluation: chunked = one pass, the hand-set Mamba oracle, the chance stop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ssmkit.experiments.reproduce import induction
from ssmkit.experiments.reproduce.induction import VOCAB, accuracy_at, evaluate, last_logits, oracle_mamba
from ssmkit.experiments.reproduce.registry import Setting
from ssmkit.train import resolve_run


def build(model: dict, seq_len: int = 64, dtype: str = "float32"):
    sections = {"task": {"name": "induction_heads", "vocab_size": VOCAB, "seq_len": seq_len},
                "model": model, "train": {"dtype": dtype}}
    return resolve_run(sections).build_model().eval()


@pytest.mark.parametrize("name", ["mamba2", "s4d", "mamba3", "attn"])
def test_chunked_evaluation_equals_one_pass(name):
    torch.manual_seed(0)
    model = build({**induction.MODELS[name], "d_model": 16}, seq_len=40, dtype="float64")
    ids = torch.randint(0, VOCAB, (2, 40))
    whole = last_logits(model, ids, 40)
    assert torch.allclose(last_logits(model, ids, 7), whole, rtol=0, atol=1e-9)


def test_oracle_mamba_recalls_at_every_length_in_chunks():
    torch.manual_seed(0)
    model = oracle_mamba(build({"preset": "mamba", "d_model": 64}))
    for length in (16, 300):
        assert accuracy_at(model, length, 8, chunk=37, seed=length) == 1.0, length
    # the same weights with the write gate off (no Delta spike after the trigger) recall nothing
    with torch.no_grad():
        model.backbone.blocks[1].mixer.dt_proj.weight.zero_()
    assert accuracy_at(model, 64, 8, chunk=37) < 0.5


def test_oracle_mamba_rejects_a_too_small_model():
    with pytest.raises(ValueError, match="oracle_mamba: expected vocabulary >= 16, d_model >= 32"):
        oracle_mamba(build({"preset": "mamba", "d_model": 16}))


class ConstantModel(torch.nn.Module):
    """Always predicts token 1 (accuracy = chance); counts the tokens it was fed."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = 0

    def forward(self, ids, state=None, return_final_state=False):
        self.tokens += ids.numel()
        logits = torch.zeros(*ids.shape, VOCAB)
        logits[..., 1] = 1.0
        return SimpleNamespace(logits=logits, state=None)


def test_evaluate_stops_a_model_at_chance_after_two_lengths():
    model = ConstantModel()
    out = evaluate(model, None, Setting("s4d", {}, meta={"model": "s4d"}), quick=False)
    acc = out["accuracy_by_length"]
    assert out["stopped_at"] == 2 ** 8
    assert acc["64"] is not None and acc["128"] is not None
    assert all(acc[str(2 ** k)] is None for k in range(8, 21))
    assert model.tokens == 64 * (64 + 128)
