"""Hybrid-model speed: ssmkit vs transformers on a NemotronH-shaped model (Mamba-2, GQA attention and MLP blocks)
with random weights, converted with ssmkit.interop so both sides hold identical weights, in one process (ratios).

    python benchmarks/bench_hybrid.py [--quick] [--threads N] [--decode-only] [--family nemotron_h|bamba]

Model: NemotronHForCausalLM, d_model 512, 8 layers "M-M-*-M-" (Mamba-2: 16 heads x 64, d_state 64, 2 groups;
attention: 8 query / 2 kv heads of 64; MLP: relu2, 1536 wide), vocab 32000. Cases:
- prefill of a 2048-token prompt, batch 1: time to the last position's logits and the cache/state (ssmkit:
  forward with return_final_state; transformers: forward with use_cache=True, logits_to_keep=1);
- decode after a 2048-token prompt, batch 1 and 8: the time of 32 one-token steps from the prefilled cache (ssmkit:
  the step ``generate`` takes, ``infer.fused_hybrid.decode_step``: the whole stack and the LM head in one kernel
  launch; ``model_step_s``: CausalLM.step, which steps each run of consecutive Mamba-2 blocks in one stack launch
  (``models.fused_decode.run_plans``) and the other blocks one by one; transformers: its forward on one token with
  the cache),
  with the logits of both compared; the three run interleaved, best of ``repeat``, in wall clock (``speedup``) and
  CPU time (``cpu_speedup``, steadier on a shared machine);
- generate as a user sees it (2048-token prompt, 32 greedy tokens, batch 1): both generate functions, and whether
  they produced the same tokens.
``--quick``: 4 layers "M*M-", 256-token prompts, 8 steps; ``--decode-only``: the decode rows alone.
Writes benchmarks/results/bench_hybrid.json.

Each prefill/decode row also has ``bound_s``, a floor for the same float32 arithmetic on this machine under its
current load, timed in this process right after the case by replaying the model's projections alone (F.linear on
random rows over every projection weight, best of the same repeats): prefill = that time scaled by all GEMM FLOPs
(projections, SSD's chunk GEMMs, causal attention) over the projections' FLOPs; decode = ``steps`` reads (a sum) of
every projection weight and the LM head, plus the KV caches and SSM states at the bandwidth those reads reached.
``hf_over_bound`` = transformers_s / bound_s is the largest speedup over transformers any implementation could
show here. The prefill row also has ``floor_s``: ssmkit's own prefill timed with SSD, the short convolutions and
every norm made free (they return their input, or a zero state), so what remains is the projections, attention,
activations, residual adds and embedding; ``hf_over_floor`` = transformers_s / floor_s is the most that speeding
up those three parts could give.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, current_rss_bytes, print_table, write_json  # noqa: E402

FULL = {"pattern": "M-M-*-M-", "context": 2048, "steps": 32, "batches": [1, 8], "repeat": 3}
QUICK = {"pattern": "M*M-", "context": 256, "steps": 8, "batches": [1, 8], "repeat": 2}
TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


def build(pattern: str, family: str = "nemotron_h"):
    """(transformers model, ssmkit model) with the same random weights. family "bamba": BambaForCausalLM with the
    same widths, a layer per mixer letter of ``pattern`` (each followed by its SwiGLU MLP; "-" letters dropped)."""
    import transformers

    from ssmkit.interop import from_transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if family == "bamba":
        mixers = pattern.replace("-", "")
        cfg = transformers.BambaConfig(
            vocab_size=32000, hidden_size=512, num_hidden_layers=len(mixers),
            attn_layer_indices=[i for i, c in enumerate(mixers) if c == "*"], num_attention_heads=8,
            num_key_value_heads=2, intermediate_size=1536, mamba_n_heads=16, mamba_d_head=64, mamba_d_state=64,
            mamba_n_groups=2, mamba_chunk_size=128, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        hf = transformers.BambaForCausalLM(cfg).eval()
        return hf, from_transformers(hf)
    if family != "nemotron_h":
        raise ValueError(f"family must be 'nemotron_h' or 'bamba', got {family!r}")
    cfg = transformers.NemotronHConfig(
        vocab_size=32000, hidden_size=512, layers_block_type=[TYPES[c] for c in pattern], num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, intermediate_size=1536, ssm_state_size=64, mamba_num_heads=16,
        mamba_head_dim=64, n_groups=2, chunk_size=128, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    hf = transformers.NemotronHForCausalLM(cfg).eval()
    return hf, from_transformers(hf)


def linears(ours) -> list[torch.Tensor]:
    """The weights of the backbone's nn.Linear layers (every projection)."""
    return [m.weight.detach() for m in ours.backbone.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def replay_s(weights: list[torch.Tensor], rows: int, times: int, repeat: int) -> float:
    """Best-of-``repeat`` wall time of ``times`` passes over every weight, timed over a span like the case's (the
    machine's load varies): rows > 0: F.linear on that many random rows (the model's projections alone, back to
    back); rows = 0: a sum of each weight (reading it once, the memory floor of a decode step)."""
    xs = {w.shape[1]: torch.randn(max(rows, 1), w.shape[1]) for w in weights}

    def run():
        for _ in range(times):
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w) if rows else w.sum()
    return best_time(run, repeat=repeat, warmup=1)


def mixers(ours):
    return [b.mixer for b in ours.backbone.blocks]


def linear_flops(ours, rows: int) -> float:
    """2 * rows * in * out over the backbone's projections."""
    return float(sum(2 * rows * w.shape[0] * w.shape[1] for w in linears(ours)))


def prefill_flops(ours, length: int) -> float:
    """Projections + SSD's chunk GEMMs (C B^T, the masked score-times-x, chunk states, state outputs) + causal
    attention (QK^T and PV over the lower triangle) + the LM head on the last position."""
    total = linear_flops(ours, length) + 2 * ours.lm_head.in_features * ours.lm_head.out_features
    for m in mixers(ours):
        if hasattr(m, "chunk_size"):
            Q, G, N, H, P = min(m.chunk_size, length), m.ngroups, m.d_state, m.nheads, m.headdim
            c = -(-length // Q)
            total += 2 * c * (G * Q * Q * N + H * Q * Q * P + 2 * Q * N * H * P)
        elif hasattr(m, "n_kv_heads"):
            total += 2 * 2 * m.n_heads * m.head_dim * length * (length + 1) / 2
    return total


def prefill_bound(ours, length: int, repeat: int) -> tuple[float, float]:
    """(bound_s, GEMM FLOP/s): the replayed projections' time scaled up by prefill_flops / their FLOPs."""
    t = replay_s(linears(ours), length, 1, repeat)
    rate = linear_flops(ours, length) / t
    return prefill_flops(ours, length) / rate, rate


def decode_bound(ours, batch: int, context: int, steps: int, repeat: int) -> tuple[float, float]:
    """(bound_s, bytes/s): ``steps`` reads of every projection weight and the LM head, plus the KV caches and SSM
    states read each step at the bandwidth those reads reached."""
    weights = linears(ours) + [ours.lm_head.weight.detach()]
    t = replay_s(weights, 0, steps, repeat)
    wbytes = sum(w.numel() * w.element_size() for w in weights)
    extra = 0
    for m in mixers(ours):
        if hasattr(m, "chunk_size"):
            extra += 4 * batch * (m.nheads * m.headdim * m.d_state + m.conv_dim * (m.d_conv - 1))
        elif hasattr(m, "n_kv_heads"):
            extra += 4 * 2 * batch * m.n_kv_heads * m.head_dim * (context + steps // 2)
    bw = steps * wbytes / t
    return t + steps * extra / bw, bw


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextmanager
def free_ssd_convs_norms(ours):
    """SSD, the short convolutions and every norm at zero cost, for ssmkit's model (restored on exit)."""
    import ssmkit.layers.mamba2 as mamba2_mod
    from ssmkit.layers.mamba2 import GatedRMSNorm
    from ssmkit.layers.short_conv import ShortConv
    from ssmkit.models.blocks import Norm

    states: dict = {}

    def ssd(x, dt, A, B, C, **kw):
        key = ("ssd", x.shape, B.shape)
        if key not in states:
            states[key] = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3])
        return x, states[key]

    def conv(mod):
        def forward(x, initial_state=None, *, reset=None, reverse=False):
            key = ("conv", mod.channels, x.shape[0])
            if key not in states:
                states[key] = x.new_zeros(x.shape[0], mod.channels, mod.width - 1)
            return x, states[key]
        return forward

    patched = []
    for m in ours.modules():
        if isinstance(m, (Norm, GatedRMSNorm)):
            patched.append(m)
            m.forward = lambda x, *a, **k: x
        elif isinstance(m, ShortConv):
            patched.append(m)
            m.forward = conv(m)
    saved, mamba2_mod.ssd = mamba2_mod.ssd, ssd
    try:
        yield
    finally:
        mamba2_mod.ssd = saved
        for m in patched:
            del m.forward


def prefill_case(hf, ours, length: int, repeat: int) -> dict:
    x = ids(1, length, seed=7)
    res: dict = {}

    @torch.no_grad()
    def run_ours():
        hidden, _ = ours.backbone(x, return_final_state=True, input_name="input_ids")
        res["ours"] = ours.lm_head(hidden[:, -1])

    @torch.no_grad()
    def run_hf():
        res["hf"] = hf(x, use_cache=True, logits_to_keep=1).logits[:, -1]

    t_ours = best_time(run_ours, repeat=repeat, warmup=1)
    t_hf = best_time(run_hf, repeat=repeat, warmup=1)
    err = float((res["ours"] - res["hf"]).abs().max() / res["hf"].abs().max())
    with free_ssd_convs_norms(ours):
        floor = best_time(run_ours, repeat=repeat, warmup=1)
    bound, rate = prefill_bound(ours, length, repeat)
    return {"case": f"prefill {length} b1", "ssmkit_s": t_ours, "transformers_s": t_hf, "speedup": t_hf / t_ours,
            "floor_s": floor, "hf_over_floor": t_hf / floor,
            "bound_s": bound, "hf_over_bound": t_hf / bound, "gemm_gflops": rate / 1e9,
            "ssmkit_tok_per_s": length / t_ours, "transformers_tok_per_s": length / t_hf, "logits_rel_err": err}


@torch.no_grad()
def decode_case(hf, ours, batch: int, context: int, steps: int, repeat: int) -> dict:
    x = ids(batch, context + steps, seed=batch)
    prompt, nxt = x[:, :context], x[:, context:]

    from ssmkit.infer.fused_hybrid import decode_step

    def ours_run(step=decode_step) -> tuple[float, float, torch.Tensor]:
        state = ours(prompt, return_final_state=True).state
        t0, c0 = time.perf_counter(), time.process_time()
        for t in range(steps):
            lg, state = step(ours, nxt[:, t], state)
        return time.perf_counter() - t0, time.process_time() - c0, lg

    def runs_step(model, tok, state):  # CausalLM.step: run_plans' launches
        return model.step(tok, state)

    def hf_run() -> tuple[float, float, torch.Tensor]:
        cache = hf(prompt, use_cache=True, logits_to_keep=1).cache
        t0, c0 = time.perf_counter(), time.process_time()
        for t in range(steps):
            out = hf(nxt[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
        return time.perf_counter() - t0, time.process_time() - c0, out.logits[:, -1]

    ours_run(), ours_run(runs_step), hf_run()  # warm-up
    runs = [(ours_run(), ours_run(runs_step), hf_run()) for _ in range(repeat)]  # interleaved: the load drifts
    (t_ours, c_ours, lg_ours), (t_runs, c_runs, _), (t_hf, c_hf, lg_hf) = (
        (min(r[k][0] for r in runs), min(r[k][1] for r in runs), runs[-1][k][2]) for k in range(3))
    err = float((lg_ours - lg_hf).abs().max() / lg_hf.abs().max())
    n = batch * steps
    bound, bw = decode_bound(ours, batch, context, steps, repeat)
    return {"case": f"decode @{context} b{batch}", "ssmkit_s": t_ours, "transformers_s": t_hf,
            "speedup": t_hf / t_ours, "model_step_s": t_runs, "model_step_speedup": t_hf / t_runs,
            "cpu_speedup": c_hf / c_ours, "model_step_cpu_speedup": c_hf / c_runs,
            "bound_s": bound, "hf_over_bound": t_hf / bound,
            "weights_gb_per_s": bw / 1e9, "ssmkit_tok_per_s": n / t_ours, "transformers_tok_per_s": n / t_hf,
            "logits_rel_err": err}


@torch.no_grad()
def generate_case(hf, ours, context: int, new: int, repeat: int) -> dict:
    from ssmkit.infer import generate

    x = ids(1, context, seed=11)
    out: dict = {}

    def run_ours():
        out["ours"] = generate(ours, x, new)

    def run_hf():
        out["hf"] = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False)[:, context:]

    t_ours = best_time(run_ours, repeat=repeat, warmup=1)
    t_hf = best_time(run_hf, repeat=repeat, warmup=1)
    return {"case": f"generate {context}+{new} b1", "ssmkit_s": t_ours, "transformers_s": t_hf,
            "speedup": t_hf / t_ours, "ssmkit_tok_per_s": new / t_ours, "transformers_tok_per_s": new / t_hf,
            "same_tokens": bool(torch.equal(out["ours"], out["hf"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers, 256-token prompts (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides")
    parser.add_argument("--decode-only", action="store_true", help="only the decode rows")
    parser.add_argument("--family", choices=["nemotron_h", "bamba"], default="nemotron_h", help="the model family")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    p = QUICK if args.quick else FULL
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    hf, ours = build(p["pattern"], args.family)
    print(f"model: {ours.summary()}  (threads: {torch.get_num_threads()})")
    rows = [] if args.decode_only else [prefill_case(hf, ours, p["context"], p["repeat"])]
    rows += [decode_case(hf, ours, b, p["context"], p["steps"], p["repeat"]) for b in p["batches"]]
    if not args.decode_only:
        rows.append(generate_case(hf, ours, p["context"], p["steps"], p["repeat"]))
    print_table(rows, ["case", "speedup", "ssmkit_s", "transformers_s", "model_step_speedup", "cpu_speedup",
                       "model_step_cpu_speedup", "floor_s",
                       "hf_over_floor", "bound_s", "hf_over_bound", "gemm_gflops",
                       "weights_gb_per_s", "ssmkit_tok_per_s", "transformers_tok_per_s", "logits_rel_err",
                       "same_tokens"])
    name = "bench_hybrid" + ("_bamba" if args.family == "bamba" else "")
    path = write_json(name + ("_quick" if args.quick else "") + ("_decode" if args.decode_only else ""), {
        "quick": args.quick, "family": args.family, "threads": torch.get_num_threads(), "params": p,
        "model": ours.summary(), "rows": rows,
        "rss_bytes_end": current_rss_bytes(), "wall_s": time.perf_counter() - t0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
