"""Checks shared by the hybrid-family interop tests: tokens, logits, chunked cached steps, directory round trips."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tests.interop.hybrid_models import VOCAB

#: multi-token chunks through the cache and single steps (1): 16 positions in all
CHUNKS = (4, 3, 1, 5, 1, 2)


@contextmanager
def quiet_one_thread() -> Iterator[None]:
    """One torch thread (tiny models: thread hand-offs cost more than the work), transformers' warnings off."""
    import transformers

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.logging.set_verbosity_error()
            yield
    finally:
        torch.set_num_threads(n)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length) below VOCAB."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def logits(model, x: torch.Tensor) -> torch.Tensor:
    """model(x).logits without gradients: (batch, length, vocab)."""
    with torch.no_grad():
        return model(x).logits


def chunked_logits(model, x: torch.Tensor, chunks: tuple[int, ...] = CHUNKS) -> torch.Tensor:
    """The logits of ``x`` (batch, sum(chunks)) fed through ``model``'s cache in ``chunks`` (1 = a ``step``)."""
    assert sum(chunks) == x.shape[1], f"chunks {chunks} do not cover {x.shape[1]} positions"
    parts, state, pos = [], None, 0
    with torch.no_grad():
        for n in chunks:
            if n == 1:
                lg, state = model.step(x[:, pos], state)
                parts.append(lg[:, None])
            else:
                out = model(x[:, pos:pos + n], initial_state=state, return_final_state=True)
                parts.append(out.logits)
                state = out.state
            pos += n
    return torch.cat(parts, 1)


def check_directory_round_trip(hf, tmp_path: Path, tol: float) -> None:
    """transformers dir -> ssmkit (logits within ``tol``) -> ssmkit dir -> transformers (logits bit-equal)."""
    from ssmkit.interop import from_transformers, to_transformers

    hf.save_pretrained(tmp_path / "hf")
    ours = from_transformers(tmp_path / "hf")
    x = tokens(1, 9, seed=5)
    assert max_err(logits(ours, x), logits(hf, x)) <= tol
    ours.save_pretrained(tmp_path / "ours")
    back = to_transformers(tmp_path / "ours")
    assert torch.equal(logits(back, x), logits(hf, x))
