"""Opt-in: llama.cpp itself loads ssmkit's GGUF files and computes the same logits and tokens.

Runs only where the ``llama_cpp`` package (llama-cpp-python, which builds llama.cpp) is importable; the suite's
environment does not install it, so CI never builds llama.cpp.
"""

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from ssmkit.data import get_tokenizer  # noqa: E402
from ssmkit.export import to_gguf  # noqa: E402

from .conftest import small_lm  # noqa: E402

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nÜñïcödé 12345"


@pytest.mark.parametrize("arch,opts", [("mamba", {}), ("mamba2", {"d_state": 32, "headdim": 16, "ngroups": 2})])
@pytest.mark.parametrize("quant,tol", [("f32", 1e-3), ("q8_0", 0.2)])
def test_llama_cpp_logits_and_tokens_equal_ssmkit(tmp_path, arch, opts, quant, tol):
    model = small_lm(f"{arch}*3", vocab=264, tie=arch == "mamba", mixer_options={"mamba2": opts})
    path = to_gguf(model, tmp_path / "m.gguf", quant=quant, tokenizer="byte")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=2,
                          verbose=False)
    ids = get_tokenizer("byte").encode(TEXT)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == TEXT
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    if quant != "f32":
        from ssmkit.interop import from_gguf

        model = from_gguf(path)  # llama.cpp computes with the quantized weights: compare with them
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < tol
