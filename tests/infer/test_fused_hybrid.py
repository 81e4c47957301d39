"""The one-launch hybrid decode step (ssmkit.infer.fused_hybrid) against the block-by-block CausalLM.step and the
full forward, in float64."""

import threading
import time

import pytest
import torch

from ssmkit.infer import generate
from ssmkit.infer.fused_hybrid import decode_step, hybrid_plan, hybrid_step
from ssmkit.models.config import ModelConfig
from ssmkit.models.heads import CausalLM

OPTS = {
    "mamba2": dict(d_state=8, headdim=8, ngroups=2, chunk_size=4, dt_limit=(0.002, 0.5), bias=True),
    "gqa": dict(n_heads=4, n_kv_heads=2, head_dim=8, rotary_dim=4, rotary_base=500.0, scale=0.3, qkv_bias=True,
                out_bias=True, key_multiplier=0.7),
    "ffn": dict(d_hidden=24, act="relu2", gated=False, bias=True),
}


def _model(pattern, seed=0, *, ffn=None, dtype=torch.float64, **cfg):
    torch.manual_seed(seed)
    opts = dict(OPTS, ffn=ffn or OPTS["ffn"])
    m = CausalLM(ModelConfig(d_model=16, pattern=pattern, vocab_size=40, mixer_options=opts, norm="rmsnorm",
                             mlp="none", tie_embeddings=False, **cfg)).to(dtype).eval()
    with torch.no_grad():  # move every parameter off its initial value (norm weights, biases, D, ...)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


PATTERN = ["mamba2", "ffn", "gqa", "ffn", "mamba2", "gqa"]


def _close(a, b, tol=1e-10):
    assert float((a - b).abs().max()) < tol, float((a - b).abs().max())


@pytest.mark.parametrize("ffn", [None, dict(d_hidden=20, act="silu", gated=True, bias=False, gate_multiplier=1.3,
                                            down_multiplier=0.6), dict(d_hidden=20, act="gelu", gated=False)])
@torch.no_grad()
def test_steps_equal_block_steps_and_forward(ffn):
    m = _model(PATTERN, ffn=ffn, residual_multiplier=0.8, logits_scaling=1.5)
    m.backbone.blocks[3].residual_multiplier = 0.55  # blocks' multipliers may differ from the config's
    assert hybrid_plan(m) is not None
    x = torch.randint(0, 40, (3, 14), generator=torch.Generator().manual_seed(1))
    state = m(x[:, :5], return_final_state=True).state
    fused, plain = state, state
    for t in range(5, 14):
        lf, fused = hybrid_step(m, x[:, t], fused)
        lp, plain = m.step(x[:, t], plain)
        _close(lf, lp)
    _close(lf, m(x).logits[:, -1])
    for a, b in zip(fused.layers, plain.layers, strict=True):
        ta, tb = a.tensors(), b.tensors()
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].shape == tb[k].shape, k
            _close(ta[k].double(), tb[k].double())


@torch.no_grad()
def test_packed_rows_and_empty_cache():
    """Rows whose segment started inside the cache (a reset in the prompt) see only their segment; a fresh state
    (empty KV cache) steps too."""
    m = _model(PATTERN, seed=2)
    x = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    reset = torch.zeros(2, 8, dtype=torch.bool)
    reset[0, 5] = True
    state = m(x[:, :8], reset=reset, return_final_state=True).state
    assert int(state.layers[2].pos[0]) == 3
    fused, plain = state, state
    for t in range(8, 12):
        lf, fused = hybrid_step(m, x[:, t], fused)
        lp, plain = m.step(x[:, t], plain)
        _close(lf, lp)
        assert fused.layers[2].k.shape == plain.layers[2].k.shape
    fused, plain = m.backbone.init_state(2), m.backbone.init_state(2)
    for t in range(3):
        lf, fused = hybrid_step(m, x[:, t], fused)
        lp, plain = m.step(x[:, t], plain)
        _close(lf, lp)


@torch.no_grad()
def test_kv_written_in_place_once_and_branches_safe():
    m = _model(PATTERN, seed=4)
    x = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(5))
    s0 = m(x[:, :6], return_final_state=True).state
    _, s1 = hybrid_step(m, x[:, 6], s0)
    _, s2 = hybrid_step(m, x[:, 7], s1)
    assert s2.layers[2].k._base is s1.layers[2].k._base  # the second step wrote into the first one's buffer
    k1 = s1.layers[2].k.clone()
    l_a, _ = hybrid_step(m, x[:, 8], s1)  # a second step from s1: its slot is taken, so the cache is copied
    l_b, _ = hybrid_step(m, x[:, 7], s1)
    assert torch.equal(s1.layers[2].k, k1)
    l_c, _ = hybrid_step(m, x[:, 8], s2)
    _close(l_c, m(x[:, :9]).logits[:, -1])
    _close(l_a, m.step(x[:, 8], s1)[0])
    _close(l_b, m.step(x[:, 7], s1)[0])


@torch.no_grad()
def test_generate_uses_it_and_matches_block_steps():
    m = _model(PATTERN, seed=6)  # float64: the one compiled signature of this file (float32 runs in tests/interop)
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(7))
    out = generate(m, x, 12)
    state = m(x, return_final_state=True).state
    logits = m(x).logits[:, -1]
    toks = []
    for _ in range(12):
        tok = logits.argmax(-1)
        toks.append(tok)
        logits, state = m.step(tok, state)
    assert torch.equal(out, torch.stack(toks, 1))
    lf, _ = decode_step(m, toks[0], m(x, return_final_state=True).state)
    assert lf.dtype == torch.float64


def test_not_eligible_returns_none():
    x = torch.zeros(1, dtype=torch.long)
    for pattern, kw in ((["mamba", "ffn"], {}), (["mamba2", "ffn"], {"logits_soft_cap": 5.0}), (["gqa", "mamba"], {})):
        m = _model(pattern, **kw)
        assert hybrid_plan(m) is None
        with torch.no_grad():
            assert hybrid_step(m, x, m.backbone.init_state(1)) is None
    m = _model(["mamba2", "gqa"])
    with torch.no_grad():
        f32 = m.backbone.init_state(1).map(lambda t: t.float() if t.is_floating_point() else t)
        assert hybrid_step(m, x, f32) is None  # a state in another dtype
        assert hybrid_step(m, x, m.backbone.init_state(2)) is None  # the state's batch differs from the tokens'
        assert hybrid_step(m, x, m.backbone.init_state(1)) is not None
    assert hybrid_step(m, x, m.backbone.init_state(1)) is None  # gradients needed: the block-by-block path


@torch.no_grad()
def test_in_place_weight_updates_after_the_plan_reach_the_step():
    """The plan copies the block norms and q/k/v into stacked arrays; updating them in place (an optimizer step,
    load_state_dict) must rebuild it, not step with the old values."""
    m = _model(PATTERN, seed=8)
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(9))
    state = m(x[:, :6], return_final_state=True).state
    hybrid_step(m, x[:, 6], state)  # builds and caches the plan
    m.backbone.blocks[2].mixer.q_proj.weight.add_(0.05)
    m.backbone.blocks[5].mixer.v_proj.bias.mul_(2)
    m.backbone.blocks[0].norm.weight.mul_(1.5)
    m.backbone.blocks[1].residual_multiplier = 0.3  # a plain attribute: the plan's settings key sees it
    lf, _ = hybrid_step(m, x[:, 6], state)
    _close(lf, m.step(x[:, 6], state)[0])


@torch.no_grad()
def test_a_batch_prefix_of_a_fused_state_steps_correctly():
    """A state cut to its first rows (views of the fused step's KV buffer) is not mistaken for the buffer."""
    m = _model(PATTERN, seed=10)
    x = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(11))
    state = m(x[:, :6], return_final_state=True).state
    _, s1 = hybrid_step(m, x[:, 6], state)
    part = s1.map(lambda t: t[:2])
    lf, s2 = hybrid_step(m, x[:2, 7], part)
    lp, p2 = m.step(x[:2, 7], part)
    _close(lf, lp)
    lf, _ = hybrid_step(m, x[:2, 8], s2)
    _close(lf, m.step(x[:2, 8], p2)[0])


@torch.no_grad()
def test_two_threads_stepping_one_state_get_their_own_kv_slots(monkeypatch):
    """Thread A finds its KV buffers and pauses before its launch; thread B steps from the same state meanwhile.
    B must not write A's slot (B's returned cache would then hold A's key): the slot is claimed under a lock."""
    import ssmkit.infer.fused_hybrid as fh

    m = _model(PATTERN, seed=12)
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(13))
    _, s1 = hybrid_step(m, x[:, 6], m(x[:, :6], return_final_state=True).state)  # views of a buffer with room
    real, found = fh._kv_buffers, threading.Event()

    def pausing(states, plan):
        out = real(states, plan)
        if threading.current_thread().name == "A":
            found.set()
            time.sleep(0.3)
        return out

    monkeypatch.setattr(fh, "_kv_buffers", pausing)
    res = {}

    def step(name, t):
        with torch.no_grad():  # grad mode is per thread
            res[name] = hybrid_step(m, x[:, t], s1)

    threads = {n: threading.Thread(target=step, args=(n, t), name=n) for n, t in (("A", 7), ("B", 8))}
    threads["A"].start()
    assert found.wait(30)
    threads["B"].start()
    for th in threads.values():
        th.join()
    monkeypatch.setattr(fh, "_kv_buffers", real)
    for n, t in (("A", 7), ("B", 8)):
        lf, sf = res[n]
        lp, sp = m.step(x[:, t], s1)
        _close(lf, lp)
        _close(hybrid_step(m, x[:, 5], sf)[0], m.step(x[:, 5], sp)[0])
