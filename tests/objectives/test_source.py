"""The mixture batch source: batch layout, sample boundaries, mixtures, determinism, resume, validation losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssmkit.data import IGNORE_INDEX, ByteTokenizer
from ssmkit.objectives import (
    PARADIGMS,
    BirdieMixture,
    ControllerConfig,
    MixtureBatchSource,
    ObjectiveVocab,
    birdie_arms,
    make_mixture,
    per_objective_losses,
    per_row_lm_loss,
)
from tests.objectives.test_controller import check_predict_next

TOK = ByteTokenizer()
VOCAB = ObjectiveVocab(TOK.vocab_size, num_placeholders=64)
ARMS = birdie_arms(VOCAB, length_scale=1 / 16, infill_lengths=((128, 256), (512, 1024)), infill_spans=(3, 32),
                   infill_rates=(0.15, 0.5), autoencoding_spans=(3,))
TOKENS = np.random.default_rng(0).integers(0, 256, 20_000)
CFG = ControllerConfig(hidden=16, num_layers=1, fit_steps=5, num_candidates=64, warmup_steps=2,
                       eval_steps=(1, 2, 4), eval_every=3)
PARADIGM_IDS = {VOCAB.paradigm_id(f): f for f in PARADIGMS}


def source(mixture: str = "fixed", seed: int = 0, **kw) -> MixtureBatchSource:
    mix = make_mixture(mixture, ARMS, config=CFG)
    return MixtureBatchSource(kw.pop("tokens", TOKENS), mix, batch_size=kw.pop("batch_size", 3), seq_len=96,
                              pad_id=TOK.pad_id, seed=seed, **kw)


def samples(batch: dict[str, torch.Tensor]) -> list[tuple[str, list[int], list[int], list[int]]]:
    """Every packed sample of a batch, checked for a well-formed layout: (family, tokens, labels, codes)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        starts = batch["reset"][r].nonzero().flatten().tolist()
        assert starts[0] == 0
        for s, e in zip(starts, [*starts[1:], batch["input_ids"].shape[1]], strict=True):
            ids = batch["input_ids"][r, s:e].tolist()
            labels = batch["labels"][r, s:e].tolist()
            codes = batch["reset_codes"][r, s:e].tolist()
            if ids[0] == TOK.pad_id:  # row padding: last segment, unscored
                assert e == batch["input_ids"].shape[1] and set(ids) == {TOK.pad_id}
                assert set(labels) == {IGNORE_INDEX}
                continue
            assert ids[0] in PARADIGM_IDS
            n_in = ids.index(VOCAB.start_id)
            assert codes == [1] + [0] * n_in + [2] * (e - s - n_in - 1), "start, prefix incl. [START], suffix"
            assert labels[:n_in] == [IGNORE_INDEX] * n_in and IGNORE_INDEX not in labels[n_in:]
            assert labels[n_in:-1] == ids[n_in + 1:], "each suffix position predicts the next token"
            out.append((PARADIGM_IDS[ids[0]], ids, labels, codes))
    return out


def test_batch_layout_and_sample_boundaries():
    src = source()
    assert src.vocab_size == VOCAB.vocab_size
    fams = set()
    for _ in range(4):
        b = src.next_batch()
        assert set(b) == {"input_ids", "labels", "reset", "prefix_mask", "reset_codes"}
        assert b["input_ids"].shape == (3, 96) and b["input_ids"].dtype == torch.long
        assert b["reset"].dtype == b["prefix_mask"].dtype == torch.bool
        assert torch.equal(b["reset"], b["reset_codes"] == 1) and torch.equal(b["prefix_mask"],
                                                                              b["reset_codes"] != 2)
        fams |= {f for f, *_ in samples(b)}
    assert len(fams) >= 5
    pad = (torch.stack([src.next_batch()["input_ids"] for _ in range(3)]) == TOK.pad_id).float()
    assert pad.mean() < 0.2, "rows are filled, not mostly padding"


def test_samples_follow_documents():
    """With doc_start, a text segment never crosses a document: each doc is one repeated token value."""
    lens = np.random.default_rng(1).integers(5, 60, 300)
    tokens = np.concatenate([np.full(n, i % 250) for i, n in enumerate(lens)])
    doc_start = np.zeros(len(tokens), dtype=bool)
    doc_start[np.concatenate([[0], np.cumsum(lens)[:-1]])] = True
    src = MixtureBatchSource(tokens, make_mixture("ntp", ARMS), batch_size=4, seq_len=64, pad_id=TOK.pad_id,
                             doc_start=doc_start)
    for _ in range(3):
        for fam, _, labels, _ in samples(src.next_batch()):
            assert fam == "next_token"
            assert len({x for x in labels if x != IGNORE_INDEX}) == 1


def test_mixture_shares():
    src = source("ul2", batch_size=8)
    for _ in range(25):
        src.next_batch()
    share = src.counts / src.counts.sum()
    probs = src.mixture.probs
    assert np.all(share[probs == 0] == 0) and abs(share - probs).max() < 0.1, (share, probs)
    assert probs[[i for i, a in enumerate(ARMS) if a.family == "next_token"]].sum() == pytest.approx(0.6)
    ntp = source("ntp")
    assert {f for f, *_ in samples(ntp.next_batch())} == {"next_token"}
    assert not ntp.mixture.prefix_bidirectional and not make_mixture("birdie-causal", ARMS).prefix_bidirectional
    with pytest.raises(ValueError, match="unknown mixture"):
        make_mixture("t5", ARMS)
    with pytest.raises(ValueError, match="infilling"):
        make_mixture("ul2", [a for a in ARMS if a.family != "infilling"])


def test_determinism_and_resume():
    a, b, c = source("birdie"), source("birdie"), source("birdie", seed=1)
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.next_batch()["input_ids"], c.next_batch()["input_ids"])
    b.next_batch()
    a.on_eval(4, {"objective_losses": {n: 4.0 for n in a.mixture.arm_names}})
    a.on_eval(5, {"loss": 1.0})  # other metrics are ignored
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    fresh = source("birdie")
    fresh.load_state_dict(state)
    assert np.array_equal(fresh.mixture.probs, src_probs := state["mixture"]["controller"]["action"])
    assert not np.allclose(src_probs, 1 / len(ARMS)), "the evaluation at step 4 changed the mixture"
    for want in expected:
        got = fresh.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="seed"):
        source("birdie", seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="mixture"):
        source("fixed").load_state_dict(state)


def row_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A cheap deterministic stand-in for a model's per-row loss."""
    scored = batch["labels"] != IGNORE_INDEX
    return 5.0 - scored.float().mean(1)


def test_self_evaluation_drives_birdie():
    src = source("birdie", loss_fn=row_loss)
    assert isinstance(src.mixture, BirdieMixture)
    for _ in range(8):
        src.next_batch()
    log = src.mixture.controller.log
    assert [e["step"] for e in log] == [1, 2, 4, 7], "evaluations follow the controller schedule"
    assert np.allclose(log[0]["action"], 1 / len(ARMS)) and not np.allclose(log[-1]["action"], 1 / len(ARMS))
    p = src.mixture.probs
    assert (p >= 0).all() and p.sum() == pytest.approx(1.0)
    assert src.eval_due(10) and not src.eval_due(11)


def test_validation_set_and_losses():
    src = source(val_rows=2, val_tokens=np.random.default_rng(5).integers(0, 256, 5000))
    vs = src.validation_set
    assert list(vs) == [a.name for a in ARMS] and src.validation_set is vs, "fixed, built once"
    for arm in ARMS:
        b = vs[arm.name]
        assert b["input_ids"].shape == (2, 96)
        assert {f for f, *_ in samples(b)} == {arm.family}, "an arm's validation rows hold only that arm"
    losses = src.validation_losses(row_loss)
    assert set(losses) == set(vs) and all(isinstance(v, float) for v in losses.values())
    for name, b in vs.items():
        assert losses[name] == pytest.approx(float(row_loss(b).mean()))
    scalar = per_objective_losses(lambda b: row_loss(b).mean(), vs)
    assert scalar == pytest.approx(losses)
    with pytest.raises(ValueError, match="per-row"):
        per_objective_losses(lambda b: b["labels"].float(), vs)


def test_per_row_lm_loss():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 6, 0, IGNORE_INDEX, 2]])
    got = per_row_lm_loss(logits, labels)
    for r in range(2):
        keep = labels[r] != IGNORE_INDEX
        assert got[r] == pytest.approx(float(F.cross_entropy(logits[r][keep], labels[r][keep])))
    with pytest.raises(ValueError, match="must agree"):
        per_row_lm_loss(logits, labels[:, :3])


def test_bad_arguments():
    with pytest.raises(ValueError, match="base_vocab_size"):
        source(tokens=np.array([1, 2, 400]))
    with pytest.raises(TypeError, match="Mixture"):
        MixtureBatchSource(TOKENS, ARMS, batch_size=2, seq_len=64, pad_id=256)
    with pytest.raises(ValueError, match="too short for arms"):
        MixtureBatchSource(TOKENS, make_mixture("fixed", ARMS), batch_size=2, seq_len=8, pad_id=256)
    with pytest.raises(ValueError, match="batch_size"):
        source(batch_size=0)


# The two tests below run last on purpose: on a busy machine, the numba OpenMP pool that GatedSSM's scan wakes
# can slow every later small torch op in this process; the attention variants run earlier.


def test_zz_packed_batch_through_prefix_bidirectional_layer():
    """A real packed batch through PrefixBidirectional (gated) equals each sample run alone."""
    from ssmkit.layers import PrefixBidirectional

    torch.manual_seed(0)
    layer = PrefixBidirectional(8, kind="gated").double()
    emb = torch.nn.Embedding(VOCAB.vocab_size, 8).double()
    b = source(batch_size=2).next_batch()
    with torch.no_grad():
        y = layer(emb(b["input_ids"]), reset=b["reset"], prefix_mask=b["prefix_mask"])
        for r in range(2):
            starts = b["reset"][r].nonzero().flatten().tolist()
            for s, e in zip(starts, [*starts[1:], 96], strict=True):
                alone = layer(emb(b["input_ids"][r:r + 1, s:e]), prefix_mask=b["prefix_mask"][r:r + 1, s:e])
                torch.testing.assert_close(y[r:r + 1, s:e], alone, rtol=1e-10, atol=1e-10)


def test_zz_gated_reward_model():
    check_predict_next("gated")
