"""Self-pretraining ("Never Train from Scratch", Amos et al. 2023): train on the task's own training inputs with
an LM-style head, then fine-tune the same backbone on the task with the task's head.

``train.pretrain`` picks the objective (``train.pretrain_steps`` steps, before the ``train.steps`` task steps):

* ``"ar"``: predict input position t + 1 from positions <= t. Needs a causal backbone (a bidirectional layer
  would see the target); not across a ``reset`` boundary or into padding.
* ``"denoise"``: corrupt ``train.pretrain_mask_rate`` of the real positions and reconstruct them there.
  Token inputs are replaced by uniform random tokens, real-valued inputs by 0 (the normalised mean). Works for
  any backbone: use it for bidirectional / classification models.

The head is ``Linear(d_model, vocab_size)`` (cross entropy) for token inputs and ``Linear(d_model, d_input)``
(mean squared error per position) for real-valued inputs. The corruption of step ``s`` is drawn from a generator
seeded by ``(train.seed, s)``, so a resumed run draws the same corruption. Padded batches (``mask``) are run
with a segment start at every padding boundary, so real positions never see padding (not needed, and skipped
because it costs SSMs their convolution path, for a causal backbone on right-padded batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Batch
from ..models import SequenceModel

#: keys :meth:`SelfPretrainer.prepare` adds to a batch
KEYS = ("pt_inputs", "pt_targets", "pt_scored", "pt_reset")
_SEED_STRIDE = 1_000_003


class PretrainNet(nn.Module):
    """The task model's backbone (shared, not copied) and the self-pretraining head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, inputs: Tensor, reset: Tensor | None) -> Tensor:
        """inputs (batch, length) ids or (batch, length, d_input) -> (batch, length, head outputs)."""
        hidden, _ = self.backbone(inputs, reset=reset)
        return self.head(hidden)


class SelfPretrainer:
    """Prepares batches and computes the self-pretraining loss of ``model``'s backbone.

    Args:
        model: the task's model; its ``backbone`` is trained in place.
        objective: "ar" or "denoise".
        mask_rate: share of real positions corrupted by "denoise".
        seed: seeds the per-step corruption.
    The head is initialised from the global torch RNG (the trainer runs it inside the run's RNG stream).
    """

    def __init__(self, model: SequenceModel, objective: str, mask_rate: float, seed: int) -> None:
        if objective not in ("ar", "denoise"):
            raise ValueError(f"train.pretrain: got {objective!r}; expected 'ar' or 'denoise'")
        backbone = model.backbone
        if objective == "ar" and not backbone.causal:
            bi = [b.mixer_name for b in backbone.blocks if not b.causal]
            raise ValueError(f"train.pretrain='ar' needs a causal model, but it has bidirectional layers "
                             f"({', '.join(bi)}); use train.pretrain=denoise")
        cfg = model.config
        self.tokens = backbone.embedding is not None
        head = nn.Linear(cfg.d_model, cfg.vocab_size if self.tokens else cfg.d_input, bias=not self.tokens)
        nn.init.normal_(head.weight, std=cfg.embedding_std)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        self.net = PretrainNet(backbone, head.to(backbone.param_dtype))
        self.objective, self.mask_rate, self.seed = objective, mask_rate, seed
        self.causal = bool(backbone.causal)
        self.vocab_size = cfg.vocab_size

    # ------------------------------------------------------------------------------------------ batches
    def prepare(self, batch: Batch, step: int) -> Batch:
        """``batch`` plus the :data:`KEYS`: model inputs, targets, scored positions (batch, length) bool and
        segment starts (batch, length) bool, for optimizer step ``step`` (0-based)."""
        if "input_ids" in batch:
            x = batch["input_ids"]
        elif "inputs" in batch:
            x = batch["inputs"].to(self.net.backbone.param_dtype)
        else:
            raise ValueError(f"train.pretrain needs batches with 'input_ids' or 'inputs', got keys {sorted(batch)}")
        b, n = x.shape[:2]
        valid = batch["mask"] if "mask" in batch else torch.ones(b, n, dtype=torch.bool)
        reset = torch.zeros(b, n, dtype=torch.bool) if "reset" not in batch else batch["reset"].clone()
        right_padded = bool((valid[:, 1:] <= valid[:, :-1]).all())
        if not (self.causal and right_padded):  # else no real position can see the padding after it
            reset[:, 1:] |= valid[:, 1:] != valid[:, :-1]  # padding starts its own segment
        if self.objective == "ar":
            inputs, targets = x, torch.roll(x, -1, dims=1)
            scored = torch.zeros(b, n, dtype=torch.bool)
            scored[:, :-1] = valid[:, 1:] & valid[:, :-1] & ~reset[:, 1:]
        else:
            gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + step)
            scored = (torch.rand(b, n, generator=gen) < self.mask_rate) & valid
            if self.tokens:
                noise = torch.randint(0, self.vocab_size, (b, n), generator=gen, dtype=x.dtype)
                inputs = torch.where(scored, noise, x)
            else:
                inputs = torch.where(scored.unsqueeze(-1), torch.zeros((), dtype=x.dtype), x)
            targets = x
        return {**batch, "pt_inputs": inputs, "pt_targets": targets, "pt_scored": scored, "pt_reset": reset}

    @staticmethod
    def weight(batch: Batch) -> int:
        """Scored positions in a prepared batch (the denominator of its mean loss)."""
        return int(batch["pt_scored"].sum())

    def loss(self, batch: Batch, forward: nn.Module | None = None) -> Tensor:
        """Mean loss over the scored positions of a prepared batch: cross entropy (tokens) or squared error
        averaged over d_input (real inputs); 0 (with a graph) when nothing is scored."""
        reset = batch["pt_reset"]
        out = (forward or self.net)(batch["pt_inputs"], reset if bool(reset.any()) else None)
        scored = batch["pt_scored"]
        if not bool(scored.any()):
            return out.sum() * 0.0
        if self.tokens:
            return F.cross_entropy(out[scored], batch["pt_targets"][scored])
        return (out[scored] - batch["pt_targets"][scored]).pow(2).mean()

    # ------------------------------------------------------------------------------------------ checkpoints
    def head_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.net.head.state_dict().items()}

    def load_head_state(self, state: dict[str, Tensor]) -> None:
        self.net.head.load_state_dict(state)
