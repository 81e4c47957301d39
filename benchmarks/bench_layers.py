"""Speed of the layers against their nearest peers, in one process (ratios).

    python benchmarks/bench_layers.py [--length 2048] [--quick]

- Mamba (d_model 768, expand 2, N 16), batch 1: forward+backward vs transformers' `MambaMixer` on CPU holding the
  same weights (copied through ssmkit.interop), and one-token `step` latency vs the mixer's cached step.
- Mamba2 (d_model 768, expand 2, head_dim 64 -> 24 heads, N 128): the same against `Mamba2Mixer`.
- S4D (d_model 768, N 64): conv mode vs the S4 reference code's way of building the kernel (materialising the
  (H, N/2, L) Vandermonde tensor, reimplemented here) and vs ssmkit's own scan mode.
- Mamba3 (SISO and MIMO rank 4) vs ssmkit's Mamba2 at equal state size (24 heads x 64 x N 128): forward,
  forward+backward and one-token step.
- mamba3-step: ops.mamba3_step's numba kernel vs its torch path, one token, per state size, batch 1/8, SISO/MIMO-4.
- H3 (d_model 768, 12 heads): no installable peer exists; reported against ssmkit's causal Attention of the same
  width as a reference point.
Writes benchmarks/results/bench_layers.json.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, print_table, write_json  # noqa: E402

D_MODEL = 768


def _fwd_bwd(fn, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    fn(x).sum().backward()


def _zero(module: torch.nn.Module) -> None:
    module.zero_grad(set_to_none=True)


def _step_latency(step_fn, n: int = 50) -> float:
    """Median-free best-of timing of ``n`` consecutive one-token steps, per token."""
    return best_time(lambda: [step_fn() for _ in range(n)], repeat=3) / n


def bench_mamba(length: int, quick: bool) -> list[dict]:
    from transformers import DynamicCache, MambaConfig, MambaModel

    from ssmkit.interop import mixer_from_transformers

    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=D_MODEL, state_size=16, expand=2, num_hidden_layers=1, vocab_size=16)
    hf = MambaModel(cfg)
    mixer = hf.layers[0].mixer
    ours = mixer_from_transformers(mixer)
    x = torch.randn(1, length, D_MODEL)
    rep = 1 if quick else 3
    with torch.no_grad():
        err = (ours(x[:, :256]) - mixer.eval()(x[:, :256])).abs().max().item()
        t_ours_f = best_time(lambda: ours(x), repeat=rep)
        t_hf_f = best_time(lambda: mixer(x), repeat=1, warmup=0)
    t_ours = best_time(lambda: _fwd_bwd(ours, x), repeat=rep)
    # transformers' default CPU path is a Python loop over time whose backward grows much faster than L (a run at
    # L=2048 did not finish in 36 min here), so its fwd+bwd is timed with the mambapy scan it offers instead
    # (use_mambapy=True), and the loop path at a short length for reference.
    mixer.use_mambapy = True
    t_hf = best_time(lambda: _fwd_bwd(mixer, x), repeat=1, warmup=0)
    mixer.use_mambapy = False
    short = x[:, :256]
    t_ours_short = best_time(lambda: _fwd_bwd(ours, short), repeat=rep)
    t_hf_short = best_time(lambda: _fwd_bwd(mixer, short), repeat=1, warmup=0)

    # one-token steps after a 64-token prefill
    xt = torch.randn(1, D_MODEL)
    with torch.no_grad():
        _, state = ours(x[:, :64], return_final_state=True)
        cache = DynamicCache(config=cfg)
        mixer(x[:, :64], cache_params=cache)
        t_step_ours = _step_latency(lambda: ours.step(xt, state))
        t_step_hf = _step_latency(lambda: mixer(xt[:, None], cache_params=cache))
    return [
        {"case": f"Mamba fwd L={length}", "ssmkit_s": t_ours_f, "peer_s": t_hf_f, "peer": "transformers MambaMixer",
         "speedup": t_hf_f / t_ours_f, "max_abs_diff": err},
        {"case": f"Mamba fwd+bwd L={length}", "ssmkit_s": t_ours, "peer_s": t_hf,
         "peer": "transformers MambaMixer (use_mambapy)", "speedup": t_hf / t_ours},
        {"case": "Mamba fwd+bwd L=256", "ssmkit_s": t_ours_short, "peer_s": t_hf_short,
         "peer": "transformers MambaMixer (default loop)", "speedup": t_hf_short / t_ours_short},
        {"case": "Mamba one-token step", "ssmkit_s": t_step_ours, "peer_s": t_step_hf,
         "peer": "transformers MambaMixer + cache", "speedup": t_step_hf / t_step_ours},
    ]


def bench_mamba2(length: int, quick: bool) -> list[dict]:
    from transformers import DynamicCache, Mamba2Config, Mamba2Model

    from ssmkit.interop import mixer_from_transformers

    torch.manual_seed(0)
    cfg = Mamba2Config(hidden_size=D_MODEL, expand=2, num_heads=24, head_dim=64, state_size=128, n_groups=1,
                       chunk_size=256, num_hidden_layers=1, vocab_size=16)
    hf = Mamba2Model(cfg)
    mixer = hf.layers[0].mixer
    ours = mixer_from_transformers(mixer)
    x = torch.randn(1, length, D_MODEL)
    rep = 1 if quick else 3
    with torch.no_grad():
        err = (ours(x[:, :256]) - mixer(x[:, :256])).abs().max().item()
        t_ours_f = best_time(lambda: ours(x), repeat=rep)
        t_hf_f = best_time(lambda: mixer(x), repeat=rep)
    t_ours = best_time(lambda: _fwd_bwd(ours, x), repeat=rep)
    t_hf = best_time(lambda: _fwd_bwd(mixer, x), repeat=rep)
    xt = torch.randn(1, D_MODEL)
    with torch.no_grad():
        _, state = ours(x[:, :64], return_final_state=True)
        cache = DynamicCache(config=cfg)
        mixer(x[:, :64], cache_params=cache)
        t_step_ours = _step_latency(lambda: ours.step(xt, state))
        t_step_hf = _step_latency(lambda: mixer(xt[:, None], cache_params=cache))
    peer = "transformers Mamba2Mixer (torch chunked path)"
    return [
        {"case": f"Mamba2 fwd L={length}", "ssmkit_s": t_ours_f, "peer_s": t_hf_f, "peer": peer,
         "speedup": t_hf_f / t_ours_f, "max_abs_diff": err},
        {"case": f"Mamba2 fwd+bwd L={length}", "ssmkit_s": t_ours, "peer_s": t_hf, "peer": peer,
         "speedup": t_hf / t_ours},
        {"case": "Mamba2 one-token step", "ssmkit_s": t_step_ours, "peer_s": t_step_hf,
         "peer": "transformers Mamba2Mixer + cache", "speedup": t_step_hf / t_step_ours},
    ]


def bench_mamba3(length: int, quick: bool) -> list[dict]:
    """Mamba3 (SISO, and MIMO rank 4) against ssmkit's Mamba2 at equal state size: d_model 768, expand 2,
    head_dim 64 (24 heads), N 128, so both carry (24, 64, 128) per layer. speedup = Mamba2 time / Mamba3 time."""
    from ssmkit.layers import Mamba2, Mamba3

    torch.manual_seed(0)
    m2 = Mamba2(D_MODEL, d_state=128, expand=2, headdim=64, chunk_size=256)
    x = torch.randn(1, length, D_MODEL)
    xt = torch.randn(1, D_MODEL)
    rep = 1 if quick else 3
    with torch.no_grad():
        t2_f = best_time(lambda: m2(x), repeat=rep)
        _, s2 = m2(x[:, :64], return_final_state=True)
        t2_step = _step_latency(lambda: m2.step(xt, s2))
    t2 = best_time(lambda: _fwd_bwd(m2, x), repeat=rep)
    rows = []
    for name, kw in (("Mamba3", {}), ("Mamba3 MIMO-4", {"mimo_rank": 4})):
        m3 = Mamba3(D_MODEL, d_state=128, expand=2, headdim=64, **kw)
        with torch.no_grad():
            t3_f = best_time(lambda m3=m3: m3(x), repeat=rep)
            _, s3 = m3(x[:, :64], return_final_state=True)
            t3_step = _step_latency(lambda m3=m3, s3=s3: m3.step(xt, s3))
        t3 = best_time(lambda m3=m3: _fwd_bwd(m3, x), repeat=rep)
        peer = "ssmkit Mamba2, same (H, P, N)"
        rows += [
            {"case": f"{name} fwd L={length}", "ssmkit_s": t3_f, "peer_s": t2_f, "peer": peer, "speedup": t2_f / t3_f},
            {"case": f"{name} fwd+bwd L={length}", "ssmkit_s": t3, "peer_s": t2, "peer": peer, "speedup": t2 / t3},
            {"case": f"{name} one-token step", "ssmkit_s": t3_step, "peer_s": t2_step, "peer": peer,
             "speedup": t2_step / t3_step},
        ]
    return rows


def bench_mamba3_step(length: int, quick: bool) -> list[dict]:
    """ops.mamba3_step's numba kernel against its torch path (``fused_kernels(False)``), one token, float32, per
    state size (heads x P x N), batch and rank, one thread; speedup = torch time / kernel time. The op uses the
    kernel only below STEP_KERNEL_MAX_WORK; here it is forced on for every size by raising that limit."""
    import importlib

    from ssmkit.ops import Mamba3ScanState, fused_kernels, mamba3_step

    M3 = importlib.import_module("ssmkit.ops.mamba3")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both sides on one thread: a token's work is far too small to split
    g = torch.Generator().manual_seed(0)
    rows = []
    sizes = [(4, 16, 16), (8, 32, 32), (24, 64, 128)] if quick else [(4, 16, 16), (8, 32, 32), (16, 64, 64),
                                                                     (24, 64, 128)]
    for H, P, N in sizes:
        for batch, R in ((1, None), (1, 4), (8, None), (8, 4)):
            lead = (batch,) if R is None else (batch, R)
            r = (lambda *s: torch.randn(*s, generator=g))  # noqa: E731
            S = N // 4
            args = (r(*lead, H, P), torch.rand(batch, H, generator=g), -torch.rand(H), torch.rand(batch, H,
                    generator=g), r(*lead, 1, N), r(*lead, 1, N))
            state = Mamba3ScanState(r(batch, H, S), r(batch, H, P, N), r(*lead, H, N), r(*lead, H, P))
            kw = {"angles": r(batch, H, S), "D": r(H)}
            old, M3.STEP_KERNEL_MAX_WORK = M3.STEP_KERNEL_MAX_WORK, 1 << 62
            try:
                with torch.no_grad():
                    t_k = _step_latency(lambda: mamba3_step(*args, state, **kw))  # noqa: B023
                    with fused_kernels(False):
                        t_t = _step_latency(lambda: mamba3_step(*args, state, **kw))  # noqa: B023
            finally:
                M3.STEP_KERNEL_MAX_WORK = old
            work = batch * H * P * N * (2 * (R or 1) + 1)
            rows.append({"case": f"mamba3_step {H}x{P}x{N} b{batch} {'SISO' if R is None else f'R{R}'} "
                         f"work {work}", "ssmkit_s": t_k, "peer_s": t_t, "peer": "the torch step",
                         "speedup": t_t / t_k})
    torch.set_num_threads(threads)
    return rows


def _naive_s4d_kernel(layer, length: int) -> torch.Tensor:
    """The S4 reference code's S4D kernel: materialise (H, N/2, L) complex powers, then reduce over N."""
    _, log_dA, dB, C = layer.discrete()  # (H, N/2) complex each
    pos = torch.arange(length, dtype=torch.float32)
    vand = torch.exp(log_dA.unsqueeze(-1) * pos)  # (H, N/2, L)
    return 2 * torch.einsum("hn,hnl->hl", C * dB, vand).real


def bench_s4d(length: int, quick: bool) -> list[dict]:
    from ssmkit.layers import S4D

    torch.manual_seed(0)
    layer = S4D(D_MODEL, d_state=64, mode="conv")
    x = torch.randn(1, length, D_MODEL)
    rep = 1 if quick else 3
    rows = []
    with torch.no_grad():
        t_conv = best_time(lambda: layer(x), repeat=rep)
        layer.mode = "scan"
        t_scan = best_time(lambda: layer(x), repeat=rep)
        layer.mode = "conv"
        t_kernel = best_time(lambda: layer.kernel(length), repeat=rep)
        try:
            t_naive = best_time(lambda: _naive_s4d_kernel(layer, length), repeat=rep)
            rows.append({"case": f"S4D kernel L={length}", "ssmkit_s": t_kernel, "peer_s": t_naive,
                         "peer": "S4-repo style (H,N/2,L) Vandermonde", "speedup": t_naive / t_kernel})
            diff = (_naive_s4d_kernel(layer, length) - layer.kernel(length)).abs().max().item()
            rows[-1]["max_abs_diff"] = diff
        except RuntimeError as e:  # the naive kernel can run out of memory at long L
            rows.append({"case": f"S4D kernel L={length}", "ssmkit_s": t_kernel, "peer": f"failed: {e}"[:60]})
    rows.append({"case": f"S4D fwd L={length}", "ssmkit_s": t_conv, "peer_s": t_scan, "peer": "ssmkit S4D scan mode",
                 "speedup": t_scan / t_conv})
    return rows


def bench_h3(length: int, quick: bool) -> list[dict]:
    from ssmkit.layers import H3, Attention

    torch.manual_seed(0)
    h3 = H3(D_MODEL, d_state=64, n_heads=12)
    attn = Attention(D_MODEL, n_heads=12)
    x = torch.randn(1, length, D_MODEL)
    rep = 1 if quick else 3
    with torch.no_grad():
        t_h3 = best_time(lambda: h3(x), repeat=rep)
        t_attn = best_time(lambda: attn(x), repeat=rep)
    return [{"case": f"H3 fwd L={length}", "ssmkit_s": t_h3, "peer_s": t_attn,
             "peer": "no peer installable; ssmkit Attention", "speedup": t_attn / t_h3}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=["mamba", "mamba2", "mamba3", "mamba3-step", "s4d", "h3"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    benches = {"mamba": bench_mamba, "mamba2": bench_mamba2, "mamba3": bench_mamba3,
               "mamba3-step": bench_mamba3_step, "s4d": bench_s4d, "h3": bench_h3}
    rows = []
    for name, fn in benches.items():
        if args.only and name not in args.only:
            continue
        rows += fn(args.length, args.quick)
    print_table(rows, ["case", "ssmkit_s", "peer_s", "speedup", "peer", "max_abs_diff"])
    print(f"wrote {write_json('bench_layers', {'length': args.length, 'rows': rows})}")


if __name__ == "__main__":
    main()
