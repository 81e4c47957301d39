"""Retrieval evaluations of objective-trained language models: phone-book lookup and infilling.

Both use the objectives' packed format (``input + [START] + label``; see :mod:`ssmkit.objectives.packing`) with
the prefix-LM paradigm for phone books, so a model pretrained on objective mixtures sees a familiar layout.

* :func:`phonebook_pair` builds one phone-book sample in the Birdie paper's format (question, book of
  ``Name : XXX-XXX-XXXX`` lines, question again) with the queried numbers as the label, then [DONE].
* :func:`finetune_phonebook` trains a model briefly on phone books with 1..max queried numbers.
* :func:`phonebook_digit_accuracy` generates each answer greedily (prefill with the prompt as prefix, then
  recurrent steps) and scores the digits position by position against the target.
* :func:`mqar_pair` / :func:`finetune_mqar` / :func:`mqar_accuracy`: multi-query associative recall in the same
  prefix format (keys and values are byte ids), teacher-forced value accuracy after a short fine-tune.
* :func:`infilling_accuracy` scores span-corruption labels teacher-forced: the share of masked-out text tokens
  (placeholders excluded) that the model predicts right, and the share of spans predicted entirely right.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ssmkit.data import IGNORE_INDEX
from ssmkit.data.phonebook import Phonebook
from ssmkit.infer import generate
from ssmkit.models import CausalLM
from ssmkit.objectives import Infilling, ObjectiveVocab
from ssmkit.objectives.objectives import Pair
from ssmkit.objectives.packing import RowBuilder, rows_to_batch


@dataclass(frozen=True)
class PhonebookSample:
    """One phone-book sample: the pair to pack and the target text (digits are scored)."""

    pair: Pair
    target: str


def phonebook_pair(vocab: ObjectiveVocab, rng: np.random.Generator, num_entries: int, num_queries: int,
                   digits: int = 10, name_parts: int = 2) -> PhonebookSample:
    """A byte-level phone-book pair: input = <|PREFIX_LM|> + question, book, question; label = the asked numbers
    (``"XXX-XXX-XXXX, ..."`` for 10 digits, else plain ``digits`` digits; in the order asked) + [DONE]. Needs
    ``vocab.base_vocab_size >= 256``."""
    if vocab.base_vocab_size < 256:
        raise ValueError(f"phonebook_pair needs a byte-level vocabulary (base_vocab_size >= 256), got "
                         f"{vocab.base_vocab_size}")
    prompt, target, _, _ = _phonebook(num_entries, num_queries, digits, name_parts).text(rng)
    inp = np.concatenate([[vocab.paradigm_id("prefix_lm")], np.frombuffer(prompt.encode(), dtype=np.uint8)])
    lab = np.concatenate([np.frombuffer(target.encode(), dtype=np.uint8), [vocab.done_id]])
    return PhonebookSample(Pair(inp.astype(np.int64), lab.astype(np.int64), 0), target)


@functools.lru_cache(maxsize=64)
def _phonebook(num_entries: int, num_queries: int, digits: int, name_parts: int) -> Phonebook:
    return Phonebook(num_entries=num_entries, min_queries=num_queries, max_queries=num_queries, question="both",
                     digits=digits, name_parts=name_parts)


def phonebook_length(vocab: ObjectiveVocab, num_entries: int, num_queries: int, samples: int = 64,
                     seed: int = 0, digits: int = 10, name_parts: int = 2) -> int:
    """The longest packed length among ``samples`` random phone books of this size (for choosing seq_len)."""
    rng = np.random.default_rng(seed)
    return max(phonebook_pair(vocab, rng, num_entries, num_queries, digits, name_parts).pair.packed_len
               for _ in range(samples))


def _batch(pairs: Sequence[Pair], seq_len: int, pad_id: int, start_id: int) -> dict[str, torch.Tensor]:
    rows = []
    for p in pairs:
        row = RowBuilder(seq_len, pad_id, start_id)
        if not row.add(p):
            raise ValueError(f"a phone-book sample of packed length {p.packed_len} does not fit seq_len={seq_len}")
        rows.append(row.finish())
    return rows_to_batch(rows)


def _run(model: CausalLM, batch: dict[str, torch.Tensor], **kw):
    """The model's output on a packed batch: ``reset`` always, ``prefix_mask`` for models with prefix layers."""
    if model.backbone.accepts_prefix:
        kw["prefix_mask"] = batch["prefix_mask"]
    return model(batch["input_ids"], reset=batch["reset"], **kw)


def finetune_on_batches(model: CausalLM, make_batch: Callable[[np.random.Generator], dict[str, torch.Tensor]], *,
                        steps: int, lr: float, seed: int = 0, desc: str = "fine-tune", quiet: bool = True
                        ) -> list[float]:
    """Fine-tune ``model`` in place on ``make_batch(rng)`` batches (input_ids, labels, reset, prefix_mask).

    AdamW (weight decay 0), linear warm-up over 10% of the steps then cosine to 10%; gradient clipping at 1.
    Returns the per-step training losses; leaves the model in eval mode.
    """
    if steps < 0:
        raise ValueError(f"finetune_on_batches: steps must be >= 0, got {steps}")
    rng = np.random.default_rng([seed, 7])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    losses: list[float] = []
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=quiet):
        scale = (step + 1) / warm if step < warm else 0.1 + 0.9 * 0.5 * (
            1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        batch = make_batch(rng)
        out = _run(model, batch, labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def finetune_on_pairs(model: CausalLM, vocab: ObjectiveVocab, make_pair: Callable[[np.random.Generator], Pair], *,
                      steps: int, batch_size: int, lr: float, pad_id: int, seed: int = 0, desc: str = "fine-tune",
                      quiet: bool = True, mask_labels: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> list[float]:
    """:func:`finetune_on_batches` on pairs from ``make_pair(rng)``, packed one per row and padded to the
    longest sample of the batch; ``mask_labels`` (labels -> labels) may unscore positions."""
    if batch_size < 1:
        raise ValueError(f"finetune_on_pairs: batch_size must be >= 1, got {batch_size}")

    def make(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        pairs = [make_pair(rng) for _ in range(batch_size)]
        batch = _batch(pairs, max(p.packed_len for p in pairs), pad_id, vocab.start_id)
        if mask_labels is not None:
            batch["labels"] = mask_labels(batch["labels"])
        return batch

    return finetune_on_batches(model, make, steps=steps, lr=lr, seed=seed, desc=desc, quiet=quiet)


def finetune_phonebook(model: CausalLM, vocab: ObjectiveVocab, *, steps: int, batch_size: int, lr: float,
                       num_entries: int, max_queries: int, pad_id: int, seed: int = 0, quiet: bool = True,
                       digits: int = 10, name_parts: int = 2) -> list[float]:
    """:func:`finetune_on_pairs` on phone books of ``num_entries`` with a uniform 1..``max_queries`` queries."""

    def make(rng: np.random.Generator) -> Pair:
        return phonebook_pair(vocab, rng, num_entries, int(rng.integers(1, max_queries + 1)), digits,
                              name_parts).pair

    return finetune_on_pairs(model, vocab, make, steps=steps, batch_size=batch_size, lr=lr, pad_id=pad_id,
                             seed=seed, desc="phone-book fine-tune", quiet=quiet)


def phonebook_digit_accuracy(model: CausalLM, vocab: ObjectiveVocab, *, num_entries: int, num_queries: int,
                             num_examples: int, seed: int = 1234, batch_size: int = 8, digits: int = 10,
                             name_parts: int = 2) -> dict[str, float]:
    """Greedy-generate the answers of ``num_examples`` phone books with ``num_queries`` queried numbers.

    Returns ``digit_accuracy`` (target digit positions whose generated character matches), ``number_accuracy``
    (numbers entirely right) and ``exact`` (whole answers right). The prompt (input + [START]) is the prefix.
    """
    model.eval()
    rng = np.random.default_rng([seed, num_entries, num_queries])
    samples = [phonebook_pair(vocab, rng, num_entries, num_queries, digits, name_parts)
               for _ in range(num_examples)]
    prefix = bool(model.backbone.accepts_prefix)
    scored = hits = numbers = numbers_right = exact = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        prompts = [np.concatenate([s.pair.input, [vocab.start_id]]) for s in chunk]
        lengths = torch.tensor([len(p) for p in prompts])
        ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = torch.from_numpy(p)
        kw = {"prefix_mask": torch.arange(ids.shape[1])[None] < lengths[:, None]} if prefix else {}
        new = max(len(s.target) for s in chunk) + 1
        out = generate(model, ids, new, temperature=0, prompt_lengths=lengths, eos_token_id=vocab.done_id, **kw)
        for s, row in zip(chunk, out.tolist(), strict=True):
            text = "".join(chr(t) if t < 256 else "\0" for t in row)
            for a, b in zip(s.target.split(", "), _split_like(text, s.target), strict=True):
                d = [j for j, c in enumerate(a) if c.isdigit()]
                scored += len(d)
                hits += sum(1 for j in d if j < len(b) and b[j] == a[j])
                numbers += 1
                numbers_right += a == b
            exact += text[:len(s.target)] == s.target and (len(row) == len(s.target) or
                                                            row[len(s.target)] == vocab.done_id)
    return {"digit_accuracy": hits / scored, "number_accuracy": numbers_right / numbers,
            "exact": exact / len(samples)}


def _split_like(text: str, target: str) -> list[str]:
    """Cut ``text`` at the target's part boundaries (positions, not separators: a wrong separator costs only
    its own characters)."""
    out, pos = [], 0
    for part in target.split(", "):
        out.append(text[pos:pos + len(part)])
        pos += len(part) + 2
    return out


@torch.no_grad()
def infilling_accuracy(model: CausalLM, vocab: ObjectiveVocab, tokens: np.ndarray, *, seq_len: int, pad_id: int,
                       rows: int, mask_rate: float = 0.15, mean_span: int = 3, text_len: int | None = None,
                       seed: int = 4321, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced infilling on ``rows`` packed rows of span-corrupted held-out ``tokens``.

    One sample per row: ``text_len`` tokens (default: what fits) from a random position, masked with
    :class:`~ssmkit.objectives.Infilling` (``mask_rate``, ``mean_span``). Scored: label positions holding text
    tokens (the spans' contents; placeholders and [DONE] are not scored). Returns ``token_accuracy``,
    ``span_accuracy`` (spans with every token right) and ``loss`` (mean cross entropy on the scored tokens).
    """
    model.eval()
    n = text_len or seq_len // 2
    arm = Infilling(vocab, (n, n), mask_rate=mask_rate, mean_span=mean_span)
    rng = np.random.default_rng(seed)
    built = []
    for _ in range(rows):
        start = int(rng.integers(0, max(1, len(tokens) - n)))
        pair = arm(tokens[start:start + n], rng, seq_len)
        if pair is None:
            raise ValueError(f"infilling_accuracy: seq_len={seq_len} cannot hold an infilling sample")
        row = RowBuilder(seq_len, pad_id, vocab.start_id)
        row.add(pair)
        built.append(row.finish())
    tok = right = spans = spans_right = 0
    nll = 0.0
    for i in range(0, rows, batch_size):
        b = rows_to_batch(built[i:i + batch_size])
        logits = _run(model, b).logits.float()
        labels = b["labels"]
        scored = (labels != IGNORE_INDEX) & (labels < vocab.base_vocab_size)
        pred = logits.argmax(-1)
        ok = (pred == labels) & scored
        tok += int(scored.sum())
        right += int(ok.sum())
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        nll -= float(logp[scored].sum())
        # spans: maximal runs of scored positions between placeholders
        for r in range(labels.shape[0]):
            run_ok, in_span = True, False
            for s_, o_ in zip(scored[r].tolist(), ok[r].tolist(), strict=True):
                if s_:
                    run_ok, in_span = (run_ok and o_) if in_span else o_, True
                elif in_span:
                    spans, spans_right, in_span = spans + 1, spans_right + run_ok, False
            if in_span:
                spans, spans_right = spans + 1, spans_right + run_ok
    return {"token_accuracy": right / max(tok, 1), "span_accuracy": spans_right / max(spans, 1),
            "loss": nll / max(tok, 1), "scored_tokens": float(tok)}


# ------------------------------------------------------------------------------------------------- MQAR
def mqar_pair(vocab: ObjectiveVocab, rng: np.random.Generator, num_pairs: int, num_queries: int | None = None,
              *, num_keys: int | None = None, interleaved: bool = False) -> Pair:
    """Multi-query associative recall as a prefix pair.

    Default: input = <|PREFIX_LM|> k1 v1 ... kN vN [SEP] q1 ... qM, label = the values of q1 ... qM, then [DONE].
    ``interleaved``: input = <|PREFIX_LM|> k1 v1 ... kN vN [SEP], label = q1 v(q1) ... qM v(qM) [DONE] (each value
    right after its key, as in Zoology's MQAR; :func:`mqar_loss_mask` leaves the keys unscored). Keys are distinct
    ids from [0, K), values from [half, half + K) with half = base/2 and K = ``num_keys`` (default: half); the
    M <= N queried keys are distinct, in random order."""
    half = vocab.base_vocab_size // 2
    k = half if num_keys is None else num_keys
    m = num_pairs if num_queries is None else num_queries
    if not 1 <= k <= half:
        raise ValueError(f"mqar_pair: need 1 <= num_keys ({k}) <= {half}")
    if not 1 <= m <= num_pairs <= k:
        raise ValueError(f"mqar_pair: need 1 <= num_queries ({m}) <= num_pairs ({num_pairs}) <= {k}")
    keys = rng.choice(k, size=num_pairs, replace=False)
    values = half + rng.integers(0, k, size=num_pairs)
    asked = rng.choice(num_pairs, size=m, replace=False)
    context = np.stack([keys, values], axis=1).reshape(-1)
    if interleaved:
        inp = np.concatenate([[vocab.paradigm_id("prefix_lm")], context, [vocab.sep_id]])
        label = np.concatenate([np.stack([keys[asked], values[asked]], axis=1).reshape(-1), [vocab.done_id]])
    else:
        inp = np.concatenate([[vocab.paradigm_id("prefix_lm")], context, [vocab.sep_id], keys[asked]])
        label = np.concatenate([values[asked], [vocab.done_id]])
    return Pair(inp.astype(np.int64), label.astype(np.int64), 0)


def mqar_queries(num_pairs: int, query_fraction: float) -> int:
    """How many of ``num_pairs`` keys are queried: ``round(num_pairs * query_fraction)``, at least 1. Querying
    every key with the values fed back (``interleaved``) lets a model answer the last queries by elimination
    (the last value is the one not yet given), a shortcut that a fraction of 1/2 removes."""
    if not 0 < query_fraction <= 1:
        raise ValueError(f"query_fraction: expected a number in (0, 1], got {query_fraction!r}")
    return max(1, round(num_pairs * query_fraction))


def mqar_loss_mask(vocab: ObjectiveVocab, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` (batch, length) with the MQAR keys (ids below base/2) set to -100: only values and [DONE]
    are trained and scored (the queried keys are random, so predicting them is noise)."""
    return labels.masked_fill((labels >= 0) & (labels < vocab.base_vocab_size // 2), IGNORE_INDEX)


def finetune_mqar(model: CausalLM, vocab: ObjectiveVocab, *, steps: int, batch_size: int, lr: float,
                  max_pairs: int, pad_id: int, seed: int = 0, quiet: bool = True, min_pairs: int = 2,
                  num_keys: int | None = None, interleaved: bool = False, query_fraction: float = 1.0
                  ) -> list[float]:
    """:func:`finetune_on_pairs` on MQAR with a uniform ``min_pairs``..``max_pairs`` pairs, of which
    :func:`mqar_queries` are queried (keys unscored, see :func:`mqar_loss_mask`)."""

    def make(rng: np.random.Generator) -> Pair:
        n = int(rng.integers(min_pairs, max_pairs + 1))
        return mqar_pair(vocab, rng, n, mqar_queries(n, query_fraction), num_keys=num_keys, interleaved=interleaved)

    return finetune_on_pairs(model, vocab, make, steps=steps, batch_size=batch_size, lr=lr, pad_id=pad_id,
                             seed=seed, desc="MQAR fine-tune", quiet=quiet,
                             mask_labels=functools.partial(mqar_loss_mask, vocab))


@torch.no_grad()
def mqar_accuracy(model: CausalLM, vocab: ObjectiveVocab, *, num_pairs: int, num_examples: int, pad_id: int,
                  seed: int = 2024, batch_size: int = 32, num_keys: int | None = None,
                  interleaved: bool = False, query_fraction: float = 1.0) -> float:
    """Teacher-forced accuracy on the queried values (not the keys or [DONE]) of ``num_examples`` MQAR pairs."""
    model.eval()
    rng = np.random.default_rng([seed, num_pairs])
    m = mqar_queries(num_pairs, query_fraction)
    pairs = [mqar_pair(vocab, rng, num_pairs, m, num_keys=num_keys, interleaved=interleaved)
             for _ in range(num_examples)]
    right = total = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        b = _batch(chunk, max(p.packed_len for p in chunk), pad_id, vocab.start_id)
        pred = _run(model, b).logits.argmax(-1)
        scored = (b["labels"] >= vocab.base_vocab_size // 2) & (b["labels"] != vocab.done_id)
        right += int(((pred == b["labels"]) & scored).sum())
        total += int(scored.sum())
    return right / total
