"""Training objectives (Birdie, Blouir et al. 2024), packing, mixtures and the reward-driven controller.

Quick start::

    from ssmkit.data import ByteTokenizer
    from ssmkit.objectives import (ControllerConfig, MixtureBatchSource, ObjectiveVocab, birdie_arms,
                                   make_mixture, per_row_lm_loss)

    tok = ByteTokenizer()
    vocab = ObjectiveVocab(tok.vocab_size)                 # special ids above the byte vocabulary
    arms = birdie_arms(vocab, length_scale=1 / 8)          # the paper's 45 arms, lengths scaled for CPU
    mixture = make_mixture("birdie", arms, config=ControllerConfig().scaled(0.1))
    source = MixtureBatchSource(tokens, mixture, batch_size=8, seq_len=256, pad_id=tok.pad_id)
    model = ...(vocab_size=vocab.vocab_size)
    source.loss_fn = lambda b: per_row_lm_loss(model(b["input_ids"], reset=b["reset"],
                                                     prefix_mask=b["prefix_mask"]).logits, b["labels"])
    batch = source.next_batch()      # also runs birdie's scheduled per-arm validation through loss_fn

A causal model (``ntp``, ``birdie-causal``: ``mixture.prefix_bidirectional`` is False) takes no prefix_mask: drop
it from the batch. The model's embedding needs ``vocab.vocab_size`` rows (the byte vocabulary plus the specials).

Modules
    vocab       :class:`ObjectiveVocab`: the special-token layout ([START], [DONE], context/query markers,
                paradigm tokens, numbered placeholders) and ``vocab_size``.
    objectives  the :class:`Objective` interface and next-token, prefix-LM, copying, deshuffling.
    spans       span sampling; infilling, autoencoding, autoencoding + deshuffling.
    selective   selective copying.
    arms        the registry (:func:`make_objective`), the paper grid (:func:`birdie_arms`), class weights.
    packing     pairs -> rows: tokens, labels, reset codes (1 sample start, 0 prefix, 2 suffix) and the bool
                ``reset`` / ``prefix_mask`` the layers take.
    reward      :func:`birdie_reward` and the :class:`RewardModel` (GatedSSM or Attention stack).
    controller  :class:`BirdieController` and its :class:`ControllerConfig` schedule.
    mixtures    ``ntp``, ``ul2``, ``fixed``, ``birdie``, ``birdie-causal`` (:func:`make_mixture`).
    source      :class:`MixtureBatchSource` (next_batch / state_dict / load_state_dict / on_eval) and the
                validation helpers :func:`per_objective_losses`, :func:`per_row_lm_loss`.
    text_task   :class:`ObjectiveText`: held-out text in the next-token pair format (perplexity of objective-
                trained models; the trainer's evaluation task in ``ssmkit.experiments.birdie``).
"""

from __future__ import annotations

from .arms import OBJECTIVES, arm_classes, birdie_arms, check_unique_arms, class_weights, make_objective
from .controller import BirdieController, ControllerConfig
from .mixtures import MIXTURES, BirdieMixture, FixedMixture, Mixture, make_mixture
from .objectives import Copying, Deshuffling, NextToken, Objective, Pair, PrefixLM
from .packing import CODE_PREFIX, CODE_START, CODE_SUFFIX, RowBuilder, masks_from_codes, pack_pair, pack_rows
from .reward import RewardModel, birdie_reward
from .selective import SelectiveCopying
from .source import MixtureBatchSource, TokenStream, per_objective_losses, per_row_lm_loss
from .spans import Autoencoding, AutoencodingDeshuffle, Infilling, sample_spans
from .vocab import PARADIGMS, ObjectiveVocab

__all__ = [
    "CODE_PREFIX", "CODE_START", "CODE_SUFFIX", "MIXTURES", "OBJECTIVES", "PARADIGMS", "Autoencoding",
    "AutoencodingDeshuffle", "BirdieController", "BirdieMixture", "ControllerConfig", "Copying", "Deshuffling",
    "FixedMixture", "Infilling", "Mixture", "MixtureBatchSource", "NextToken", "Objective", "ObjectiveVocab",
    "Pair", "PrefixLM", "RewardModel", "RowBuilder", "SelectiveCopying", "TokenStream", "arm_classes",
    "birdie_arms", "birdie_reward", "check_unique_arms", "class_weights", "make_mixture", "make_objective",
    "masks_from_codes", "pack_pair", "pack_rows", "per_objective_losses", "per_row_lm_loss", "sample_spans",
]
