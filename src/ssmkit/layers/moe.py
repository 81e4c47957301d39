"""A mixture-of-experts MLP with top-k routing, as a (stateless) sequence layer.

Each token is routed to ``top_k`` of ``n_experts`` MLPs (gated: act(gate) * up, or plain: act(up)), whose
outputs are summed with the routing weights; an optional always-on shared expert is added. Routers:

    "softmax"        p = softmax(logits); the top-k of p (Jamba, Mixtral)
    "topk_softmax"   the top-k logits, then a softmax over those k (GraniteMoe)
    "sigmoid"        s = sigmoid(logits); experts chosen by the top-k of s + router_bias within the best
                     ``topk_group`` of ``n_group`` groups (a group scores the sum of its 2 best); weights s
                     (DeepSeek-V3, NemotronH)

then optionally renormalised to sum to one (``norm_topk``) and multiplied by ``scaling``. Routing computes in
(at least) float32. :meth:`MoE.forward` gathers each expert's tokens; :func:`moe_reference` is the plain oracle
(every expert on every token, a loop over the experts). Under ``torch.autocast`` the router stays in float32.

Weights (experts stacked, transformers' 3-D layout): ``router.weight`` (n_experts, d_model), ``router_bias``
(n_experts,) buffer for "sigmoid", ``w_in`` (n_experts, d_in, d_model) with d_in = 2 d_hidden when gated (gate
rows first), ``w_out`` (n_experts, d_model, d_hidden), and ``shared`` (an MLP of ``d_shared`` hidden units).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_choice, check_d_model, no_autocast
from .ffn import ACTIVATIONS, MLPWeights, PositionwiseLayer, check_bool, check_positive_int

ROUTERS = ("softmax", "topk_softmax", "sigmoid")


class MoE(PositionwiseLayer):
    """Top-k routed mixture of MLP experts (empty state).

    Args:
        d_model: model width.
        d_hidden: each expert's hidden width.
        n_experts: number of routed experts; top_k: experts per token.
        router: "softmax", "topk_softmax" or "sigmoid" (see the module docstring).
        norm_topk: renormalise the k weights to sum to one; scaling: multiply them by this.
        n_group, topk_group: group-limited choice ("sigmoid" only; 1, 1 = no groups).
        act, gated: the experts' activation (:data:`ssmkit.layers.ffn.ACTIVATIONS`) and gating.
        d_shared: hidden width of a shared expert added to every token (0 = none; same act and gating).
        shared_bias: biases in the shared expert.

    Shapes: x (batch, length, d_model) -> y (batch, length, d_model).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int | None = None,
        n_experts: int = 8,
        top_k: int = 2,
        router: str = "softmax",
        norm_topk: bool = False,
        scaling: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        act: str = "silu",
        gated: bool = True,
        d_shared: int = 0,
        *,
        shared_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.d_model = check_d_model(name, d_model)
        self.d_hidden = check_positive_int(name, "d_hidden", 4 * d_model if d_hidden is None else d_hidden)
        self.n_experts = check_positive_int(name, "n_experts", n_experts)
        self.top_k = check_positive_int(name, "top_k", top_k)
        if top_k > n_experts:
            raise ValueError(f"{name}: top_k={top_k} exceeds n_experts={n_experts}")
        self.router_kind = check_choice(name, "router", router, ROUTERS)
        self.norm_topk = check_bool(name, "norm_topk", norm_topk)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) \
                or scaling <= 0:
            raise ValueError(f"{name}: scaling must be a positive number, got {scaling!r}")
        self.scaling = float(scaling)
        self.n_group = check_positive_int(name, "n_group", n_group)
        self.topk_group = check_positive_int(name, "topk_group", topk_group)
        if (n_group, topk_group) != (1, 1):
            if router != "sigmoid":
                raise ValueError(f"{name}: n_group/topk_group apply to router='sigmoid' only, got router={router!r}")
            if n_experts % n_group or topk_group > n_group or n_experts // n_group < 2:
                raise ValueError(f"{name}: need n_group | n_experts, topk_group <= n_group and >= 2 experts per "
                                 f"group, got n_experts={n_experts}, n_group={n_group}, topk_group={topk_group}")
            if top_k > topk_group * (n_experts // n_group):
                raise ValueError(f"{name}: top_k={top_k} exceeds the experts of topk_group={topk_group} groups")
        self.act = check_choice(name, "act", act, tuple(ACTIVATIONS))
        self.gated = check_bool(name, "gated", gated)
        if isinstance(d_shared, bool) or not isinstance(d_shared, int) or d_shared < 0:
            raise ValueError(f"{name}: d_shared must be an int >= 0, got {d_shared!r}")
        self.d_shared = d_shared
        check_bool(name, "shared_bias", shared_bias)
        kw = {"device": device, "dtype": dtype}
        self.router = nn.Linear(d_model, n_experts, bias=False, **kw)
        if router == "sigmoid":
            self.register_buffer("router_bias", torch.zeros(n_experts, **kw))
        else:
            self.router_bias = None
        d_in = (2 if gated else 1) * self.d_hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, d_in, d_model, **kw))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model, self.d_hidden, **kw))
        if self.w_in.device.type != "meta":
            for w in (self.w_in, self.w_out):
                nn.init.normal_(w, std=w.shape[-1] ** -0.5)
        self.shared = MLPWeights(d_model, d_shared, act, gated, shared_bias, **kw) if d_shared else None

    # ------------------------------------------------------------------------------------------ routing
    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (tokens, d_model) -> (weights (tokens, top_k) in x's dtype, expert ids (tokens, top_k))."""
        cdt = torch.promote_types(x.dtype, torch.float32)
        with no_autocast(x):  # routing decisions in float32 even under autocast
            logits = F.linear(x.to(cdt), self.router.weight.to(cdt))
        if self.router_kind == "softmax":
            w, idx = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        elif self.router_kind == "topk_softmax":
            top, idx = torch.topk(logits, self.top_k, dim=-1)
            w = torch.softmax(top, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            choice = scores + self.router_bias.to(cdt)
            if self.n_group > 1:
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
                best = torch.topk(grouped.topk(2, dim=-1).values.sum(-1), self.topk_group, dim=-1).indices
                keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
                choice = choice.masked_fill(~keep.repeat_interleave(self.n_experts // self.n_group, 1), -math.inf)
            idx = torch.topk(choice, self.top_k, dim=-1).indices
            w = scores.gather(1, idx)
        if self.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if self.router_kind == "sigmoid" else 0.0))
        return (w * self.scaling).to(x.dtype), idx

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on x (n, d_model) -> (n, d_model)."""
        h = F.linear(x, self.w_in[e])
        act = ACTIVATIONS[self.act]
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = act(gate) * up
        else:
            h = act(h)
        return F.linear(h, self.w_out[e])

    def mix(self, x: Tensor) -> Tensor:
        """x (..., d_model) -> (..., d_model): each expert runs on its own tokens only."""
        flat = x.reshape(-1, self.d_model)
        w, idx = self.route(flat)
        out = torch.zeros_like(flat)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, self.expert(e, flat[tok]) * w[tok, slot, None])
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, n_experts={self.n_experts}, "
                f"top_k={self.top_k}, router={self.router_kind!r}, d_shared={self.d_shared}")


def moe_reference(layer: MoE, x: Tensor) -> Tensor:
    """The oracle: every expert on every token, weighted by a dense (tokens, n_experts) routing matrix that is
    zero off the chosen experts; a plain loop over the experts. x (..., d_model) -> (..., d_model)."""
    flat = x.reshape(-1, layer.d_model)
    w, idx = layer.route(flat)
    dense = torch.zeros(flat.shape[0], layer.n_experts, dtype=flat.dtype, device=flat.device)
    dense.scatter_add_(1, idx, w)
    out = torch.zeros_like(flat)
    for e in range(layer.n_experts):
        out = out + dense[:, e, None] * layer.expert(e, flat)
    if layer.shared is not None:
        out = out + layer.shared(flat)
    return out.view(x.shape)
