"""One state vocabulary: models take initial_state / return_final_state; the old keywords warn; the library's own
code paths (forward, step, generate, forecast, chunked training, the Birdie reward model, activation
checkpointing) raise no DeprecationWarning of ssmkit's."""

from __future__ import annotations

import warnings

import pytest
import torch

from ssmkit.infer import generate
from ssmkit.models import CausalLM, Forecaster, PrefixLM
from ssmkit.objectives.reward import RewardModel
from ssmkit.train.chunked import chunked_loss_backward
from tests.models.util import VOCAB, tiny_config

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:ssmkit")


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_library_paths_raise_no_deprecation_warning():
    torch.manual_seed(0)
    lm = CausalLM(tiny_config("mamba,attn,mamba2,gated", n_layers=4)).eval()
    x = ids(2, 6)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = lm(x[:, :4], return_final_state=True)
        lm(x[:, 4:], initial_state=out.state)
        lm.step(x[:, 4], out.state)
        generate(lm, x, 3)
        lm.train()
        chunked_loss_backward(lm, {"input_ids": x, "labels": ids(2, 6, 1)}, 3)
        fc = Forecaster(tiny_config("gated", d_input=2, d_output=2)).eval()
        fc.forecast(torch.randn(1, 5, 2), 3)
        plm = PrefixLM(tiny_config("gated,s4d", n_layers=2)).eval()
        plm(x, prefix_mask=torch.arange(6).expand(2, 6) < 2, return_final_state=True)
        rm = RewardModel(2, hidden=8, num_layers=1)
        rm.predict_next(torch.randn(3, 4), torch.randn(2, 4))
        rm(torch.randn(1, 3, 4), return_final_state=True)
    ours = [w for w in rec if issubclass(w.category, DeprecationWarning) and "ssmkit" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]


def test_model_deprecated_state_keywords_warn_and_agree():
    torch.manual_seed(1)
    lm = CausalLM(tiny_config("mamba,attn", n_layers=2)).eval()
    x = ids(2, 7, 3)
    with torch.no_grad():
        a = lm(x[:, :3], return_final_state=True)
        b = lm(x[:, 3:], initial_state=a.state, return_final_state=True)
        with pytest.warns(DeprecationWarning, match=r"CausalLM\.forward: the keyword return_state= is deprecated"):
            a2 = lm(x[:, :3], return_state=True)
        with pytest.warns(DeprecationWarning, match=r"the keyword state= is deprecated; use initial_state="):
            b2 = lm(x[:, 3:], state=a2.state, return_final_state=True)
        with pytest.warns(DeprecationWarning, match=r"Backbone\.forward: the keyword return_state="):
            h, s = lm.backbone(x, return_state=True, input_name="input_ids")
    assert torch.equal(a2.logits, a.logits) and torch.equal(b2.logits, b.logits) and s is not None
    with pytest.raises(TypeError, match=r"^CausalLM\.forward: return_final_state must be a bool, got int$"):
        lm(x, return_final_state=1)
    with pytest.raises(TypeError, match="both initial_state= and its deprecated alias state="):
        lm(x, initial_state=a.state, state=a.state)
