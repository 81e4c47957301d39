"""ONNX export: the traceable step equals each layer's step; onnxruntime equals ssmkit for a prefill and 64 steps."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import ssmkit.export.onnx as onnx_export  # noqa: E402
from ssmkit.export.onnx import OnnxLM, export_onnx  # noqa: E402
from ssmkit.export.onnx_step import StepModule, flat_to_state, state_to_flat  # noqa: E402

from .conftest import small_lm  # noqa: E402

SLIDING = {"attn": {"mask": "sliding", "window": 5, "rotary": True}}
CASES = {
    "mamba": ("mamba*2", {}),
    "mamba2": ("mamba2*2", {}),
    "s4d": ("s4d*2", {}),
    "gated": ("gated*2", {}),
    "rglru": ("rglru*2", {}),
    "hybrid": ("mamba,attn,mamba2", {"mlp": "swiglu"}),
    "sliding": ("attn,gated", {"mixer_options": SLIDING}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_module_equals_the_layers_step(case):
    pattern, kw = CASES[case]
    model = small_lm(pattern, vocab=50, **kw)
    ids = torch.randint(0, 50, (3, 12))
    step = StepModule(model)
    with torch.no_grad():
        state = model(ids[:, :6], return_final_state=True).state
        flat = state_to_flat(state)
        for t in range(6, 12):
            ref, state = model.step(ids[:, t], state)
            got, *flat = step(ids[:, t], *flat)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    for a, b in zip(flat_to_state(model, flat).tensors().values(), state.tensors().values(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# every mixer ONNX export supports in one model: one export (about 10 s) keeps the suite fast; each pure-family
# model was checked the same way by hand (docs/export.md)
EXPORTS = {"all": ("mamba,attn,mamba2,s4d,gated,rglru", {"mlp": "swiglu"})}


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, tmp_path_factory):
    pattern, kw = EXPORTS[request.param]
    model = small_lm(pattern, vocab=50, d_model=32, mixer_options={"mamba2": {"d_state": 8, "headdim": 8}}, **kw)
    out = export_onnx(model, tmp_path_factory.mktemp("onnx") / "out")
    return model, OnnxLM(out, threads=1)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("batch,length", [(2, 7), (3, 1)])
def test_onnxruntime_equals_ssmkit_for_prefill_and_64_steps(exported, batch, length):
    model, lm = exported
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 50, (batch, length), generator=gen)
    with torch.no_grad():
        out = model(ids, return_final_state=True)
    logits, states = lm.prefill(ids.numpy())
    np.testing.assert_allclose(logits, out.logits.numpy(), rtol=0, atol=1e-4)
    flat = state_to_flat(out.state)
    assert len(flat) == len(states)
    for ref, got in zip(flat, states.values(), strict=True):
        assert got.shape == tuple(ref.shape)
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-4)
    state, worst = out.state, 0.0
    for _ in range(64):
        tok = torch.randint(0, 50, (batch,), generator=gen)
        with torch.no_grad():
            ref, state = model.step(tok, state)
        got, states = lm.step(tok.numpy(), states)
        worst = max(worst, float(np.abs(got - ref.numpy()).max()))
    assert worst < 1e-4
    if "state_out.1.k" in states:  # the attention KV cache grew by one entry per step
        assert states["state_out.1.k"].shape[2] == length + 64


def test_manifest_and_graph_io(exported):
    model, lm = exported
    man = lm.manifest
    assert man["vocab_size"] == 50 and man["pattern"] == model.backbone.mixer_names
    names = [i.name for i in lm.step_session.get_inputs()]
    assert names == man["step"]["inputs"] and names[0] == "token"
    assert [o.name for o in lm.prefill_session.get_outputs()] == man["prefill"]["outputs"]
    assert [i.name for i in lm.prefill_session.get_inputs()] == ["input_ids"]


def test_unsupported_models_and_failed_exports(tmp_path, monkeypatch):
    for pattern, match in (("s4", r"layer 0 is 's4'"), ("mamba,h3", r"layer 1 is 'h3'")):
        with pytest.raises(ValueError, match=r"ONNX export supports a float32 CausalLM .*" + match):
            export_onnx(small_lm(pattern), tmp_path / "x")
    with pytest.raises(ValueError, match=r"multiplier 1.0; the config has embedding_multiplier=2.0$"):
        export_onnx(small_lm("mamba", embedding_multiplier=2.0), tmp_path / "x")
    with pytest.raises(ValueError, match=r"float64 \(cast with .float\(\)\)"):
        export_onnx(small_lm("mamba").double(), tmp_path / "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier ssmkit ONNX export"):
        export_onnx(small_lm("gated"), tmp_path / "taken")

    def boom(*a, **k):
        raise RuntimeError("no space")

    monkeypatch.setattr(onnx_export, "prefill_from_step", boom)
    with pytest.raises(RuntimeError, match="no space"):
        export_onnx(small_lm("gated", d_model=16), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
