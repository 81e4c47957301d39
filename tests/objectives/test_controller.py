"""The Birdie reward, schedule, exploration, reward model and controller (on a synthetic loss simulator)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssmkit.objectives import BirdieController, ControllerConfig, RewardModel, birdie_reward, class_weights

TINY = dict(hidden=16, num_layers=1, fit_steps=40, num_candidates=256, lr=3e-3)


def test_reward_values():
    assert birdie_reward(4.5, 4.2) == pytest.approx(0.95, abs=0.01)
    assert birdie_reward(0.6, 0.5207) == pytest.approx(0.95, abs=0.01)
    # the formula itself, for a small change that does not saturate
    old, new = 3.0, 2.9
    ratio = (new - old) / old
    expect = -100 * math.e * math.tanh(math.e * math.sqrt(new * old) * ratio**3)
    assert birdie_reward(old, new) == pytest.approx(expect, rel=1e-12) and 0 < expect < 1
    r = birdie_reward([4.0, 4.0, 4.0, float("nan"), 4.0], [3.0, 4.0, 4.5, 3.0, float("nan")])
    assert r.tolist() == [1.0, 0.0, -1.0, 0.0, 0.0], "clipped to [-1, 1]; NaN gives 0"
    assert birdie_reward(2.0, 2.05) < 0 < birdie_reward(2.0, 1.95), "a decrease is rewarded, an increase not"
    with pytest.raises(ValueError, match="same shape"):
        birdie_reward([1.0, 2.0], [1.0])


def test_class_weights():
    w = class_weights(["infill", "infill", "infill", "ntp", "copy", "copy"])
    assert w.tolist() == pytest.approx([1 / 3] * 3 + [1.0] + [0.5] * 2)
    assert w.sum() == pytest.approx(3.0), "each class weighs 1 in a summed reward"


def test_schedule():
    cfg = ControllerConfig()
    due = [s for s in range(1, 6001) if cfg.is_eval_step(s)]
    assert due == [10, 50, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000, 6000]
    assert cfg.explore_prob(0) == pytest.approx(0.5) and cfg.explore_prob(cfg.explore_decay_steps) == 0.2
    assert cfg.explore_prob(cfg.explore_decay_steps // 2) == pytest.approx(0.35)
    assert cfg.explore_prob(10**9) == pytest.approx(0.2)
    probs = [cfg.explore_prob(s) for s in range(0, 9000, 100)]
    assert all(a >= b for a, b in zip(probs, probs[1:], strict=False)), "monotone decay"
    small = cfg.scaled(0.1)
    assert small.warmup_steps == 25 and small.eval_steps == (1, 5, 25, 50, 100, 150, 200)
    assert small.eval_every == 100 and small.explore_decay_steps == 819
    assert ControllerConfig.from_dict(small.to_dict()) == small
    with pytest.raises(ValueError, match="eval_steps"):
        ControllerConfig(eval_steps=(50, 10))
    with pytest.raises(ValueError, match="explore_min"):
        ControllerConfig(explore_min=0.6)
    with pytest.raises(ValueError, match="unknown layer"):
        ControllerConfig(layer="mlp")
    with pytest.raises(ValueError, match="unknown keys"):
        ControllerConfig.from_dict({"warmup": 3})


CLASSES = ["a", "a", "b", "c", "c", "c"]


def controller(**kw) -> BirdieController:
    cfg = ControllerConfig(**{**TINY, "warmup_steps": 0, "eval_steps": (1,), "eval_every": 1, **kw})
    return BirdieController([f"arm{i}" for i in range(len(CLASSES))], CLASSES, cfg)


def valid(p: np.ndarray, n: int) -> bool:
    return p.shape == (n,) and bool((p >= 0).all()) and abs(p.sum() - 1) < 1e-9


def test_explore_action():
    c = controller()
    classes = np.array(CLASSES)
    picked = []
    for _ in range(40):
        a = c.explore_action()
        assert valid(a, 6)
        mass = {k: a[classes == k].sum() for k in "abc"}
        big = [k for k, m in mass.items() if m > 0.1]
        assert 1 <= len(big) <= 2
        rest = [m for k, m in mass.items() if k not in big]
        assert all(m == pytest.approx(0.05 / len(rest)) for m in rest), "a little mass on the other classes"
        picked.append(len(big))
    assert set(picked) == {1, 2}
    cand = c.candidates()
    assert cand.shape == (256, 6) and np.allclose(cand.sum(1), 1) and (cand > 0).all()


def check_predict_next(layer: str) -> None:
    torch.manual_seed(0)
    m = RewardModel(3, hidden=8, num_layers=2, layer=layer).double()
    hist, q = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    got = m.predict_next(hist, q)
    want = torch.stack([m(torch.cat([hist, q[i:i + 1]])[None])[0, -1] for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.predict_next(hist[:0], q), m(q[:, None])[:, 0], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="2 \\* num_arms"):
        m.predict_next(hist, torch.randn(5, 4, dtype=torch.float64))


def test_reward_model_predict_next_matches_forward():
    check_predict_next("attention")  # the "gated" variant runs at the end of test_source.py (see there)


def simulate(c: BirdieController, n_evals: int, gains: np.ndarray) -> list[np.ndarray]:
    """Each arm's loss falls by gain * (its mixture mass) per interval: arm 0 falls fastest when sampled."""
    loss = np.full(len(gains), 4.0)
    actions = []
    step = 0
    for _ in range(n_evals):
        step += 1
        while not c.config.is_eval_step(step):
            step += 1
        a = c.on_eval(step, {f"arm{i}": v for i, v in enumerate(loss)})
        assert valid(a, len(gains))
        actions.append(a)
        loss = loss * (1 - gains * a)
    return actions


def test_controller_shifts_mass_to_the_fastest_falling_arm():
    c = controller(explore_max=0.0, explore_min=0.0, warmup_steps=3, eval_steps=(1, 2, 3, 4), hidden=32,
                   fit_steps=60, seed=1)
    gains = np.array([0.0, 0.0, 0.0, 0.3, 0.0, 0.0])
    actions = simulate(c, 10, gains)
    assert np.allclose(actions[0], 1 / 6) and np.allclose(actions[1], 1 / 6), "uniform during warmup"
    assert [e["explored"] for e in c.log] == [False] * 10
    final = np.mean(actions[-4:], axis=0)
    assert final.argmax() == 3 and final[3] > 0.3 and final[3] > 1.5 * np.sort(final)[-2], final
    rewards = np.array(c.log[3]["reward"])
    assert rewards[3] > 0.1 and np.abs(np.delete(rewards, 3)).max() == 0.0


def test_controller_explores_and_is_deterministic():
    kw = dict(explore_max=1.0, explore_min=1.0, warmup_steps=2, eval_steps=(1, 2))
    a, b = controller(**kw), controller(**kw)
    gains = np.array([0.1, 0.0, 0.05, 0.0, 0.0, 0.02])
    acts_a, acts_b = simulate(a, 4, gains), simulate(b, 4, gains)
    assert all(np.array_equal(x, y) for x, y in zip(acts_a, acts_b, strict=True)), "same seed, same actions"
    assert [e["explored"] for e in a.log] == [False, True, True, True]
    c = controller(**kw, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(acts_a, simulate(c, 4, gains), strict=True))


def test_controller_state_dict_round_trip():
    kw = dict(explore_max=0.5, explore_min=0.5, warmup_steps=1, eval_steps=(1, 2))
    gains = np.array([0.1, 0.0, 0.05, 0.0, 0.0, 0.02])
    a = controller(**kw)
    simulate(a, 3, gains)
    state = a.state_dict()
    b = controller(**kw)
    b.load_state_dict(state)
    for s, losses in ((4, np.full(6, 3.5)), (5, np.full(6, 3.4))):
        assert np.array_equal(a.on_eval(s, losses), b.on_eval(s, losses))
    with pytest.raises(ValueError, match="another ControllerConfig"):
        controller(**{**kw, "top_k": 4}).load_state_dict(state)


def test_controller_bad_input():
    c = controller()
    with pytest.raises(ValueError, match="one value per arm"):
        c.on_eval(1, [1.0, 2.0])
    with pytest.raises(ValueError, match="lack arms"):
        c.on_eval(1, {"arm0": 1.0})
    c.on_eval(3, np.ones(6))
    with pytest.raises(ValueError, match="not after the last evaluation"):
        c.on_eval(3, np.ones(6))
    with pytest.raises(ValueError, match="equal length"):
        BirdieController(["x", "y"], ["a"])
