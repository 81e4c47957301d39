"""W8A8 decoding: each layer's integer product equals a numpy int64 oracle at decode shapes; stepping a sequence
token by token quantizes every activation to the same int8 codes as the forward and gives its logits (exactly
up to float64 rounding in float64; in float32 the first code that differs sits on a rounding boundary);
``generate`` runs and follows the forward's greedy choices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssmkit.infer import generate
from ssmkit.infer.w8a8 import W8A8Linear, quantize_w8a8
from ssmkit.infer.w8a8_step import W8A8Backbone, W8A8Mamba
from ssmkit.models import CausalLM, ModelConfig

B, L = 3, 24


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("rotate", [False, True])
def test_layer_equals_numpy_int64_oracle(rows, rotate):
    g = torch.Generator().manual_seed(rows + 10 * rotate)
    lin = torch.nn.Linear(96, 40, bias=True)
    x = torch.randn(rows, 96, generator=g) * 3
    q = W8A8Linear.from_linear(lin, 4.0 / 127, rotate)  # clips beyond 4
    xr = q.rotate(x).numpy()
    xq = np.clip(np.round(xr / np.float32(q.x_scale)), -127, 127).astype(np.int64)  # float32 division, as torch
    acc = xq @ q.qweight_t.numpy().astype(np.int64)
    codes, got = q.int_product(x)
    assert np.array_equal(codes.numpy(), xq) and np.array_equal(got.numpy(), acc)
    want = acc.astype(np.float64) * (q.w_scale.double().numpy() * q.x_scale) + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(q(x).double().numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _model(pattern: str) -> tuple[CausalLM, torch.Tensor]:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=64, n_layers=2, pattern=pattern, vocab_size=50)).eval()
    g = torch.Generator().manual_seed(1)
    q = quantize_w8a8(model, [torch.randint(0, 50, (2, 16), generator=g) for _ in range(2)])
    return q, torch.randint(0, 50, (B, L), generator=g)


def _run(q: CausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """(forward logits, stepped logits, {layer: unrounded codes x/s (B, L, in)} of each)."""
    seen: dict[str, list] = {}
    order: list[str] = []

    def hook(name):
        def fn(mod, args):
            if name not in order:
                order.append(name)
            seen.setdefault(name, []).append((mod.rotate(args[0]) / mod.x_scale).reshape(B, -1, mod.in_features))
        return fn

    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, W8A8Linear)]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        with torch.no_grad():
            ref = q(ids).logits
            fwd = {k: v[0] for k, v in seen.items()}
            seen.clear()
            state, out = q.backbone.init_state(B), []
            for t in range(L):
                logits, state = q.step(ids[:, t], state)
                out.append(logits)
    finally:
        for h in handles:
            h.remove()
    stepped = {k: torch.cat(v, 1) for k, v in seen.items()}
    return ref, torch.stack(out, 1), {k: fwd[k] for k in order}, stepped


@pytest.mark.parametrize("pattern", ["mamba", "mamba2", "mamba,gated"])
def test_step_equals_forward_in_float64(pattern):
    q, ids = _model(pattern)
    assert type(q.backbone) is W8A8Backbone
    if pattern.startswith("mamba,") or pattern == "mamba":
        assert type(q.backbone.blocks[0].mixer) is W8A8Mamba
    q = q.double()
    ref, got, fwd, stepped = _run(q, ids)
    assert len(fwd) == len(stepped) == sum(isinstance(m, W8A8Linear) for m in q.modules())
    for name, v in fwd.items():  # the same int8 codes (no float64 rounding lands on a boundary here)
        assert torch.equal(v.round().clamp(-127, 127), stepped[name].round().clamp(-127, 127)), name
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.parametrize("pattern", ["mamba", "mamba2"])
def test_step_vs_forward_in_float32(pattern):
    """In float32 the scan/conv/norm rounding differs between step and forward; a code can only differ where
    the value sits on a rounding boundary; later layers then see a different input (one code step)."""
    q, ids = _model(pattern)
    ref, got, fwd, stepped = _run(q, ids)
    for name, v in fwd.items():
        s = stepped[name]
        diff = v.round().clamp(-127, 127) != s.round().clamp(-127, 127)
        if diff.any():
            frac = (v[diff] - v[diff].floor() - 0.5).abs()
            assert float(frac.max()) < 1e-4, f"{name}: codes differ away from a rounding boundary"
            break  # downstream layers take the changed input
        # the same codes so far: the inputs agree to float32 rounding
        torch.testing.assert_close(s, v, rtol=1e-4, atol=1e-4 * float(v.abs().max()))
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_generate_follows_the_forward():
    q, ids = _model("mamba")
    q = q.double()
    new = generate(q, ids[:, :8], 10, temperature=0)
    assert new.shape == (B, 10)
    out = torch.cat([ids[:, :8], new], 1)
    with torch.no_grad():
        logits = q(out).logits
    assert torch.equal(out[:, 8:], logits[:, 7:-1].argmax(-1))


def test_no_weight_only_form():
    q, _ = _model("mamba")
    with pytest.raises(TypeError, match="no weight-only form"):
        q.backbone.blocks[0].mixer.step_weights()
