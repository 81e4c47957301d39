"""generate's defaults match transformers' generate: greedy, so a converted model continues a prompt the same way
with no options given (a small random MambaForCausalLM built here; nothing is downloaded)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ssmkit.infer import generate  # noqa: E402
from ssmkit.interop.models import from_transformers  # noqa: E402

transformers = pytest.importorskip("transformers")


def test_default_is_greedy_like_transformers_generate():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = transformers.MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=2, vocab_size=48,
                                       pad_token_id=None, bos_token_id=None, eos_token_id=None)
        hf = transformers.MambaForCausalLM(cfg).eval()
        with torch.no_grad():  # move every weight off its initial value
            for p in hf.parameters():
                p.add_(torch.randn(p.shape) * 0.2)
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(3))
    ours = from_transformers(hf)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        want = hf.generate(ids, max_new_tokens=24)[:, ids.shape[1]:]  # transformers' defaults: greedy
    got = generate(ours, ids, 24)
    assert torch.equal(got, generate(ours, ids, 24, temperature=0))
    assert torch.equal(got, want)
    assert len(set(got.flatten().tolist())) > 4  # a non-degenerate continuation
